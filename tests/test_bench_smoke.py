"""The benchmark harness end to end in seconds: it must run and say sane things, not be fast.

``python -m bench --smoke --json`` starts the fakes, the bare relay and the proxy as separate
processes, runs all twelve scenarios with tiny settings and prints one JSON report. Timings on a
shared test machine mean nothing; what is checked is that every scenario ran without request
errors, that each figure the report derives exists and is plausible, and that no process
outlives the run: neither a run that ends normally nor one that is killed (SIGKILL, as a test
timeout does, or SIGTERM) while its servers, its load driver and wrk are running.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.run import _chosen
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = [
    "1-passthrough",
    "2-streaming",
    "3-ocr-fanout",
    "4-cache-hit",
    "5-memory",
    "6-mixed",
    "7-local-ocr",
    "8-messages-passthrough",
    "9-messages-streaming",
    "10-responses-passthrough",
    "11-responses-streaming",
    "12-retry",
]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    require_binary("wrk")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json"],
        cwd=ROOT,
        capture_output=True,
        # 5-7 s on an idle 2-core machine (8.8 s at a load average of 4 since scenarios 8, 9;
        # 27 s at 13 before them)
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result


def test_every_scenario_ran_without_request_errors(report: dict[str, Any]) -> None:
    assert list(report["scenarios"]) == SCENARIOS
    for name, result in report["scenarios"].items():
        assert result["raw"]["errors"] == 0, name
        assert result["rows"], name
        assert result["targets"], name


def test_every_target_has_a_finite_figure(report: dict[str, Any]) -> None:
    for result in report["scenarios"].values():
        for target in result["targets"]:
            assert isinstance(target["measured"], float | int), target
            assert math.isfinite(target["measured"]), target
            assert target["met"] in (True, False, None)


@pytest.mark.parametrize(
    ("scenario", "names"),
    [
        ("1-passthrough", ("direct", "relay", "proxy", "ocr-hit")),
        ("8-messages-passthrough", ("direct", "relay", "proxy")),
        ("10-responses-passthrough", ("direct", "relay", "proxy")),
    ],
)
def test_throughput_is_measured_for_all_three_targets(
    report: dict[str, Any], scenario: str, names: tuple[str, ...]
) -> None:
    runs = report["scenarios"][scenario]["raw"]["c16"]
    assert set(runs) == set(names)
    for name in names:
        assert all(r["requests"] > 0 and r["rps"] > 0 for r in runs[name]), name
        assert all(r["errors"] == 0 for r in runs[name]), name
        assert all(r["p50_us"] <= r["p99_us"] for r in runs[name]), name
    rows = {r["metric"]: r for r in report["scenarios"][scenario]["rows"]}
    assert rows["c=16 requests/s"]["proxy/relay"] > 0
    assert math.isfinite(rows["c=16 p50 latency"]["proxy-direct"])


def test_the_live_page_twin_recorded_what_it_served(report: dict[str, Any]) -> None:
    """Scenario 1's [ui] on ÷ off figures come from a proxy that really recorded."""
    ui = report["scenarios"]["1-passthrough"]["raw"]["ui"]
    assert ui["plain_page"] == 404  # the plain twin really has no page
    served = sum(r["requests"] for r in ui["runs"]["twin-ui"])
    assert served > 0 and ui["recorded"] >= served  # its warm-up run is recorded too
    assert all(r["cpu_us"] > 0 for runs in ui["runs"].values() for r in runs)
    rows = {r["metric"]: r for r in report["scenarios"]["1-passthrough"]["rows"]}
    assert rows["c=16 req/s, twin [ui] on"]["proxy/relay"] > 0
    assert rows["c=16 CPU per request, twin [ui] on"]["proxy"] > 0
    assert math.isfinite(rows["c=16 CPU per request, twin [ui] on − twin"]["proxy"])


@pytest.mark.parametrize(
    ("scenario", "end"),
    [
        ("2-streaming", "[DONE]"),
        ("9-messages-streaming", "message_stop"),
        ("11-responses-streaming", "response.completed"),
    ],
)
def test_streams_reach_done_and_first_byte_comes_first(
    report: dict[str, Any], scenario: str, end: str
) -> None:
    # bench.client counts a stream that never sends ``end`` (its dialect's last event: only the
    # fake's Messages stream sends ``message_stop``, only its Responses stream
    # ``response.completed``) as an error
    raw = report["scenarios"][scenario]["raw"]
    for name, results in raw["streams"].items():
        for r in results:
            assert r["requests"] > 0 and r["errors"] == 0, name
            assert 0 < r["ttfb"]["p50_ms"] <= r["total"]["p50_ms"], name
    for name, results in raw["long"].items():
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in results), name
    for name, results in raw["wrk"].items():
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in results), name
    for name, results in raw["spaced"].items():
        assert all(r["cpu_us_per_chunk"] > 0 for r in results), name
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in results), name
    rows = {r["metric"]: r for r in report["scenarios"][scenario]["rows"]}
    assert rows[f"c=16 time to {end} p50"]["proxy/relay"] > 0
    assert rows["c=16 streams/s (wrk)"]["proxy/relay"] > 0


def test_ocr_really_ran_through_the_fake_model(report: dict[str, Any]) -> None:
    delay_ms = report["settings"]["ocr_delay"] * 1000
    for results in report["scenarios"]["3-ocr-fanout"]["raw"]["runs"].values():
        for r in results:
            # every fan-out request misses the cache, so it waits at least one OCR call
            assert r["total"]["p50_ms"] >= delay_ms


def test_memory_and_stall_figures_are_plausible(report: dict[str, Any]) -> None:
    memory = report["scenarios"]["5-memory"]["raw"]
    for r in memory["burst"]["proxy"]:
        assert r["peak_kb"] >= r["rss_before_kb"] > 10_000  # a Python process is > 10 MB
    settings = report["settings"]
    assert all(r["streams"] == settings["idle_streams"] for r in memory["idle"]["proxy"])
    hits = report["scenarios"]["4-cache-hit"]["raw"]["runs"]["stall-ocr-hit"]
    assert all(0 <= r["stall_cpu_ms"] <= r["stall_wall_ms"] for r in hits)


def test_no_process_outlives_the_run(report: dict[str, Any]) -> None:
    assert len(report["pids"]) >= 4  # fakes, relay, proxy, watched proxy
    for pid in report["pids"]:
        assert not os.path.exists(f"/proc/{pid}"), pid


def test_local_ocr_scenario_reads_text(report: dict[str, Any]) -> None:
    rows = {r["metric"]: r for r in report["scenarios"]["7-local-ocr"]["rows"]}
    for engine in ("tesseract", "rapidocr"):  # .ci/run installs both; a missing one is skipped
        if engine not in rows["tiny: character error rate"]:
            assert not os.environ.get("CI"), f"scenario 7 did not run {engine}: install it"
            continue
        assert rows["tiny: character error rate"][engine] <= 2.0
        assert rows["tiny, 1 thread(s)"][engine] > 0 and rows["tiny, 2 thread(s)"][engine] > 0


def test_retry_scenario_ran_the_sdk_against_both_keepalive_settings(
    report: dict[str, Any],
) -> None:
    from bench.retry import DELAYS, IN_STREAM, KEEPALIVES, RETRIED

    (cases,) = report["scenarios"]["12-retry"]["raw"]["runs"]  # one repeat
    assert {(c["keepalive"], c["delay"]) for c in cases} == {
        (ka, d) for ka in KEEPALIVES for d in DELAYS
    }
    for case in cases:  # each as its commit says: "errors" counts the others
        if case["committed"]:
            assert (case["outcome"], case["upstream_calls"]) == (IN_STREAM, 1), case
        else:
            assert (case["outcome"], case["upstream_calls"]) == (RETRIED, 2), case
            assert case["retries"] == 1 and case["chunks"] >= 3, case
    # The longest latency outlasts the shorter setting by far: that stream was committed early
    # however loaded the machine (a lower bound on time; the other cases depend on the load).
    by = {(c["keepalive"], c["delay"]): c["committed"] for c in cases}
    assert by[min(KEEPALIVES), max(DELAYS)]


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, from /proc/PID/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], fields[19]  # fields 3 and 22 of proc(5)


def _descendants(pid: int) -> dict[int, str]:
    """Every living descendant of ``pid``: pid -> start time (to tell it from a reused pid)."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for path in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                with open(path) as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            for child in children:
                stat = _stat(child)
                if child not in found and stat is not None and stat[0] not in "ZX":
                    found[child] = stat[1]
                    todo.append(child)
    return found


def _alive(pid: int, started: str) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == started and stat[0] not in "ZX"  # a zombie is dead


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_no_child_outlives_a_killed_runner(how: signal.Signals, tmp_path: Path) -> None:
    require_binary("wrk")
    # scenarios 1 and 2: seven wrk runs, so that the runner is caught with wrk running
    argv = [sys.executable, "-m", "bench", "--smoke", "--json", "--only", "1", "2"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # its files land where pytest cleans up
    with open(tmp_path / "stderr", "wb") as err:
        runner = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
    seen: dict[int, str] = {}
    try:
        # Until wrk runs beside the fake, the relay, the proxy and the load driver.
        deadline = time.monotonic() + 40
        while not any(_comm(pid) == "wrk" for pid in seen) or len(seen) < 5:
            assert runner.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no wrk among {seen}"
            seen.update(_descendants(runner.pid))
            time.sleep(0.005)
        seen.update(_descendants(runner.pid))
        runner.send_signal(how)
        code = runner.wait(timeout=20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p, t) for p, t in seen.items()):
            time.sleep(0.05)
        left = {p: _comm(p) for p, t in seen.items() if _alive(p, t)}
        assert not left, f"outlived the runner: {left}"
        if how == signal.SIGTERM:  # an orderly stop: exit status 143, its files gone too
            assert code == 128 + how, (tmp_path / "stderr").read_text()[-3000:]
            assert not list(tmp_path.glob("ocrproxy-bench-*"))
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        for pid, started in seen.items():
            if _alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("wanted", "picked"),
    [
        ("1", ["1-passthrough"]),  # not 10 and 11
        ("10", ["10-responses-passthrough"]),
        ("11", ["11-responses-streaming"]),
        ("streaming", ["2-streaming", "9-messages-streaming", "11-responses-streaming"]),
        ("responses", []),  # neither the start nor the end of a name
    ],
)
def test_only_picks_scenarios_by_number_or_name(wanted: str, picked: list[str]) -> None:
    assert [name for name in SCENARIOS if _chosen(name, wanted)] == picked

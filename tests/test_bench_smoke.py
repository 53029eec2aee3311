"""The benchmark harness end to end in seconds: it must run and say sane things, not be fast.

``python -m bench --smoke --json`` starts the fakes, the bare relay and the proxy as separate
processes, runs all six scenarios with tiny settings and prints one JSON report. Timings on a
shared test machine mean nothing; what is checked is that every scenario ran without request
errors, that each figure the report derives exists and is plausible, and that no process
outlives the run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

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
]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    require_binary("wrk")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json"],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
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


def test_throughput_is_measured_for_all_three_targets(report: dict[str, Any]) -> None:
    runs = report["scenarios"]["1-passthrough"]["raw"]["c16"]
    for name in ("direct", "relay", "proxy", "ocr-hit"):
        assert all(r["requests"] > 0 and r["rps"] > 0 for r in runs[name]), name
        assert all(r["p50_us"] <= r["p99_us"] for r in runs[name]), name


def test_streams_reach_done_and_first_byte_comes_first(report: dict[str, Any]) -> None:
    streams = report["scenarios"]["2-streaming"]["raw"]["streams"]
    for name, results in streams.items():
        for r in results:
            assert r["requests"] > 0 and r["errors"] == 0, name
            assert 0 < r["ttfb"]["p50_ms"] <= r["total"]["p50_ms"], name
    spaced = report["scenarios"]["2-streaming"]["raw"]["spaced"]
    for name, results in spaced.items():
        assert all(r["cpu_us_per_chunk"] > 0 for r in results), name


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
    rows = {r["metric"]: r["local"] for r in report["scenarios"]["7-local-ocr"]["rows"]}
    assert rows["screenshot: character error rate"] <= 2.0
    assert rows["mixed batch, 1 thread(s)"] > 0 and rows["mixed batch, 2 thread(s)"] > 0

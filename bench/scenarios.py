"""The scenarios of the suite. Each measures every target side by side in the same run,
repeats (interleaved, so drift hits all targets alike) and keeps the median of the repeats.

Each scenario returns ``{"rows": [...], "targets": [...], "raw": {...}}``: rows for the table
(one metric per row, a column per target, then the ratio to the bare relay and the difference to
direct), the issue's targets with the measured figure and whether it is met, and the raw data.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from . import payloads
from .harness import UI_ADMIN_KEY, Bench, Target
from .retry import retry
from .stats import cpu_ns, median, peak_rss_kb, reset_peak, rss_kb

TARGETS = ("direct", "relay", "proxy")
MB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    repeats: int = 3
    wrk_seconds: float = 5.0
    streams: int = 480  # streams per repeat in scenario 2
    long_streams: int = 3  # 1,000-chunk streams per repeat
    fanout: int = 2  # requests per repeat and image count in scenario 3
    hits: int = 8  # cache-hit requests per repeat in scenario 4
    idle_streams: int = 1000
    burst: int = 64
    burst_size: int = 5 * MB
    mixed_seconds: float = 4.0
    mixed_streams: int = 200
    mixed_ocr: int = 50
    concurrencies: tuple[int, ...] = (1, 16, 64)
    spaced_chunks: int = 1000  # chunks per stream for the per-chunk CPU figure
    mixed_delay: float = 0.05  # seconds between the chunks of scenario 6's streams
    ocr_delay: float = 0.3  # the fake OCR model's latency
    hit_image_size: int = MB  # each of scenario 4's 8 images
    idle_settle: float = 0.5  # seconds the idle streams are held open before RSS is read
    retry_scale: float = 1.0  # scenario 12's OCR latencies and keepalive_after_s, scaled
    # The smoke run's savings (harness.Bench ``lean``): fewer processes, none pinned apart, and
    # scenario 7 in the background on one image. Timings then mean nothing.
    lean: bool = False
    ui_rounds: int = 4  # scenario 1's rounds of the live page's cost (relay, [ui] off, on)


QUICK = Settings(
    wrk_seconds=1.0,
    concurrencies=(1, 16),
    streams=96,
    long_streams=2,
    spaced_chunks=300,
    fanout=1,
    hits=2,
    burst=8,
    idle_streams=200,
    mixed_seconds=1.0,
    mixed_delay=0.02,
    retry_scale=0.25,
    ui_rounds=6,
)
# For the test suite's smoke run: the harness end to end in a few seconds, timings meaningless.
# Every scenario and every code path of the full run, each measurement once and tiny.
SMOKE = Settings(
    repeats=1,
    wrk_seconds=0.05,
    concurrencies=(16,),
    spaced_chunks=50,
    mixed_delay=0.002,
    ocr_delay=0.05,
    streams=20,
    long_streams=1,
    fanout=1,
    hits=1,
    idle_streams=20,
    burst=4,
    burst_size=256 * 1024,
    mixed_seconds=0.1,
    mixed_streams=10,
    mixed_ocr=2,
    hit_image_size=64 * 1024,
    idle_settle=0.05,
    retry_scale=0.05,
    lean=True,
    ui_rounds=1,
)

Row = dict[str, Any]
Result = dict[str, Any]


def row(metric: str, values: dict[str, float], unit: str, *, higher_is_better: bool) -> Row:
    """A table row: each target's median, then proxy ÷ relay and proxy − direct."""
    out: Row = {"metric": metric, "unit": unit, **values}
    if "proxy" in values and "relay" in values and values["relay"]:
        out["proxy/relay"] = values["proxy"] / values["relay"]
    if "proxy" in values and "direct" in values:
        if higher_is_better and values["direct"]:
            out["proxy/direct"] = values["proxy"] / values["direct"]
        else:
            out["proxy-direct"] = values["proxy"] - values["direct"]
    return out


def target(name: str, measured: float, limit: float, unit: str, *, at_most: bool) -> Row:
    met = measured <= limit if at_most else measured >= limit
    sign = "<=" if at_most else ">="
    return {
        "target": f"{name} {sign} {limit:g}{unit}",
        "measured": round(measured, 4),
        "unit": unit,
        "met": met,
    }


def repeat(
    s: Settings, names: Sequence[str], measure: Callable[[str], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Run ``measure(name)`` for each target, ``s.repeats`` times, interleaved."""
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for _ in range(s.repeats):
        for name in names:
            runs[name].append(measure(name))
    return runs


def med(runs: dict[str, list[dict[str, Any]]], *path: str) -> dict[str, float]:
    """Median over the repeats of ``result[path[0]][path[1]]...`` for each target."""
    out = {}
    for name, results in runs.items():
        values = []
        for result in results:
            value: Any = result
            for key in path:
                value = value[key]
            values.append(float(value))
        out[name] = median(values)
    return out


def errors(runs: dict[str, list[dict[str, Any]]]) -> int:
    return sum(int(r.get("errors", 0)) for results in runs.values() for r in results)


def passthrough(b: Bench, s: Settings) -> Result:
    """Scenario 1: small non-streaming chat; req/s and latency at concurrency 1, 16, 64; an
    OCR cache hit at 16; and what the live page costs, ``[ui]`` on against off."""
    result = _passthrough(b, s, payloads.CHAT)
    rows, targets, raw = live_page_cost(b, s)
    result["rows"] += rows
    result["targets"] += targets
    result["raw"]["ui"] = raw
    result["raw"]["errors"] += errors(raw["runs"])
    return result


def live_page_cost(b: Bench, s: Settings) -> tuple[list[Row], list[Row], Result]:
    """What the live page costs: two twins of the proxy started together for this part, one
    as it is and one with ``[ui] enabled`` (it records every request), each warmed by one run,
    then ``s.ui_rounds`` rounds of scenario 1's small chat at 16 connections on the bare relay,
    the run's own proxy and both twins, in an order reversed every round (so that a drift of
    the machine favours none): requests/s, and each server's CPU time per request (every
    thread's ``schedstat`` over the run ÷ the responses wrk counted). The CPU time is the finer
    figure: at saturation on its own CPU, a server's throughput is its inverse, without the
    noise of the load generator sharing the other CPU. The run's proxy and the plain twin are
    the same program: their difference is the noise floor the page's cost is read against."""
    body = payloads.CHAT.body()
    names = ("relay", "proxy", "twin-off", "twin-ui")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with b.twins() as (plain, page):
        for twin in (plain, page):
            b.wrk(twin.url, body, connections=16, duration=s.wrk_seconds)
        for index in range(s.ui_rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                server = b.targets[name]
                assert server.pid is not None
                before = cpu_ns(server.pid)
                result = b.wrk(server.url, body, connections=16, duration=s.wrk_seconds)
                result["cpu_us"] = (cpu_ns(server.pid) - before) / 1000 / max(result["requests"], 1)
                runs[name].append(result)
        recorded = page_totals(page)["requests"]
        plain_page = page_status(plain)
    rps, cpu = med(runs, "rps"), med(runs, "cpu_us")
    # Paired by round, as the rounds were run: a drift of the machine cancels out.
    pairs = list(zip(runs["twin-ui"], runs["twin-off"], strict=True))
    ratios = [on["rps"] / off["rps"] for on, off in pairs]
    added = median([on["cpu_us"] - off["cpu_us"] for on, off in pairs])
    plain_runs = zip(runs["twin-off"], runs["proxy"], strict=True)
    noise = median([twin["cpu_us"] - own["cpu_us"] for twin, own in plain_runs])
    rows: list[Row] = []
    for what, by, unit, higher in (
        ("req/s", rps, "req/s", True),
        ("CPU per request", cpu, "µs", False),
    ):
        for label, name in (
            (", run's proxy", "proxy"),
            (", twin", "twin-off"),
            (", twin [ui] on", "twin-ui"),
        ):
            values = {"relay": by["relay"], "proxy": by[name]}
            rows.append(row(f"c=16 {what}{label}", values, unit, higher_is_better=higher))
    rows += [
        {"metric": "c=16 CPU per request, twin [ui] on − twin", "unit": "µs", "proxy": added},
        {
            "metric": "c=16 CPU per request, twin − run's proxy (noise)",
            "unit": "µs",
            "proxy": noise,
        },
        {"metric": "c=16 req/s [ui] on ÷ off, lowest round", "unit": "x", "proxy": min(ratios)},
        {"metric": "c=16 req/s [ui] on ÷ off, highest round", "unit": "x", "proxy": max(ratios)},
    ]
    targets = [
        target("[ui] on: c=16 req/s ÷ [ui] off", median(ratios), 0.97, "x", at_most=False),
        # "A few microseconds" (the words): 3.2 µs measured inside a running proxy.
        target("[ui] on: CPU added per request", added, 5.0, " µs", at_most=True),
    ]
    raw: Result = {"runs": runs, "ratios": ratios, "recorded": recorded, "plain_page": plain_page}
    return rows, targets, raw


def page_status(server: Target) -> int:
    """What ``/ui/totals`` answers on ``server`` (404 where the page is off)."""
    try:
        with page_totals_answer(server) as answer:
            status: int = answer.status
            return status
    except urllib.error.HTTPError as refused:
        return refused.code


def page_totals_answer(page: Target) -> Any:
    request = urllib.request.Request(
        page.at("/ui/totals"), headers={"Authorization": f"Bearer {UI_ADMIN_KEY}"}
    )
    return urllib.request.urlopen(request, timeout=10)


def page_totals(page: Target) -> dict[str, Any]:
    """The live page's totals, as the page reads them (``/ui/totals``): proof it recorded."""
    with page_totals_answer(page) as answer:
        totals: dict[str, Any] = orjson.loads(answer.read())
    return totals


def messages_passthrough(b: Bench, s: Settings) -> Result:
    """Scenario 8: scenario 1 (without the OCR cache hit) for Anthropic Messages: a small
    ``POST /v1/messages`` with no OCR switch, which the proxy forwards byte for byte to its
    ``api = "anthropic"`` upstream."""
    return _passthrough(b, s, payloads.MESSAGES)


def responses_passthrough(b: Bench, s: Settings) -> Result:
    """Scenario 10: scenario 8 for the OpenAI Responses API: a small ``POST /v1/responses``
    with no OCR switch, forwarded byte for byte to the ``api = "openai"`` upstream."""
    return _passthrough(b, s, payloads.RESPONSES)


def _passthrough(b: Bench, s: Settings, api: payloads.Api) -> Result:
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    targets: list[Row] = []
    body = api.body()
    with_hit = api is payloads.CHAT
    hit_body = payloads.chat(payloads.OCR_MODEL, images=1, size=2048) if with_hit else b""
    if with_hit:
        hit_file = b.tmp / "ocr-hit.json"
        hit_file.write_bytes(hit_body)
        warm = {"kind": "sequential", "url": b.targets["proxy"].url, "n": 1, "warmup": 0}
        b.client({**warm, "body": {"file": str(hit_file)}})  # the description is cached now

    def measure(name: str, conns: int) -> dict[str, Any]:
        if name == "ocr-hit":
            return b.wrk(
                b.targets["proxy"].url, hit_body, connections=conns, duration=s.wrk_seconds
            )
        url = b.targets[name].at(api.path)
        return b.wrk(url, body, connections=conns, duration=s.wrk_seconds, headers=api.headers)

    for conns in s.concurrencies:
        names = (*TARGETS, "ocr-hit") if conns == 16 and with_hit else TARGETS
        runs = repeat(s, names, lambda n, c=conns: measure(n, c))
        raw[f"c{conns}"] = runs
        rps, p50, p99 = med(runs, "rps"), med(runs, "p50_us"), med(runs, "p99_us")
        hit = {"proxy": rps.pop("ocr-hit")} if "ocr-hit" in rps else None
        p50.pop("ocr-hit", None), p99.pop("ocr-hit", None)
        to_ms = lambda d: {k: v / 1000 for k, v in d.items()}  # noqa: E731
        rows.append(row(f"c={conns} requests/s", rps, "req/s", higher_is_better=True))
        rows.append(row(f"c={conns} p50 latency", to_ms(p50), "ms", higher_is_better=False))
        rows.append(row(f"c={conns} p99 latency", to_ms(p99), "ms", higher_is_better=False))
        if conns == 16:
            ratio = rps["proxy"] / rps["relay"]
            targets.append(target("c=16 req/s ÷ bare relay", ratio, 0.8, "x", at_most=False))
        if conns == 16 and hit is not None:
            hit_ratio = hit["proxy"] / rps["relay"]
            rows.append(
                {
                    "metric": "c=16 OCR cache hit (1 small image) req/s",
                    "unit": "req/s",
                    "proxy": hit["proxy"],
                    "proxy/relay": hit_ratio,
                }
            )
            targets.append(
                target("OCR cache hit c=16 req/s ÷ bare relay", hit_ratio, 0.5, "x", at_most=False)
            )
        if conns == 1:
            added = (p50["proxy"] - p50["direct"]) / 1000
            targets.append(target("c=1 added p50 over direct", added, 0.35, " ms", at_most=True))
            raw["relay_added_p50_ms"] = (p50["relay"] - p50["direct"]) / 1000
    raw["errors"] = sum(errors(raw[f"c{c}"]) for c in s.concurrencies)
    return {"rows": rows, "targets": targets, "raw": raw}


def streaming(b: Bench, s: Settings) -> Result:
    """Scenario 2: 20-chunk SSE streams at concurrency 16; 1,000-chunk streams for per-chunk cost.

    TTFB and time to [DONE] use streams whose chunks come ~2 ms apart (as tokens do), so the
    server is not saturated and the figures are latencies, not queueing; streams/s (wrk) uses
    back-to-back chunks, so it is the throughput ceiling.
    """
    return _streaming(b, s, payloads.CHAT)


def messages_streaming(b: Bench, s: Settings) -> Result:
    """Scenario 9: scenario 2 for Anthropic Messages streams (no OCR switch): each chunk is a
    ``content_block_delta`` event, between Anthropic's ``message_start``, ``content_block_start``
    and ``ping`` and its ``content_block_stop``, ``message_delta`` and ``message_stop``."""
    return _streaming(b, s, payloads.MESSAGES)


def responses_streaming(b: Bench, s: Settings) -> Result:
    """Scenario 11: scenario 2 for Responses streams (no OCR switch): each chunk is a
    ``response.output_text.delta`` event, after ``response.created``,
    ``response.output_item.added`` and ``response.content_part.added``, before
    ``response.output_text.done`` and ``response.completed`` (with ``usage``); no ``[DONE]``."""
    return _streaming(b, s, payloads.RESPONSES)


def _streaming(b: Bench, s: Settings, api: payloads.Api) -> Result:
    rows: list[Row] = []
    targets: list[Row] = []
    headers = {"X-Bench-Chunks": "20", "X-Bench-Delay": "0.002"}  # tokens ~2 ms apart
    runs = repeat(
        s,
        TARGETS,
        lambda n: b.client(
            {
                "kind": "streams",
                "api": api.name,
                "url": b.targets[n].at(api.path),
                "concurrency": 16,
                "requests": s.streams,
                "headers": headers,
            }
        ),
    )
    for key, label in (("ttfb", "time to first byte"), ("total", f"time to {api.end}")):
        for q in ("p50_ms", "p99_ms"):
            rows.append(
                row(f"c=16 {label} {q[:3]}", med(runs, key, q), "ms", higher_is_better=False)
            )
    ttfb = med(runs, "ttfb", "p50_ms")
    targets.append(
        target("added TTFB p50", ttfb["proxy"] - ttfb["direct"], 1.0, " ms", at_most=True)
    )
    body = api.body(stream=True)
    wrk_runs = repeat(
        s,
        TARGETS,
        lambda n: b.wrk(
            b.targets[n].at(api.path),
            body,
            connections=16,
            duration=s.wrk_seconds,
            headers={**api.headers, "X-Bench-Chunks": "20"},
        ),
    )
    per_s = med(wrk_runs, "rps")
    rows.append(row("c=16 streams/s (wrk)", per_s, "streams/s", higher_is_better=True))
    targets.append(
        target("streams/s ÷ bare relay", per_s["proxy"] / per_s["relay"], 0.9, "x", at_most=False)
    )

    long_runs = repeat(
        s,
        TARGETS,
        lambda n: b.client(
            {
                "kind": "sequential",
                "url": b.targets[n].at(api.path),
                "n": s.long_streams,
                "warmup": 0,
                "body": {api.name: {"stream": True}},
                "headers": {**api.headers, "X-Bench-Chunks": "1000"},
            }
        ),
    )
    done = med(long_runs, "total", "p50_ms")
    label = f"1,000 chunks back to back, to {api.end}"
    rows.append(row(label, done, "ms", higher_is_better=False))
    added_us = {n: (done[n] - done["direct"]) for n in ("relay", "proxy")}  # ms/1000 = µs
    rows.append({"metric": "  per chunk, added over direct", "unit": "µs", **added_us})

    def spaced(name: str) -> dict[str, Any]:
        # chunks 1 ms apart, so each arrives alone: one read and one write per chunk
        t = b.targets[name]
        assert t.pid is not None
        before = cpu_ns(t.pid)
        result = b.client(
            {
                "kind": "streams",
                "api": api.name,
                "url": t.at(api.path),
                "concurrency": 8,
                "requests": 8,
                "headers": {"X-Bench-Chunks": str(s.spaced_chunks), "X-Bench-Delay": "0.001"},
            }
        )
        result["cpu_us_per_chunk"] = (cpu_ns(t.pid) - before) / 1000 / (9 * s.spaced_chunks)
        return result

    spaced_runs = repeat(s, ("relay", "proxy"), spaced)
    cpu = med(spaced_runs, "cpu_us_per_chunk")
    rows.append(
        row(
            f"CPU per chunk, 8 streams × {s.spaced_chunks:,} spaced chunks",
            cpu,
            "µs",
            higher_is_better=False,
        )
    )
    targets.append(
        target("per-chunk relay cost (server CPU)", cpu["proxy"], 20, " µs", at_most=True)
    )
    raw = {"streams": runs, "wrk": wrk_runs, "long": long_runs, "spaced": spaced_runs}
    raw["errors"] = errors(runs) + errors(wrk_runs) + errors(long_runs) + errors(spaced_runs)
    return {"rows": rows, "targets": targets, "raw": raw}


def fanout(b: Bench, s: Settings) -> Result:
    """Scenario 3: one request with 1, 4, 16 distinct images, fake OCR latency 300 ms."""
    counts = (1, 4, 16)
    runs = repeat(
        s,
        [str(c) for c in counts],
        lambda c: b.client(
            {
                "kind": "fanout",
                "url": b.targets["proxy"].url,
                "n": s.fanout,
                "images": int(c),
                "size": 16 * 1024,
            }
        ),
    )
    total = med(runs, "total", "p50_ms")
    one = total["1"]
    rows = [
        {
            "metric": f"{c} image(s): total time",
            "unit": "ms",
            "proxy": total[str(c)],
            "÷ 1 image": total[str(c)] / one,
        }
        for c in counts
    ]
    rows.append(
        {
            "metric": "1 image minus fake OCR latency",
            "unit": "ms",
            "proxy": one - b.ocr_delay * 1000,
        }
    )
    targets = [
        target("4 images ÷ 1 image", total["4"] / one, 1.15, "x", at_most=True),
        target("16 images ÷ 1 image", total["16"] / one, 1.5, "x", at_most=True),
    ]
    return {"rows": rows, "targets": targets, "raw": {"runs": runs, "errors": errors(runs)}}


def cache_hit(b: Bench, s: Settings) -> Result:
    """Scenario 4: 8 × 1 MB images, cache warm, vs a pass-through of a same-size plain body.

    Times come from the plain proxy; event-loop stalls from a second, watched proxy
    (``bench.loopwatch``) that gets the same requests.
    """
    image = s.hit_image_size
    ocr_spec = {"chat": {"model": payloads.OCR_MODEL, "images": 8, "size": image}}
    size = len(payloads.chat(payloads.OCR_MODEL, images=8, size=image))
    plain_spec = {"padded": size}
    names = ("direct", "relay", "proxy", "proxy-ocr-hit", "stall-pass", "stall-ocr-hit")

    def measure(name: str) -> dict[str, Any]:
        # a fresh OCR body each repeat: its warm-up request fills the cache, then n hits
        body = ocr_spec if name.endswith("ocr-hit") else plain_spec
        if name.startswith("stall"):
            url = b.watched().url
            b.stall_ms()  # reset
        else:
            url = b.targets[name.removesuffix("-ocr-hit")].url
        result = b.client({"kind": "sequential", "n": s.hits, "url": url, "body": body})
        if name.startswith("stall"):
            result["stall_wall_ms"], result["stall_cpu_ms"] = b.stall_ms()
        return result

    runs = repeat(s, names, measure)
    total = med(runs, "total", "p50_ms")
    hit, plain, direct = total["proxy-ocr-hit"], total["proxy"], total["direct"]
    rows = [
        row(
            f"{size / MB:.1f} MB plain body, p50 time",
            {k: total[k] for k in TARGETS},
            "ms",
            higher_is_better=False,
        ),
        {
            "metric": f"same size, 8 × {image / MB:g} MB images, OCR cache hit",
            "unit": "ms",
            "proxy": hit,
        },
        {"metric": "OCR cache hit − proxy pass-through", "unit": "ms", "proxy": hit - plain},
        {"metric": "OCR cache hit − direct pass-through", "unit": "ms", "proxy": hit - direct},
    ]
    watched = {k: runs[k] for k in ("stall-pass", "stall-ocr-hit")}
    stall = med(watched, "stall_cpu_ms")
    wall = med(watched, "stall_wall_ms")
    rows.append({"metric": "longest loop stall, wall clock (1 ms monitor)", "unit": "ms", **wall})
    rows.append({"metric": "longest loop stall, bounded by proxy CPU", "unit": "ms", **stall})
    targets = [
        target(
            f"added for {8 * image / MB:g} MB of images (hit − pass-through)",
            hit - plain,
            25,
            " ms",
            at_most=True,
        ),
        target(
            "longest loop stall (CPU-bound), OCR cache hit",
            stall["stall-ocr-hit"],
            10,
            " ms",
            at_most=True,
        ),
    ]
    return {"rows": rows, "targets": targets, "raw": {"runs": runs, "errors": errors(runs)}}


def memory(b: Bench, s: Settings) -> Result:
    """Scenario 5: peak RSS under a burst of big-image requests; RSS per idle stream."""
    rows: list[Row] = []
    targets: list[Row] = []
    servers = ("relay", "proxy")

    # Every repeat gets a newly started server: a heap that an earlier burst already grew
    # would hide the growth (freed memory is reused, not returned to the system).
    def idle(name: str) -> dict[str, Any]:
        with b.fresh(name) as t:
            result = b.client(
                {
                    "kind": "idle",
                    "url": t.url,
                    "n": s.idle_streams,
                    "hold": 30,
                    "pid": t.pid,
                    "settle": s.idle_settle,
                }
            )
        grown = result["rss_held_kb"] - result["rss_before_kb"]
        result["per_stream_kb"] = grown / max(1, result["streams"])
        return result

    def burst(name: str) -> dict[str, Any]:
        with b.fresh(name) as t:
            assert t.pid is not None
            before = rss_kb(t.pid)
            reset = reset_peak(t.pid)
            spec: dict[str, Any] = {
                "kind": "burst",
                "url": t.url,
                "concurrency": s.burst,
                "size": s.burst_size,
            }
            if name == "relay":
                spec["model"] = payloads.PLAIN_MODEL
            result = b.client(spec)
            result["rss_before_kb"] = before
            result["peak_kb"] = peak_rss_kb(t.pid) if reset else float("nan")
        return result

    idle_runs = repeat(s, servers, idle)
    per = med(idle_runs, "per_stream_kb")
    rows.append({"metric": f"RSS per idle stream ({s.idle_streams} open)", "unit": "KB", **per})
    targets.append(target("RSS per idle stream", per["proxy"], 50, " KB", at_most=True))

    runs = repeat(s, servers, burst)
    peak_mb = {k: v / 1024 for k, v in med(runs, "peak_kb").items()}
    body_mb = runs["proxy"][0]["body_bytes"] / MB
    limit = 3 * body_mb + 60
    rows.append(
        {
            "metric": f"peak RSS, {s.burst} × {s.burst_size / MB:g} MB image requests",
            "unit": "MB",
            **peak_mb,
            "proxy/relay": peak_mb["proxy"] / peak_mb["relay"],
        }
    )
    rows.append(
        {
            "metric": "RSS at start",
            "unit": "MB",
            **{k: v / 1024 for k, v in med(runs, "rss_before_kb").items()},
        }
    )
    rows.append({"metric": "in-flight body bytes", "unit": "MB", "proxy": body_mb})
    grown = peak_mb["proxy"] - median([r["rss_before_kb"] / 1024 for r in runs["proxy"]])
    rows.append(
        {"metric": "peak growth per request ÷ its body", "unit": "x", "proxy": grown / body_mb}
    )
    targets.append(
        target("peak RSS (3 × body + 60 MB)", peak_mb["proxy"], limit, " MB", at_most=True)
    )
    raw = {"burst": runs, "idle": idle_runs, "errors": errors(runs)}
    raw["errors"] += sum(s.idle_streams - r["streams"] for r in idle_runs["proxy"])
    return {"rows": rows, "targets": targets, "raw": raw}


def mixed(b: Bench, s: Settings) -> Result:
    """Scenario 6: 200 concurrent streams, alone and beside 50 OCR requests (cache misses).

    The streams pace their 20 chunks 50 ms apart, like a model emitting tokens, so the proxy is
    busy but not saturated by the streams alone; each OCR request carries a fresh 256 KB image.
    """
    names = ("direct streams-only", "streams-only", "streams+ocr")

    def measure(name: str) -> dict[str, Any]:
        target = "direct" if name.startswith("direct") else "proxy"
        return b.client(
            {
                "kind": "mixed",
                "headers": {"X-Bench-Chunks": "20", "X-Bench-Delay": str(s.mixed_delay)},
                "url": b.targets[target].url,
                "duration": s.mixed_seconds,
                "streams": s.mixed_streams,
                "ocr": s.mixed_ocr if name == "streams+ocr" else 0,
                "size": 256 * 1024,
            }
        )

    runs = repeat(s, names, measure)
    p50 = med(runs, "streams", "ttfb", "p50_ms")
    p99 = med(runs, "streams", "ttfb", "p99_ms")
    rate = med(runs, "streams", "per_s")
    ocr_rate = median([r["ocr"]["per_s"] for r in runs["streams+ocr"]])
    rows = [
        {"metric": "plain stream TTFB p50", "unit": "ms", **p50},
        {"metric": "plain stream TTFB p99", "unit": "ms", **p99},
        {"metric": "plain streams/s", "unit": "streams/s", **rate},
        {"metric": "OCR requests/s meanwhile", "unit": "req/s", "streams+ocr": ocr_rate},
    ]
    ratio = p99["streams+ocr"] / p99["streams-only"]
    targets = [
        {
            "target": "stream TTFB p99 with OCR ÷ streams only (no numeric target; ~1 = unharmed)",
            "measured": round(ratio, 3),
            "unit": "x",
            "met": None,
        }
    ]
    errs = sum(r["streams"]["errors"] + r["ocr"]["errors"] for v in runs.values() for r in v)
    return {"rows": rows, "targets": targets, "raw": {"runs": runs, "errors": errs}}


def local_ocr_start(b: Bench, s: Settings) -> subprocess.Popen[bytes]:
    """Start scenario 7's process (unpinned); a lean run starts it first, in the background."""
    argv = [sys.executable, "-m", "bench.local_ocr_smoke"]
    if not s.lean:
        argv = [sys.executable, "-m", "bench.local_ocr", "--json", "--repeat", str(s.repeats)]
    proc = b.spawn(argv, None, "local-ocr.log", stdout=subprocess.PIPE)
    b.background["local-ocr"] = proc
    return proc


def _local_rows(engines: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure, one column per engine (``tesseract``, ``rapidocr``, ...)."""
    first = next(iter(engines.values()))
    rows: list[dict[str, Any]] = []
    for image in first["latency"]:
        rows.append(
            {"metric": f"{image}: seconds per image (1 thread)", "unit": "s"}
            | {n: e["latency"][image]["s_per_image"] for n, e in engines.items()}
        )
    for image in first["latency"]:
        rows.append(
            {"metric": f"{image}: character error rate", "unit": "%"}
            | {n: round(e["latency"][image]["cer"] * 100, 2) for n, e in engines.items()}
        )
    for cls in first["throughput"]:
        for i in (0, 1):
            threads = first["throughput"][cls]["rows"][i]["threads"]
            rows.append(
                {"metric": f"{cls}, {threads} thread(s)", "unit": "images/s"}
                | {n: e["throughput"][cls]["rows"][i]["images_per_s"] for n, e in engines.items()}
            )
        rows.append(
            {"metric": f"{cls}: speed-up with 2 threads", "unit": "x"}
            | {n: e["throughput"][cls]["speedup_2_threads"] for n, e in engines.items()}
        )
    rows.append(
        {"metric": "peak RSS of the process after the engine", "unit": "MB"}
        | {n: e["peak_rss_mb_after"] for n, e in engines.items()}
    )
    return rows


def local_ocr(b: Bench, s: Settings) -> Result:
    """Scenario 7: the local engines side by side (``bench/local_ocr.py``, in its own process,
    unpinned): Tesseract, with Chinese data if installed, and RapidOCR if its extra is. Seconds
    per image and character error rate for eight rendered images (English and Chinese screens,
    a photo, a page), then images/s per image class with one and with two engine threads.
    Skipped (no rows) when no engine is installed. A lean run reads one tiny image per engine
    (``bench/local_ocr_smoke.py``)."""
    proc = b.background.pop("local-ocr", None) or local_ocr_start(b, s)
    stdout, _ = proc.communicate(timeout=1800)
    stderr = (b.tmp / "local-ocr.log").read_text(errors="replace")
    if proc.returncode != 0:
        reason = (stderr.strip().splitlines() or ["failed"])[-1]
        return {
            "rows": [{"metric": f"skipped: {reason}", "unit": ""}],
            "targets": [],
            "raw": {"errors": 0 if "unavailable" in reason else 1, "stderr": stderr},
        }
    result = orjson.loads(stdout)
    engines = result["engines"]
    rows = _local_rows(engines)
    rows += [
        {"metric": f"{n}: skipped ({why})", "unit": ""} for n, why in result["skipped"].items()
    ]
    targets = []
    for name, engine in engines.items():
        latency = engine["latency"]
        wanted = [i for i in latency if i.startswith("zh-")] if name == "rapidocr" else []
        wanted = wanted or (["screenshot"] if "screenshot" in latency else list(latency)[:1])
        worst = max(latency[i]["cer"] for i in wanted) * 100
        targets.append(
            {
                "target": f"local OCR ({name}), CER <= 2 % on {', '.join(wanted)}",
                "measured": round(worst, 2),
                "unit": "%",
                "met": worst <= 2,
            }
        )
        for cls, figures in engine["throughput"].items():
            targets.append(
                {
                    "target": f"local OCR ({name}) images/s, 2 threads ÷ 1, {cls} "
                    "(no numeric target; ~2 = parallel)",
                    "measured": figures["speedup_2_threads"],
                    "unit": "x",
                    "met": None,
                }
            )
    return {"rows": rows, "targets": targets, "raw": {"result": result, "errors": 0}}


SCENARIOS: dict[str, Callable[[Bench, Settings], Result]] = {
    "1-passthrough": passthrough,
    "2-streaming": streaming,
    "3-ocr-fanout": fanout,
    "4-cache-hit": cache_hit,
    "5-memory": memory,
    "6-mixed": mixed,
    "7-local-ocr": local_ocr,
    "8-messages-passthrough": messages_passthrough,
    "9-messages-streaming": messages_streaming,
    "10-responses-passthrough": responses_passthrough,
    "11-responses-streaming": responses_streaming,
    "12-retry": retry,
}

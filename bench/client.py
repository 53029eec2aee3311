"""The aiohttp load driver for timings wrk cannot take: time to first byte, stream end, memory.

Run as its own process (pinned next to the fakes): ``python -m bench.client '<json spec>'``. It
prints one JSON object. Specs (``kind`` selects):

- ``streams``: ``concurrency`` workers share ``requests`` streaming requests; per request the
  time to the first body byte (TTFB) and to the end of the stream; a stream that never sends
  its dialect's last event (``[DONE]``; ``message_stop`` with ``"api": "messages"``, an
  Anthropic Messages stream; ``response.completed`` with ``"api": "responses"``) is an error.
- ``sequential``: ``n`` identical requests one after the other (``body``: a payload spec);
  with ``probe`` set, a second task meanwhile GETs that URL back to back and reports its worst
  latency: an upper bound on the longest event-loop stall of the server it probes.
- ``fanout``: ``n`` OCR requests one after the other, each with ``images`` fresh images.
- ``burst``: ``concurrency`` OCR requests at once, each with one fresh image of ``size`` bytes.
- ``idle``: ``n`` streams opened and held after their first chunk; reads ``pid``'s RSS then.
- ``mixed``: ``streams`` stream workers and ``ocr`` OCR workers loop for ``duration`` seconds
  (each stream worker's first stream, which opens its connection, is not recorded).
- ``sdk-retry``: scenario 12's ``cases``, each a streaming request through the ``openai`` SDK
  (``bench.retry.sdk_cases``).

``python -m bench.client --serve`` (the smoke run) reads one spec per line on stdin and answers
each with one line, ``{"result": ...}`` or ``{"error": traceback}``, until stdin closes: the
same measurements, each in a new event loop with new sessions, without a Python start-up each.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from . import payloads
from .fake import install_uvloop
from .retry import sdk_cases
from .stats import rss_kb, summary

Spec = dict[str, Any]
DONE = payloads.CHAT.end.encode()  # a chat stream's last event


def _body(spec: Spec) -> tuple[bytes, bytes]:
    """A payload and the end of its stream, from ``{"padded": size}``, ``{"file": path}``, or
    ``{API name: {...}}`` (``"chat"``, ``"messages"``, ``"responses"``: keyword arguments of its
    payloads function; chat when none is named)."""
    if "file" in spec:
        with open(spec["file"], "rb") as f:
            return f.read(), DONE
    if "padded" in spec:
        return payloads.padded(spec["padded"], stream=spec.get("stream", False)), DONE
    for name, api in payloads.API.items():
        if name in spec:
            return api.body(**spec[name]), api.end.encode()
    return payloads.chat(), DONE


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    end: bytes = DONE,
) -> tuple[float, float, int]:
    """(ttfb seconds, total seconds, status) for one request read to its end; a stream that
    never sends ``end`` (its last event: a Responses stream's carries the whole response, so
    look for it anywhere, not in the last bytes) is an error (599)."""
    started = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as response:
        first = await response.content.readany()
        ttfb = time.perf_counter() - started
        window, seen, keep = first, end in first, len(end)
        while True:
            piece = await response.content.readany()
            if not piece:
                break
            if not seen:  # ``end`` may straddle two pieces
                window = window[-keep:] + piece
                seen = end in window
        total = time.perf_counter() - started
        status = response.status
        if status == 200 and response.content_type == "text/event-stream":
            status = 200 if seen else 599
    return ttfb, total, status


def _report(results: list[tuple[float, float, int]], wall: float) -> Spec:
    ok = [r for r in results if r[2] == 200]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "per_s": len(ok) / wall if wall else 0.0,
        "ttfb": summary([r[0] for r in ok]),
        "total": summary([r[1] for r in ok]),
    }


async def _workers(count: int, work: Callable[[], Awaitable[None]]) -> None:
    async with asyncio.TaskGroup() as group:
        for _ in range(count):
            group.create_task(work())


def _session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=120)
    )


async def streams(spec: Spec) -> Spec:
    api = payloads.API[spec.get("api", "chat")]
    body, end = api.body(stream=True), api.end.encode()
    headers = {**api.headers, **spec.get("headers", {})}
    left = spec["requests"]
    results: list[tuple[float, float, int]] = []

    async def work() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            results.append(await _one(session, spec["url"], body, headers, end))

    async with _session() as session:
        await _one(session, spec["url"], body, headers, end)  # open one connection, warm up
        started = time.perf_counter()
        await _workers(spec["concurrency"], work)
        return _report(results, time.perf_counter() - started)


async def sequential(spec: Spec) -> Spec:
    body, end = _body(spec["body"])
    headers = spec.get("headers", {})
    results: list[tuple[float, float, int]] = []
    probe_worst = 0.0
    probes = 0
    running = True

    async def probe(session: aiohttp.ClientSession) -> None:
        nonlocal probe_worst, probes
        while running:
            started = time.perf_counter()
            async with session.get(spec["probe"]) as response:
                await response.read()
            probe_worst = max(probe_worst, time.perf_counter() - started)
            probes += 1

    async with _session() as session, _session() as probe_session:
        for _ in range(spec.get("warmup", 1)):
            await _one(session, spec["url"], body, headers, end)
        prober = asyncio.ensure_future(probe(probe_session)) if spec.get("probe") else None
        started = time.perf_counter()
        for _ in range(spec["n"]):
            results.append(await _one(session, spec["url"], body, headers, end))
        wall = time.perf_counter() - started
        running = False
        if prober is not None:
            await prober
    out = _report(results, wall)
    out["body_bytes"] = len(body)
    if spec.get("probe"):
        out["probe_worst_ms"] = probe_worst * 1000
        out["probes"] = probes
    return out


async def fanout(spec: Spec) -> Spec:
    results = []
    async with _session() as session:
        for _ in range(spec["n"]):
            body = payloads.chat(payloads.OCR_MODEL, images=spec["images"], size=spec["size"])
            results.append(await _one(session, spec["url"], body, {}))
    return _report(results, sum(r[1] for r in results))


async def burst(spec: Spec) -> Spec:
    size = spec["size"]
    bodies = [
        payloads.chat(payloads.OCR_MODEL, images=1, size=size) for _ in range(spec["concurrency"])
    ]
    model = spec.get("model")
    if model:  # the same bytes without OCR (for the bare relay baseline)
        bodies = [b.replace(b'"bench-ocr"', orjson.dumps(model), 1) for b in bodies]
    async with _session() as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(_one(session, spec["url"], b, {}) for b in bodies))
        wall = time.perf_counter() - started
    out = _report(list(results), wall)
    out["body_bytes"] = sum(len(b) for b in bodies)
    return out


async def idle(spec: Spec) -> Spec:
    body = payloads.chat(stream=True)
    headers = {"X-Bench-Chunks": "2", "X-Bench-Hold": str(spec["hold"])}
    opened = 0
    all_open = asyncio.Event()
    release = asyncio.Event()

    async def hold(session: aiohttp.ClientSession) -> None:
        nonlocal opened
        async with session.post(spec["url"], data=body, headers=headers) as response:
            await response.content.readany()
            opened += 1
            if opened == spec["n"]:
                all_open.set()
            await release.wait()

    async with _session() as session:
        before = rss_kb(spec["pid"])
        tasks = [asyncio.ensure_future(hold(session)) for _ in range(spec["n"])]
        try:
            await asyncio.wait_for(all_open.wait(), spec["hold"] - 1)
            await asyncio.sleep(spec.get("settle", 0.5))  # let the server settle
            during = rss_kb(spec["pid"])
        finally:
            release.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {"streams": opened, "rss_before_kb": before, "rss_held_kb": during}


async def mixed(spec: Spec) -> Spec:
    stream_body = payloads.chat(stream=True)
    headers = spec.get("headers", {})
    stream_results: list[tuple[float, float, int]] = []
    ocr_results: list[tuple[float, float, int]] = []
    streaming = True

    async def stream_worker() -> None:
        await _one(session, spec["url"], stream_body, headers)  # connect first: not recorded
        end = time.perf_counter() + spec["duration"]
        while True:  # at least one stream each, even if connecting took the whole duration
            stream_results.append(await _one(session, spec["url"], stream_body, headers))
            if time.perf_counter() >= end:
                break

    async def ocr_worker() -> None:
        while streaming:  # OCR load for as long as any stream is measured
            body = payloads.chat(payloads.OCR_MODEL, images=1, size=spec["size"])
            ocr_results.append(await _one(session, spec["url"], body, {}))

    async with _session() as session:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            ocr_tasks = [group.create_task(ocr_worker()) for _ in range(spec["ocr"])]
            await _workers(spec["streams"], stream_worker)
            wall = time.perf_counter() - started
            streaming = False
            await asyncio.gather(*ocr_tasks)
    return {"streams": _report(stream_results, wall), "ocr": _report(ocr_results, wall)}


KINDS: dict[str, Callable[[Spec], Awaitable[Spec]]] = {
    "streams": streams,
    "sequential": sequential,
    "fanout": fanout,
    "burst": burst,
    "idle": idle,
    "mixed": mixed,
    "sdk-retry": sdk_cases,
}


def serve() -> None:
    for line in sys.stdin.buffer:
        try:
            spec = orjson.loads(line)
            answer = {"result": asyncio.run(KINDS[spec["kind"]](spec))}
        except Exception:
            answer = {"error": traceback.format_exc()}
        sys.stdout.buffer.write(orjson.dumps(answer) + b"\n")
        sys.stdout.buffer.flush()


def main() -> None:
    install_uvloop()
    if sys.argv[1] == "--serve":
        serve()
        return
    spec = orjson.loads(sys.argv[1])
    result = asyncio.run(KINDS[spec["kind"]](spec))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()

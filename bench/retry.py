"""Scenario 12: does an SDK's retry of a 429 survive slow OCR? (``keepalive_after_s``)

A streaming request whose OCR step outlasts ``keepalive_after_s`` is committed early: the proxy
sends its 200 and keep-alives while the images are read, so that proxies and frontends in front
do not give up. An upstream error after that point can only be an error event inside the 200
stream, and an SDK does not retry that. This scenario measures when that happens.

For each fake OCR latency in ``DELAYS`` and each ``keepalive_after_s`` in ``KEEPALIVES`` (the old
default and the new one, each on a proxy of its own, ``Bench.variant``), the real ``openai`` SDK
(``max_retries=2``) streams one chat request with a fresh image through the proxy, whose text
upstream (the fake, ``X-Bench-Fail-Once``) answers the first call with a 429 (``retry-after-ms:
10``, so a retry comes at once) and later ones normally. Per case it reports whether the
stream was committed early (its headers are the early ones: no ``X-OCR-Ms``), what the SDK
ended with (the stream read to its end after a retry, or an ``APIError`` raised from inside
the stream) and how many calls the upstream got (from the fake, ``X-Bench-Calls``). All the
cases of a repeat run at once, so a repeat lasts about the longest latency. ``--quick`` and
``--smoke`` scale every latency and ``keepalive_after_s`` alike (``Settings.retry_scale``).

The SDK runs in the load driver (``bench.client``, kind ``sdk-retry``), not here: the runner
only starts processes and prints.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp

from . import payloads
from .stats import median

if TYPE_CHECKING:
    from .harness import Bench
    from .scenarios import Settings

DELAYS = (0.5, 2.0, 5.0, 10.0, 20.0)  # the fake OCR model's latency, seconds
KEEPALIVES = (3.0, 15.0)  # keepalive_after_s: the default before and since
MAX_RETRIES = 2
RETRIED = "read to its end after a retry"
IN_STREAM = "APIError in the stream (no status)"


def retry(b: Bench, s: Settings) -> dict[str, Any]:
    """Scenario 12 (see the module docstring)."""
    scale = s.retry_scale
    names = {ka: f"retry-keepalive-{ka:g}" for ka in KEEPALIVES}
    for ka, name in names.items():  # both start side by side
        b.variant(name, f"keepalive_after_s = {ka * scale}\nkeepalive_interval_s = {scale}\n")
    try:
        urls = {ka: b.target(name).at("/v1") for ka, name in names.items()}
        runs = []
        for r in range(s.repeats):
            cases = [
                {
                    "url": urls[ka],
                    "keepalive": ka,
                    "delay": delay,
                    "ocr_delay": delay * scale,
                    "token": f"{r}-{ka:g}-{delay:g}-{uuid.uuid4().hex[:8]}",
                }
                for ka in KEEPALIVES
                for delay in DELAYS
            ]
            spec = {"kind": "sdk-retry", "cases": cases, "fake": b.fake_base}
            runs.append(b.client(spec, timeout=max(DELAYS) * scale + 120)["cases"])
    finally:
        for name in names.values():
            b.retire(name)
    return _result(runs, scale)


def expected(case: dict[str, Any]) -> bool:
    """Whether a case ended as its commit says it must: early, an error in the stream after
    one upstream call; not early, the SDK's retry and a whole stream after two."""
    if case["committed"]:
        return case["outcome"] == IN_STREAM and case["upstream_calls"] == 1
    return case["outcome"] == RETRIED and case["upstream_calls"] == 2


def _result(runs: list[list[dict[str, Any]]], scale: float) -> dict[str, Any]:
    by_case: dict[tuple[float, float], list[dict[str, Any]]] = collections.defaultdict(list)
    for cases in runs:
        for case in cases:
            by_case[case["keepalive"], case["delay"]].append(case)
    shown = "" if scale == 1 else f" (both × {scale:g})"
    rows: list[dict[str, Any]] = []
    for (ka, delay), cases in by_case.items():
        outcomes = collections.Counter(c["outcome"] for c in cases)
        rows.append(
            {
                "metric": f"keepalive_after_s {ka:g} s, OCR {delay:g} s{shown}",
                "unit": "",
                "committed early": f"{sum(c['committed'] for c in cases)}/{len(cases)}",
                "SDK outcome": " / ".join(outcomes),
                "upstream calls": median([c["upstream_calls"] for c in cases]),
                "seconds": median([c["seconds"] for c in cases]),
            }
        )
    targets = []
    for ka in KEEPALIVES:
        cases = [c for (k, _), group in by_case.items() if k == ka for c in group]
        share = 100 * sum(c["committed"] for c in cases) / len(cases)
        rows.append(
            {
                "metric": f"keepalive_after_s {ka:g}: committed early (OCR latency uniform "
                f"over {', '.join(f'{d:g}' for d in DELAYS)} s)",
                "unit": "%",
                "committed early": share,
            }
        )
        targets.append(
            {
                "target": f"keepalive_after_s {ka:g}: streams committed early, so a 429 "
                "is not retried (share of the latencies; no numeric target)",
                "measured": round(share, 1),
                "unit": "%",
                "met": None,
            }
        )
    cases = [c for group in by_case.values() for c in group]
    kept = [c for c in cases if not c["committed"]]
    retried = sum(c["outcome"] == RETRIED for c in kept) / len(kept) if kept else 1.0
    targets.append(
        {
            "target": "streams not committed early whose 429 the SDK retried >= 1x",
            "measured": round(retried, 3),
            "unit": "x",
            "met": retried >= 1,
        }
    )
    errors = sum(not expected(c) for c in cases)
    return {"rows": rows, "targets": targets, "raw": {"runs": runs, "errors": errors}}


async def sdk_cases(spec: dict[str, Any]) -> dict[str, Any]:
    """The load driver's half (``bench.client`` kind ``sdk-retry``): every case at once, then
    the upstream calls each one cost, from the fake."""
    import openai  # only this scenario needs the SDK: not imported by the other kinds

    results = await asyncio.gather(*(_case(openai, case) for case in spec["cases"]))
    async with aiohttp.ClientSession() as session:
        for case, result in zip(spec["cases"], results, strict=True):
            headers = {"X-Bench-Calls": case["token"]}
            async with session.get(spec["fake"] + "/bench/calls", headers=headers) as response:
                result["upstream_calls"] = (await response.json(content_type=None))["calls"]
    return {"cases": list(results)}


async def _case(openai: Any, case: dict[str, Any]) -> dict[str, Any]:
    """One streaming request through the SDK, as an application makes it."""
    client = openai.AsyncOpenAI(base_url=case["url"], api_key="sk-bench", max_retries=MAX_RETRIES)
    out: dict[str, Any] = {k: case[k] for k in ("keepalive", "delay", "token")}
    out.update(committed=False, retries=0, chunks=0)
    started = time.perf_counter()
    image = {"type": "image_url", "image_url": {"url": payloads.image_url(2048)}}
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=payloads.OCR_MODEL,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Read it"}, image]}],
            stream=True,
            extra_body={"ocr_model": f"vision-delay-{case['ocr_delay']:g}"},
            extra_headers={"X-Bench-Fail-Once": case["token"], "X-Bench-Chunks": "3"},
        )
        out["headers_s"] = time.perf_counter() - started
        out["committed"] = "x-ocr-ms" not in raw.headers  # the early headers lack the report
        out["retries"] = raw.retries_taken
        async for _ in raw.parse():
            out["chunks"] += 1
        out["outcome"] = RETRIED if out["retries"] else "read to its end, no retry"
    except openai.APIStatusError as exc:  # an HTTP error status, after the SDK's retries
        out["outcome"] = f"{type(exc).__name__} {exc.status_code}"
    except openai.APIError:  # raised from an error event inside a 200 stream
        out["outcome"] = IN_STREAM
    finally:
        await client.close()
    out["seconds"] = time.perf_counter() - started
    return out

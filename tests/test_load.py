"""A bounded load test on loopback against a real `ocrproxy serve` process: 200 concurrent
streams plus 50 OCR requests complete with no errors, no fd growth, and no blocking call on the
event loop (the proxy's own watchdog logs every stall with the CPU time its loop used).

How long the loop stays busy with a burst of 250 requests arriving in the same millisecond is a
speed figure, not a correctness one: loop stalls belong to ``python -m bench`` (scenario 4
reports the longest one, for large requests), not to an assertion here, where they depend on the
machine (on the 2-core build machine the burst keeps the loop busy for 100-250 ms in one go on
this code and on the code before the hardening round alike)."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import orjson

from tests.conftest import chat, spawn_proxy
from tests.fakes import data_url, image_part

URL = "/v1/chat/completions"


def proxy_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_200_streams_and_50_ocr_requests(fake, tmp_path):
    fake.chunks, fake.chunk_delay, fake.ocr_delay = 10, 0.02, 0.05
    config = f"""
[server]
stall_warning_ms = 100
[[upstreams]]
base_url = "{fake.url}"
check_models = false
[ocr]
model = "vision-1"
max_concurrency = 16
"""
    async with spawn_proxy(tmp_path, config) as (proc, base, _, log_path):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=300)) as session:

            async def stream(i: int) -> bytes:
                async with session.post(base + URL, json=chat("m", f"s{i}", stream=True)) as r:
                    assert r.status == 200
                    return await r.read()

            async def ocr(i: int) -> int:
                img = image_part(data_url(f"load{i % 25}", size=20_000))
                async with session.post(base + URL, json=chat("m-ocr", "what?", img)) as r:
                    body = await r.json()
                    assert "A picture showing" in body["choices"][0]["message"]["content"]
                    return r.status

            async def round_() -> None:
                results = await asyncio.wait_for(
                    asyncio.gather(*(stream(i) for i in range(200)), *(ocr(i) for i in range(50))),
                    timeout=45,
                )
                assert all(body.endswith(b"data: [DONE]\n\n") for body in results[:200])
                assert results[200:] == [200] * 50

            await round_()
            assert len(fake.ocr_calls) == 25  # 50 requests, 25 distinct images
            await round_()
            await asyncio.sleep(0.3)
            assert len(fake.ocr_calls) == 25  # the second round is all cache hits
            # 500 requests, at most 250 at a time: one client socket and one pooled upstream
            # socket per concurrent request, plus a few. A leak per request would pass 750.
            assert proxy_fds(proc.pid) <= 2 * 250 + 30

    lines = [orjson.loads(line) for line in log_path.read_text().splitlines()]
    # A blocking call (a sleep, a file or socket operation on the loop) stalls the loop while
    # its thread uses little CPU. A stall with the CPU busy is the proxy working through the
    # burst (see the module doc); one with neither is the shared machine starving the process.
    stalls = [line for line in lines if "stalled" in line["msg"]]
    blocked = [s for s in stalls if s["stalled_ms"] >= 300 and s["cpu_ms"] < s["stalled_ms"] / 2]
    assert blocked == []
    assert sum(1 for line in lines if line.get("route") == URL and line["status"] == 200) == 500


async def test_watchdog_reports_a_blocked_loop(caplog):
    import time

    from ocrproxy.app import _watch_loop

    watcher = asyncio.get_running_loop().create_task(_watch_loop(0.1, period_s=0.01))
    await asyncio.sleep(0.05)
    assert not [r for r in caplog.records if "stalled" in r.getMessage()]
    time.sleep(0.25)  # block the loop on purpose
    await asyncio.sleep(0.05)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    stalls = [r for r in caplog.records if "stalled" in r.getMessage()]
    assert len(stalls) == 1 and stalls[0].fields["stalled_ms"] >= 200
    assert stalls[0].fields["cpu_ms"] < 50  # it slept: no CPU burnt


async def test_watchdog_tells_busy_code_from_a_sleep(caplog):
    import time

    from ocrproxy.app import _watch_loop

    watcher = asyncio.get_running_loop().create_task(_watch_loop(0.1, period_s=0.01))
    await asyncio.sleep(0.05)
    end = time.thread_time() + 0.25
    while time.thread_time() < end:  # burn CPU on the loop's thread
        pass
    await asyncio.sleep(0.05)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    (stall,) = [r for r in caplog.records if "stalled" in r.getMessage()]
    assert stall.fields["cpu_ms"] >= 200

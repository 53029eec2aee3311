"""Faults in the shared cache tiers, shown against a real redis-server and SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ocrproxy import config
from ocrproxy.cache import Description, DescriptionCache, MemoryLRU
from ocrproxy.tiers import RedisTier, SqliteTier, open_tier
from tests.conftest import require_binary
from tests.servers import redis_server

D = Description(text="A cat on a mat.", model="vision-1")


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    binary = require_binary("redis-server")
    with redis_server(binary, tmp_path / "redis") as port:
        yield port


async def test_a_claim_is_released_even_after_a_brief_redis_outage(
    redis_port: int,
) -> None:
    """Guards against this: Instance A claims an image; a short Redis blip (any one slow call) marks the tier down
    for retry_s; A's OCR call finishes inside that window. A's set() returns early and never
    releases its claim, so instance B waits for the whole lock (the OCR timeout) for a value
    that will never be written."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    a = RedisTier(url, prefix="t:", lock_s=2.0)
    b = RedisTier(url, prefix="t:", lock_s=2.0, poll_s=0.02)
    probe = aioredis.Redis(port=redis_port)
    try:
        assert await a.get(b"\x01") is None  # A claims
        a._down_until = time.monotonic() + a.retry_s  # what _call does after one failed call
        await a.set(b"\x01", D, ttl_s=60)  # A's OCR answer arrives during the blip
        assert await probe.exists("t:lock:01") == 0, "A's claim outlived its OCR call"
        started = time.monotonic()
        assert await b.get(b"\x01") is None
        waited = time.monotonic() - started
        # B should find the key unclaimed at once (or the value); instead it waits out the lock.
        assert waited < 0.5, f"instance B waited {waited:.2f} s for an abandoned claim"
    finally:
        await a.close()
        await b.close()
        await probe.aclose()


async def test_a_claim_is_renewed_while_its_holder_works(
    redis_port: int,
) -> None:
    """Guards against this: open_tier() makes the claim last exactly [ocr] timeout_s, but one describe() can take
    (retries + 1) x timeout_s plus backoff plus the wait for a concurrency slot. The claim
    lapses while A is still working, B claims and pays for the same image too."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    settings = config.Cache(backend="redis", redis_url=url, redis_prefix="t2:")
    ocr_timeout_s = 0.4  # [ocr] timeout_s; [ocr] retries = 2 by default
    calls: list[str] = []

    def cache() -> DescriptionCache:
        tier = open_tier(settings, ocr_timeout_s)
        assert isinstance(tier, RedisTier)
        tier.poll_s = 0.02
        return DescriptionCache(MemoryLRU(100, 1 << 20, 60), tier)

    async def slow_create(name: str) -> Description:
        calls.append(name)
        # first attempt times out (timeout_s), the retry succeeds: well within the rules
        await asyncio.sleep(ocr_timeout_s * 1.5)
        return D

    a, b = cache(), cache()
    try:
        task_a = asyncio.create_task(a.get_or_create(b"k", lambda: slow_create("A")))
        await asyncio.sleep(0.05)  # A holds the claim
        task_b = asyncio.create_task(b.get_or_create(b"k", lambda: slow_create("B")))
        await asyncio.gather(task_a, task_b)
        assert calls == ["A"], f"the same image was paid for by {calls}"
    finally:
        await a.close()
        await b.close()


async def test_sqlite_hit_stays_a_hit_while_another_worker_holds_the_write_lock(
    tmp_path: Path,
) -> None:
    """Guards against this: A stored description older than touch_after_s is read, then the optional 'touch' UPDATE
    waits for the write lock; when another worker process holds it past busy_timeout the whole
    read fails and get() reports a miss, so the proxy pays the OCR model again for an image it
    has on disk."""
    path = str(tmp_path / "c.sqlite3")
    now = [1000.0]
    tier = SqliteTier(path, 100, busy_timeout_s=0.3, clock=lambda: now[0])
    await tier.open()
    await tier.set(b"k", D, ttl_s=10_000)
    now[0] += 3600  # an hour later: older than touch_after_s (600 s)
    other = sqlite3.connect(path, isolation_level=None)  # another worker, mid-write
    other.execute("BEGIN IMMEDIATE")
    try:
        assert await tier.get(b"k") == D, "the row is there and readable (WAL), yet get() missed"
    finally:
        other.execute("ROLLBACK")
        other.close()
        await tier.close()


async def test_sqlite_reads_do_not_queue_behind_a_blocked_write(tmp_path: Path) -> None:
    """Guards against this: Every call shares one thread and has no time bound: while one set() waits busy_timeout
    for another process's write lock, a plain read of an unrelated cached key waits too. The
    module promises a slow tier is treated as a miss, never a hang."""
    path = str(tmp_path / "c.sqlite3")
    tier = SqliteTier(path, 100, busy_timeout_s=2.0)
    await tier.open()
    await tier.set(b"cached", D, ttl_s=10_000)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        blocked = asyncio.create_task(tier.set(b"new", D, ttl_s=10_000))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        assert await tier.get(b"cached") == D
        waited = time.monotonic() - started
        assert waited < 0.5, f"a cached read waited {waited:.2f} s behind someone else's write"
    finally:
        other.execute("ROLLBACK")
        other.close()
        await blocked
        await tier.close()


async def test_workers_opening_a_new_sqlite_file_together_all_succeed(tmp_path: Path) -> None:
    """Several processes switching a fresh file to WAL at once get "database is locked" straight
    away (no busy timeout for that); each must retry instead of failing its start-up."""
    import subprocess
    import sys

    path = str(tmp_path / "new.sqlite3")
    code = (
        "import asyncio, sys, time\n"
        "from ocrproxy.tiers import SqliteTier\n"
        "async def main():\n"
        "    tier = SqliteTier(sys.argv[1], 100)\n"
        "    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together\n"
        "    await tier.open()\n"
        "    await tier.close()\n"
        "asyncio.run(main())\n"
    )
    for round_ in range(5):
        fresh, start = f"{path}.{round_}", str(time.time() + 1.0)
        procs = [
            subprocess.Popen([sys.executable, "-c", code, fresh, start], stderr=subprocess.PIPE)
            for _ in range(8)
        ]
        errors = [p.communicate(timeout=30)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, errors

"""The sqlite and redis cache tiers, against a real SQLite file and a real redis-server."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from ocrproxy import config, logs
from ocrproxy.cache import Description
from ocrproxy.tiers import RedisTier, SqliteTier
from tests.conftest import ProxyFactory, chat, require_binary
from tests.fakes import FakeOpenAI, data_url, image_part
from tests.servers import free_port, redis_server

D = Description(text="A cat on a mat.", model="vision-1", prompt_tokens=3, completion_tokens=4)


def ocr_request(label: str) -> dict[str, Any]:
    return chat("gpt-3.5-turbo-ocr", "what is it?", image_part(data_url(label)))


class JsonLines(logging.Handler):
    """Formats each record at emit time (inside the request's context), as production does."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(self.format(record)))


@pytest.fixture
def cache_log() -> Iterator[JsonLines]:
    handler = JsonLines()
    logger = logging.getLogger("ocrproxy.cache")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --- sqlite -----------------------------------------------------------------------------------


async def test_sqlite_roundtrip_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "cache.sqlite3")
    tier = SqliteTier(path, max_entries=100)
    await tier.open()
    assert await tier.get(b"k") is None
    await tier.set(b"k", D, ttl_s=60)
    assert await tier.get(b"k") == D
    await tier.close()

    again = SqliteTier(path, max_entries=100)
    assert await again.get(b"k") == D
    await again.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_sqlite_expiry_and_eviction(tmp_path: Path) -> None:
    now = [1000.0]
    tier = SqliteTier(
        str(tmp_path / "c.db"), max_entries=3, evict_every=1, touch_after_s=0, clock=lambda: now[0]
    )
    await tier.set(b"old", D, ttl_s=10)
    now[0] += 11
    assert await tier.get(b"old") is None  # expired
    for i in range(3):
        now[0] += 1
        await tier.set(b"k%d" % i, D, ttl_s=100)
    now[0] += 1
    assert await tier.get(b"k0") == D  # k0 is now the most recently used
    now[0] += 1
    await tier.set(b"k3", D, ttl_s=100)
    assert await tier.count() == 3
    assert await tier.get(b"k1") is None  # least recently used went first
    assert await tier.get(b"k0") == D
    assert await tier.get(b"k3") == D
    await tier.close()


async def test_sqlite_locked_file_does_not_block_the_event_loop(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    tier = SqliteTier(path, max_entries=100, busy_timeout_s=0.6)
    await tier.open()
    other = sqlite3.connect(path, isolation_level=None)  # another worker process, say
    other.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.get_running_loop().create_task(ticker())
    try:
        started = time.monotonic()
        await tier.set(b"k", D, ttl_s=60)  # waits for the lock on its own thread, then gives up
        elapsed = time.monotonic() - started
    finally:
        task.cancel()
        other.rollback()
        other.close()
    assert elapsed >= 0.5
    assert ticks >= 20  # the loop kept running while the write waited
    await tier.set(b"k", D, ttl_s=60)
    assert await tier.get(b"k") == D
    await tier.close()


async def test_sqlite_reads_go_on_while_another_process_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    tier = SqliteTier(path, max_entries=100, busy_timeout_s=3)
    await tier.set(b"k", D, ttl_s=60)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    try:
        started = time.monotonic()
        assert await tier.get(b"k") == D
        assert time.monotonic() - started < 0.5  # not the 3 s busy timeout
    finally:
        other.rollback()
        other.close()
    await tier.close()


async def test_sqlite_two_instances_share_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    a, b = SqliteTier(path, 1000), SqliteTier(path, 1000)
    await asyncio.gather(*(t.set(b"%d" % i, D, 60) for i in range(50) for t in (a, b)))
    assert await a.count() == 50
    assert all(await asyncio.gather(*(b.get(b"%d" % i) for i in range(50))))
    await a.close()
    await b.close()


async def test_sqlite_backend_keeps_descriptions_across_restarts(
    make_proxy: ProxyFactory, fake: FakeOpenAI, tmp_path: Path
) -> None:
    settings = {"backend": "sqlite", "path": str(tmp_path / "cache.sqlite3")}
    first = await make_proxy(cache=settings)
    resp = await first.post("/v1/chat/completions", json=ocr_request("receipt"))
    assert resp.status == 200
    assert fake.ocr_calls == ["receipt"]
    await first.close()  # the process stops: its memory LRU is gone

    second = await make_proxy(cache=settings)
    resp = await second.post("/v1/chat/completions", json=ocr_request("receipt"))
    assert resp.status == 200
    assert resp.headers["X-OCR-Cache-Hits"] == "1"
    assert fake.ocr_calls == ["receipt"]  # not paid twice
    assert "A picture showing receipt." in fake.chat_requests[-1].body.decode()


def test_sqlite_path_defaults_to_the_state_directory() -> None:
    raw = {"cache": {"backend": "sqlite"}}
    cfg = config.from_mapping(raw, env={"STATE_DIRECTORY": "/var/lib/ocrproxy"})
    assert cfg.cache.path == "/var/lib/ocrproxy/descriptions.sqlite3"


@pytest.mark.parametrize(
    ("cache", "server", "needle"),
    [
        ({"backend": "redis"}, {}, "$.cache.redis_url"),
        ({"backend": "redis", "redis_url": "http://x"}, {}, "$.cache.redis_url"),
        ({"backend": "disk"}, {}, "$.cache.backend"),
        ({"tier_max_entries": 0}, {}, "$.cache.tier_max_entries"),
        ({}, {"workers": 0}, "$.server.workers"),
        ({}, {"metrics_port": 70000}, "$.server.metrics_port"),
        ({}, {"metrics_port": 8080}, "$.server.metrics_port"),
    ],
)
def test_cache_and_server_settings_are_validated(
    cache: dict[str, Any], server: dict[str, Any], needle: str
) -> None:
    with pytest.raises(config.ConfigError, match=needle.replace("$", r"\$")):
        config.from_mapping({"cache": cache, "server": server}, env={})


def test_redis_password_is_masked() -> None:
    cfg = config.from_mapping(
        {"cache": {"backend": "redis", "redis_url": "redis://:hunter2@10.0.0.5:6379/0"}}, env={}
    )
    assert config.masked(cfg)["cache"]["redis_url"] == "redis://:****@10.0.0.5:6379/0"


# --- redis ------------------------------------------------------------------------------------


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    binary = require_binary("redis-server")
    with redis_server(binary, tmp_path / "redis") as port:
        yield port


@pytest.fixture
async def redis_client(redis_port: int) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_port)
    yield client
    await client.aclose()


async def test_redis_roundtrip_with_ttl(redis_port: int, redis_client: aioredis.Redis) -> None:
    tier = RedisTier(f"redis://127.0.0.1:{redis_port}/0", prefix="t:")
    assert await tier.ping()
    assert await tier.get(b"\x01") is None  # a miss claims the key...
    assert await redis_client.exists("t:lock:01") == 1
    await tier.set(b"\x01", D, ttl_s=30)
    assert await redis_client.exists("t:lock:01") == 0  # ...and storing the value releases it
    assert 25_000 < await redis_client.pttl("t:d:01") <= 30_000
    assert await tier.get(b"\x01") == D
    await tier.close()


async def test_redis_waiter_gets_the_holders_value(redis_port: int) -> None:
    url = f"redis://127.0.0.1:{redis_port}/0"
    a, b = RedisTier(url, lock_s=5), RedisTier(url, lock_s=5)
    assert await a.get(b"k") is None  # instance A pays
    waiter = asyncio.get_running_loop().create_task(b.get(b"k"))
    await asyncio.sleep(0.2)
    assert not waiter.done()  # B waits instead of paying too
    await a.set(b"k", D, 60)
    assert await asyncio.wait_for(waiter, 2) == D
    await a.close()
    await b.close()


async def test_redis_released_claim_passes_to_a_waiter(redis_port: int) -> None:
    url = f"redis://127.0.0.1:{redis_port}/0"
    a, b = RedisTier(url, lock_s=5), RedisTier(url, lock_s=5)
    assert await a.get(b"k") is None
    waiter = asyncio.get_running_loop().create_task(b.get(b"k"))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await a.release(b"k")  # A's OCR call failed
    assert await asyncio.wait_for(waiter, 2) is None  # B now holds the claim and pays
    assert time.monotonic() - started < 1.0
    await b.set(b"k", D, 60)
    assert await a.get(b"k") == D
    await a.close()
    await b.close()


async def test_redis_crashed_holder_blocks_nobody_past_the_lock(redis_port: int) -> None:
    url = f"redis://127.0.0.1:{redis_port}/0"
    crashed, b = RedisTier(url, lock_s=1.0), RedisTier(url, lock_s=1.0)
    assert await crashed.get(b"k") is None
    await crashed.close()  # it dies holding the claim (its renewals stop with it)
    started = time.monotonic()
    assert await b.get(b"k") is None
    elapsed = time.monotonic() - started
    assert 0.7 < elapsed < 2.0
    await b.close()


async def test_redis_two_instances_pay_once(
    make_proxy: ProxyFactory, fake: FakeOpenAI, redis_port: int
) -> None:
    fake.ocr_delay = 0.5
    settings = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"}
    one, two = await make_proxy(cache=settings), await make_proxy(cache=settings)
    r1, r2 = await asyncio.gather(
        one.post("/v1/chat/completions", json=ocr_request("chart")),
        two.post("/v1/chat/completions", json=ocr_request("chart")),
    )
    assert (r1.status, r2.status) == (200, 200)
    assert fake.ocr_calls == ["chart"]
    bodies = [r.body.decode() for r in fake.chat_requests]
    assert all("A picture showing chart." in b for b in bodies) and len(bodies) == 2


async def test_redis_down_falls_back_to_memory_and_reconnects(
    make_proxy: ProxyFactory, fake: FakeOpenAI, tmp_path: Path, cache_log: JsonLines
) -> None:
    binary = require_binary("redis-server")
    port = free_port()
    settings = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0"}
    proxy = await make_proxy(cache=settings)
    started = time.monotonic()
    resp = await proxy.post(
        "/v1/chat/completions", json=ocr_request("a"), headers={"X-Request-Id": "req-down"}
    )
    assert resp.status == 200
    assert time.monotonic() - started < 1.5
    assert fake.ocr_calls == ["a"]
    warnings = [line for line in cache_log.lines if line["level"] == "warning"]
    assert warnings and "redis cache unavailable" in warnings[0]["msg"]
    assert warnings[0]["request_id"] == "req-down"

    with redis_server(binary, tmp_path / "redis", port):
        await asyncio.sleep(2.1)  # the tier retries after retry_s
        resp = await proxy.post("/v1/chat/completions", json=ocr_request("b"))
        assert resp.status == 200
        client = aioredis.Redis(port=port)
        try:
            assert len(await client.keys("ocrproxy:d:*")) == 1  # "b" reached Redis
        finally:
            await client.aclose()
        assert any("reachable again" in line["msg"] for line in cache_log.lines)


async def test_redis_slow_answers_within_the_short_timeout(
    make_proxy: ProxyFactory, fake: FakeOpenAI, redis_client: aioredis.Redis, redis_port: int
) -> None:
    settings = {
        "backend": "redis",
        "redis_url": f"redis://127.0.0.1:{redis_port}/0",
        "redis_timeout_s": 0.3,
    }
    proxy = await make_proxy(cache=settings)
    stall = asyncio.get_running_loop().create_task(
        redis_client.execute_command("DEBUG", "SLEEP", "2")
    )
    await asyncio.sleep(0.1)
    started = time.monotonic()
    resp = await proxy.post("/v1/chat/completions", json=ocr_request("slow"))
    elapsed = time.monotonic() - started
    await stall
    assert resp.status == 200
    assert elapsed < 1.2  # not the 2 s Redis was stuck for
    assert fake.ocr_calls == ["slow"]


async def test_readyz_reports_the_tier(
    make_proxy: ProxyFactory, tmp_path: Path, redis_port: int
) -> None:
    good = await make_proxy(
        cache={"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"}
    )
    resp = await good.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["cache"] == {"backend": "redis", "reachable": True}
    bad = await make_proxy(
        cache={"backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    resp = await bad.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["cache"] == {"backend": "redis", "reachable": False}


async def test_failed_ocr_call_releases_the_redis_claim(
    make_proxy: ProxyFactory,
    fake: FakeOpenAI,
    redis_port: int,
    redis_client: aioredis.Redis,
) -> None:
    fake.ocr_fail = {"bad"}
    settings = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"}
    proxy = await make_proxy(cache=settings)
    resp = await proxy.post("/v1/chat/completions", json=ocr_request("bad"))
    assert resp.status == 200  # placeholder policy
    assert fake.ocr_calls == ["bad"]
    assert await redis_client.keys("ocrproxy:lock:*") == []  # nobody waits for a dead claim
    assert await redis_client.keys("ocrproxy:d:*") == []  # and a failure is not cached

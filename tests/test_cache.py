"""Description cache: LRU bounds, TTL, single-flight, failures, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from ocrproxy.cache import Description, DescriptionCache, MemoryLRU, dump, load


def d(text: str) -> Description:
    return Description(text=text, model="m", prompt_tokens=1, completion_tokens=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lru_evicts_least_recently_used_by_count():
    lru = MemoryLRU(max_entries=2, max_bytes=10**6, ttl_s=60)
    lru.put(b"a", d("A"))
    lru.put(b"b", d("B"))
    assert lru.get(b"a") == d("A")  # a is now the most recent
    lru.put(b"c", d("C"))
    assert lru.get(b"b") is None
    assert lru.get(b"a") == d("A") and lru.get(b"c") == d("C")
    assert len(lru) == 2


def test_lru_is_bounded_by_bytes():
    lru = MemoryLRU(max_entries=100, max_bytes=3000, ttl_s=60)
    for i in range(10):
        lru.put(bytes([i]), d("x" * 1000))
    assert lru.bytes <= 3000
    assert 1 <= len(lru) <= 2
    assert lru.get(bytes([9])) is not None
    lru.put(b"huge", d("y" * 5000))  # larger than the whole cache: not stored
    assert lru.get(b"huge") is None and lru.bytes <= 3000


def test_lru_entries_expire():
    clock = Clock()
    lru = MemoryLRU(max_entries=10, max_bytes=10**6, ttl_s=60, clock=clock)
    lru.put(b"k", d("v"))
    clock.now += 59
    assert lru.get(b"k") == d("v")
    clock.now += 2
    assert lru.get(b"k") is None
    assert len(lru) == 0 and lru.bytes == 0


def test_serialisation_round_trip():
    assert load(dump(d("héllo"))) == d("héllo")


async def test_single_flight_shares_one_call():
    cache = DescriptionCache(MemoryLRU(10, 10**6, 60))
    calls = 0
    gate = asyncio.Event()

    async def create() -> Description:
        nonlocal calls
        calls += 1
        await gate.wait()
        return d("shared")

    tasks = [asyncio.ensure_future(cache.get_or_create(b"k", create)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert cache.in_flight == 1
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert [r[0] for r in results] == [d("shared")] * 5
    assert sorted(r[1] for r in results) == [False, True, True, True, True]
    assert cache.in_flight == 0
    assert await cache.get_or_create(b"k", create) == (d("shared"), True)
    assert calls == 1


async def test_failure_reaches_every_waiter_and_is_not_cached():
    cache = DescriptionCache(MemoryLRU(10, 10**6, 60))
    attempts = 0

    async def failing() -> Description:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    results = await asyncio.gather(
        *(cache.get_or_create(b"k", failing) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)
    assert attempts == 1
    with pytest.raises(RuntimeError):
        await cache.get_or_create(b"k", failing)
    assert attempts == 2


async def test_flight_is_cancelled_when_its_last_waiter_leaves():
    cache = DescriptionCache(MemoryLRU(10, 10**6, 60))
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> Description:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return d("never")

    first = asyncio.ensure_future(cache.get_or_create(b"k", slow))
    second = asyncio.ensure_future(cache.get_or_create(b"k", slow))
    await started.wait()
    first.cancel()
    await asyncio.sleep(0.01)
    assert not cancelled.is_set()  # the second waiter still wants it
    second.cancel()
    await asyncio.wait_for(cancelled.wait(), 1)
    assert cache.in_flight == 0


async def test_close_cancels_flights():
    cache = DescriptionCache(MemoryLRU(10, 10**6, 60))

    async def slow() -> Description:
        await asyncio.sleep(10)
        return d("x")

    waiter = asyncio.ensure_future(cache.get_or_create(b"k", slow))
    await asyncio.sleep(0.01)
    await cache.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter

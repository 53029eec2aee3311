"""Description cache: an in-memory LRU with a TTL, bounded by entries and bytes, with single-flight.

Theory of operation: a key is the digest of (OCR model, prompt, image identity, detail, and
under ``[cache] scope = "per_key"`` the client's credential), built by ``describe.Describer.key``.
``get_or_create`` answers from memory when it can; otherwise it joins the *flight* already
running for that key, or starts one. A flight is one task that asks an optional shared tier (see
``Tier``) and then calls the OCR model; every request waiting for the key awaits the same task,
so concurrent requests for one image pay for one OCR call. A flight is known by the cache key
unless the caller names a narrower flight key (the describer does when the OCR call carries the
client's own credential, so that a client the upstream refuses fails no other client's image);
whichever flight answers, the answer is stored under the cache key. A flight that fails is not
cached and every waiter sees the error. Waiters are counted: when the last one goes away (its
client disconnected), the flight is cancelled, because nobody would read its answer.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from . import timeline


class Description(msgspec.Struct, frozen=True):
    """What the OCR model said about one image, and what it cost."""

    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Description).decode


def dump(value: Description) -> bytes:
    return _encode(value)


def load(data: bytes) -> Description:
    return _decode(data)


class Tier(Protocol):
    """A shared or persistent store behind the memory LRU (sqlite, redis).

    A tier never raises: a failure is a miss. On a miss, ``get`` may *claim* the key for this
    process (so other instances wait for its answer); the claim ends with ``set``, or with
    ``release`` when the OCR call failed or was cancelled.
    """

    name: str

    async def get(self, key: bytes) -> Description | None: ...

    async def set(self, key: bytes, value: Description, ttl_s: float) -> None: ...

    async def release(self, key: bytes) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def _cost(value: Description) -> int:
    return sys.getsizeof(value.text) + 128


class MemoryLRU:
    """Least-recently-used map with a time-to-live, bounded by entry count and approximate bytes."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._data: OrderedDict[bytes, tuple[float, int, Description]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> Description | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, cost, value = item
        if expires <= self._clock():
            del self._data[key]
            self.bytes -= cost
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: bytes, value: Description) -> None:
        cost = _cost(value)
        if cost > self.max_bytes or self.max_entries == 0:
            return
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._data[key] = (self._clock() + self.ttl_s, cost, value)
        self.bytes += cost
        while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, evicted, _) = self._data.popitem(last=False)
            self.bytes -= evicted


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[tuple[Description, bool]]
    waiters: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    joins: int = 0
    tier_hits: int = 0


@dataclass
class DescriptionCache:
    """Memory LRU in front of an optional tier, with single-flight per key."""

    lru: MemoryLRU
    tier: Tier | None = None
    stats: CacheStats = field(default_factory=CacheStats)
    on_lookup: Callable[[str, str], None] | None = None  # (tier, "hit"|"miss"|"join"), for metrics
    _flights: dict[bytes, _Flight] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def get_memory(self, key: bytes) -> Description | None:
        """The description held in memory for ``key``, counted as a hit; None (not counted) if
        there is none, for ``get_or_create`` to look up and count."""
        hit = self.lru.get(key)
        if hit is not None:
            self.stats.hits += 1
            self._count("memory", "hit")
        return hit

    async def get_or_create(
        self,
        key: bytes,
        create: Callable[[], Awaitable[Description]],
        flight_key: bytes | None = None,
    ) -> tuple[Description, bool]:
        """Return ``(description, was_cached)``; ``was_cached`` is False only for the caller
        whose flight actually called ``create``.

        ``flight_key`` (default: ``key``) says which callers may share one ``create``: the
        answer is stored under ``key`` whichever flight produced it.
        """
        hit = self.get_memory(key)
        if hit is not None:
            return hit, True
        if flight_key is None:
            flight_key = key
        flight = self._flights.get(flight_key)
        joined = flight is not None
        self._count("memory", "join" if joined else "miss")
        if flight is None:
            task = asyncio.get_running_loop().create_task(self._fill(key, create))
            flight = self._flights[flight_key] = _Flight(task)
            task.add_done_callback(functools.partial(self._landed, flight_key, flight))
        else:
            self.stats.joins += 1
        flight.waiters += 1
        try:
            value, cached = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()
                if self._flights.get(flight_key) is flight:  # a newcomer starts a fresh one
                    del self._flights[flight_key]
        return value, cached or joined

    def _landed(self, key: bytes, flight: _Flight, _: object) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved here: waiters that left must not leave it unread

    async def _fill(
        self, key: bytes, create: Callable[[], Awaitable[Description]]
    ) -> tuple[Description, bool]:
        if self.tier is not None:
            stored = await self.tier.get(key)
            self._count(self.tier.name, "miss" if stored is None else "hit")
            if stored is not None:
                self.stats.tier_hits += 1
                self.lru.put(key, stored)
                return stored, True
        self.stats.misses += 1
        try:
            value = await create()
        except BaseException:
            if self.tier is not None:
                await self.tier.release(key)
            raise
        self.lru.put(key, value)
        if self.tier is not None:
            await self.tier.set(key, value, self.lru.ttl_s)
        return value, False

    def _count(self, tier: str, result: str) -> None:
        timeline.step("cache", tier=tier, result=result)
        if self.on_lookup is not None:
            self.on_lookup(tier, result)

    async def close(self) -> None:
        """Cancel every flight and close the tier."""
        flights = [f.task for f in self._flights.values()]
        for task in flights:
            task.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
        if self.tier is not None:
            await self.tier.close()

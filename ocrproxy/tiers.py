"""Shared cache tiers behind the memory LRU: a SQLite file and Redis.

Theory of operation: a tier is a second chance before paying for an OCR call. It must never
make a request fail or hang: every error or slow answer is logged as a warning (tagged with the
request id) and treated as a miss, and the request goes on with the memory tier alone.

- ``SqliteTier`` keeps descriptions in one file so they survive restarts. Reads run on one
  dedicated thread and connection, writes on another, so the event loop never blocks on disk and
  (WAL mode) a write waiting for another process's lock delays no lookup. A busy timeout lets
  several worker processes share the file. The table is bounded: expired rows and, past
  ``max_entries``, the least recently used ones are deleted as new rows arrive. "Recently used"
  is kept to ``touch_after_s``, so most reads take no write lock; the touch is queued on the
  write thread and never turns a hit into a miss.
- ``RedisTier`` is shared by every instance. Values carry a TTL. On a miss, ``get`` *claims*
  the key with a short lock (``SET NX PX``) so other instances wait for this one's answer
  instead of paying for the same image; a waiter polls until the value appears, the claim is
  released (the holder failed) or expires (the holder crashed), and then claims it itself. The
  holder renews its claim while it works (waiting for a concurrency slot, retrying), so a live
  holder never loses it, and a crashed one blocks nobody past ``lock_s``. A claim is always
  released, even while the tier is marked down. After a Redis failure the tier is skipped for
  ``retry_s`` seconds, then tried again: the client's pool reconnects by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from . import config
from .cache import Description, Tier, dump, load

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("ocrproxy.cache")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS descriptions (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL NOT NULL,
    used REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS descriptions_used ON descriptions (used);
"""


class SqliteTier:
    """Descriptions in a SQLite file, accessed from one worker thread."""

    name = "sqlite"

    def __init__(
        self,
        path: str,
        max_entries: int,
        *,
        busy_timeout_s: float = 5.0,
        evict_every: int = 64,
        touch_after_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_entries = max_entries
        self.busy_timeout_s = busy_timeout_s
        self.evict_every = evict_every
        self.touch_after_s = touch_after_s
        self._clock = clock
        self._writes = 0
        # Reads and writes on separate threads and connections: in WAL mode a reader never
        # waits for a writer, so a write stuck on another process's lock delays no lookup.
        self._conns: dict[str, sqlite3.Connection] = {}
        self._threads = {
            role: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ocrproxy-sqlite-{role}")
            for role in ("read", "write")
        }
        self._touches: set[asyncio.Future[None]] = set()

    def _submit(
        self, fn: Callable[[sqlite3.Connection], T], role: str = "write"
    ) -> asyncio.Future[T]:
        """Queue ``fn`` on the role's thread now (so calls keep their order)."""

        def call() -> T:
            conn = self._conns.get(role)
            if conn is None:
                conn = self._conns[role] = self._connect()
            return fn(conn)

        return asyncio.get_running_loop().run_in_executor(self._threads[role], call)

    async def _run(self, fn: Callable[[sqlite3.Connection], T], role: str = "write") -> T:
        return await self._submit(fn, role)

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        # Switching a new file to WAL takes an exclusive lock and SQLite answers "locked" at once,
        # without the busy timeout, when several workers start together: retry within it (this
        # runs on the tier's own thread, so the sleep blocks no event loop).
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
        return conn

    async def open(self) -> None:
        """Create the file and table now, so a bad path fails at start-up."""
        await self._run(lambda conn: None)

    async def get(self, key: bytes) -> Description | None:
        now = self._clock()

        def read(conn: sqlite3.Connection) -> tuple[bytes, float] | None:
            row = conn.execute(
                "SELECT value, used FROM descriptions WHERE key = ? AND expires > ?", (key, now)
            ).fetchone()
            return None if row is None else (bytes(row[0]), row[1])

        try:
            found = await self._run(read, "read")
        except sqlite3.Error as exc:
            log.warning("sqlite cache read failed, using memory only: %s", exc)
            return None
        if found is None:
            return None
        data, used = found
        if used < now - self.touch_after_s:  # rarely; never delays (or spoils) the hit
            self._touch(key, now)
        return _decode(data, self.name)

    def _touch(self, key: bytes, now: float) -> None:
        def touch(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("UPDATE descriptions SET used = ? WHERE key = ?", (now, key))
            except sqlite3.Error as exc:
                log.debug("sqlite cache touch skipped: %s", exc)

        job = self._submit(touch)
        self._touches.add(job)
        job.add_done_callback(self._touches.discard)

    async def set(self, key: bytes, value: Description, ttl_s: float) -> None:
        now = self._clock()
        self._writes += 1
        evict = self._writes % self.evict_every == 1 or self.evict_every <= 1

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO descriptions (key, value, expires, used) "
                "VALUES (?, ?, ?, ?)",
                (key, dump(value), now + ttl_s, now),
            )
            if evict:
                self._evict(conn, now)

        try:
            await self._run(write)
        except sqlite3.Error as exc:
            log.warning("sqlite cache write failed: %s", exc)

    def _evict(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute("DELETE FROM descriptions WHERE expires <= ?", (now,))
        (count,) = conn.execute("SELECT COUNT(*) FROM descriptions").fetchone()
        excess = count - self.max_entries
        if excess > 0:
            conn.execute(
                "DELETE FROM descriptions WHERE key IN "
                "(SELECT key FROM descriptions ORDER BY used LIMIT ?)",
                (excess,),
            )

    async def count(self) -> int:
        """Rows in the table (for tests and diagnostics)."""
        row = await self._run(lambda c: c.execute("SELECT COUNT(*) FROM descriptions").fetchone())
        return int(row[0])

    async def evict(self) -> None:
        """Run eviction now (normally it runs every ``evict_every`` writes)."""
        await self._run(lambda conn: self._evict(conn, self._clock()))

    async def release(self, key: bytes) -> None:
        return None

    async def ping(self) -> bool:
        try:
            await self._run(lambda conn: conn.execute("SELECT 1").fetchone())
        except sqlite3.Error:
            return False
        return True

    async def close(self) -> None:
        await asyncio.gather(*self._touches, return_exceptions=True)
        for role, thread in self._threads.items():
            conn = self._conns.pop(role, None)
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(thread, conn.close)
            thread.shutdown(wait=False)  # idle now: the connection is closed


def _decode(data: bytes | None, tier: str) -> Description | None:
    if data is None:
        return None
    try:
        return load(data)
    except msgspec.DecodeError:
        log.warning("%s cache holds an unreadable entry; ignoring it", tier)
        return None


# Delete the lock only if it is still ours: a holder that outlived its claim must not remove the
# claim another instance took after it expired.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisTier:
    """Descriptions in Redis, with a cross-instance claim per key."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ocrproxy:",
        timeout_s: float = 0.5,
        lock_s: float = 60.0,
        retry_s: float = 2.0,
        poll_s: float = 0.05,
    ) -> None:
        import redis.asyncio as aioredis

        self.prefix = prefix
        self.timeout_s = timeout_s
        self.lock_s = lock_s
        self.retry_s = retry_s
        self.poll_s = poll_s
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=None,
            health_check_interval=30,
        )
        self._release = self.client.register_script(_RELEASE)
        self._extend = self.client.register_script(_EXTEND)
        self._claims: dict[bytes, tuple[str, asyncio.Task[None]]] = {}
        self._down_until = 0.0
        self.token_base = secrets.token_hex(8)

    def _value_key(self, key: bytes) -> str:
        return f"{self.prefix}d:{key.hex()}"

    def _lock_key(self, key: bytes) -> str:
        return f"{self.prefix}lock:{key.hex()}"

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one Redis command under the short timeout; on failure, mark the tier down."""
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await fn()
        except Exception as exc:
            if not self.down:
                log.warning(
                    "redis cache unavailable (%s: %s); using memory only, retrying in %g s",
                    what,
                    type(exc).__name__,
                    self.retry_s,
                )
            self._down_until = time.monotonic() + self.retry_s
            raise _Unavailable from None
        if self._down_until:
            self._down_until = 0.0
            log.info("redis cache reachable again")
        return result

    async def get(self, key: bytes) -> Description | None:
        """The stored description, or None after claiming the key (the caller pays for it)."""
        if self.down:
            return None
        value_key, lock_key = self._value_key(key), self._lock_key(key)
        token = f"{self.token_base}:{secrets.token_hex(4)}"
        delay = self.poll_s
        try:
            while True:
                data = await self._call("get", lambda: self.client.get(value_key))
                if data is not None:
                    return _decode(data, self.name)
                claimed = await self._call(
                    "claim",
                    lambda: self.client.set(lock_key, token, nx=True, px=int(self.lock_s * 1000)),
                )
                if claimed:
                    renew = asyncio.get_running_loop().create_task(self._renew(lock_key, token))
                    # Two flights of this process can share a key (relay mode keys flights by
                    # credential): the older claim can only be here if its lock expired, and
                    # its renewal must not outlive it.
                    old = self._claims.pop(key, None)
                    if old is not None:
                        old[1].cancel()
                    self._claims[key] = (token, renew)
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        except _Unavailable:
            return None

    async def _renew(self, lock_key: str, token: str) -> None:
        """Keep our claim alive while the OCR call runs (it may wait for a slot, or retry)."""
        while True:
            await asyncio.sleep(self.lock_s / 3)
            try:
                await self._call(
                    "renew",
                    lambda: self._extend(keys=[lock_key], args=[token, int(self.lock_s * 1000)]),
                )
            except _Unavailable:
                pass

    async def set(self, key: bytes, value: Description, ttl_s: float) -> None:
        if not self.down:
            value_key = self._value_key(key)
            try:
                await self._call(
                    "set", lambda: self.client.set(value_key, dump(value), px=int(ttl_s * 1000))
                )
            except _Unavailable:
                pass
        await self.release(key)

    async def release(self, key: bytes) -> None:
        """Drop this process's claim on ``key``, if it holds one (tried even while marked
        down: a claim left behind would make other instances wait out the whole lock)."""
        claim = self._claims.pop(key, None)
        if claim is None:
            return
        token, renew = claim
        renew.cancel()
        lock_key = self._lock_key(key)
        try:
            await self._call("release", lambda: self._release(keys=[lock_key], args=[token]))
        except _Unavailable:
            return

    async def ping(self) -> bool:
        try:
            await self._call("ping", self.client.ping)
        except _Unavailable:
            return False
        return True

    async def close(self) -> None:
        for _, renew in self._claims.values():
            renew.cancel()
        await self.client.aclose()


class _Unavailable(Exception):
    """Redis failed or was too slow; the caller falls back to memory."""


def open_tier(settings: config.Cache, ocr_timeout_s: float) -> Tier | None:
    """The tier the config asks for (None for ``memory``)."""
    if settings.backend == "sqlite":
        return SqliteTier(settings.path, settings.tier_max_entries)
    if settings.backend == "redis":
        return RedisTier(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout_s=settings.redis_timeout_s,
            lock_s=ocr_timeout_s,
        )
    return None

"""Admission to the local OCR engines' threads: a thread each, and a budget of bytes of pixels.

Theory of operation: a local engine's work is CPU-bound and memory-hungry in ways its inputs do
not show: a 190 KB PNG decodes to 196 MB. So a job is admitted twice. A ``Budget``, shared by
every engine of the process, holds the bytes of pixels all jobs may hold at once
(``[ocr.local] max_decoded_bytes``); the job's caller works out how much it needs from the
image's header before decoding anything, and takes that much first, waiting on the event loop
if need be. Then a slot of ``Workers``, one per thread, so that a waiting job never sits on a
thread. Both are given back when the *thread* finishes, whatever became of its caller.

Waiting is first come, first served, and is cancelled with its caller: a request's deadline
covers its wait for bytes and for a thread as well as the work.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

MiB = 1024 * 1024


class OverBudget(Exception):
    """A job needs more bytes than the whole budget: it can never run."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the image would take about {-(-size // MiB)} MiB of memory to decode and read, "
            f"more than the engine may use at once ([ocr.local] max_decoded_bytes, "
            f"{limit // MiB} MiB)"
        )
        self.size, self.limit = size, limit


class Budget:
    """A number of bytes that work may hold at once, shared by every thread of the engines.

    ``acquire`` waits on the event loop until the bytes are free; ``release`` (on the loop)
    gives them back. First come, first served: a large reservation at the head of the queue
    is not overtaken by smaller ones, so it cannot starve.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free = limit
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, size: int) -> None:
        """Wait until ``size`` bytes are free and take them; OverBudget if it never could be."""
        if size > self.limit:
            raise OverBudget(size, self.limit)
        if not self._waiters and size <= self.free:
            self.free -= size
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((size, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # granted, but its caller is gone
                self.release(size)
            else:  # still queued: let the ones behind it move up
                waiter.cancel()
                self._grant()
            raise

    def release(self, size: int) -> None:
        self.free += size
        self._grant()

    def resize(self, limit: int) -> None:
        """A new limit (a reload): bytes held now count against it; a job queued that needs
        more than it can never run, and is refused."""
        self.free += limit - self.limit
        self.limit = limit
        for size, waiter in self._waiters:
            if size > limit and not waiter.done():
                waiter.set_exception(OverBudget(size, limit))
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            size, waiter = self._waiters[0]
            if waiter.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if size > self.free:
                return
            self._waiters.popleft()
            self.free -= size
            waiter.set_result(None)


_T = TypeVar("_T")


class Workers:
    """A thread pool whose jobs are admitted by threads and by bytes of pixels.

    ``call`` runs a short job that holds no bitmap (reading an image's header) once a thread is
    free. ``run`` first takes the bytes its job will hold from the shared ``Budget``, then a
    thread: the threads counted as busy are all at work, so a job waiting for bytes never holds
    a thread idle, and whoever holds bytes waits only for work that is running, so nothing
    deadlocks. Both are given back when the *thread* finishes, not when the caller stops
    waiting: decoding or recognition cannot be cancelled once started, so a client that went
    away must not let more work pile onto busy threads or more bitmaps into memory. Waiting,
    for either, holds no decoded bitmap and ends with its caller, so it counts against the
    caller's deadline.
    """

    def __init__(self, threads: int, budget: Budget, name: str) -> None:
        self.threads = threads
        self.budget = budget
        self._name = name
        self._slots = asyncio.Semaphore(threads)
        self._pool: ThreadPoolExecutor | None = None

    async def call(self, work: Callable[[], _T]) -> _T:
        """``work()`` in a pool thread once one is free; for work that holds no bitmap."""
        await self._slots.acquire()
        return await self._submit(work, 0)

    async def run(self, size: int, work: Callable[[], _T]) -> _T:
        """``work()`` in a pool thread once ``size`` bytes of the budget and a thread are free.

        OverBudget if ``size`` is more than the whole budget: refused, not clamped, so that
        the budget is a bound the operator can rely on.
        """
        if size > self.budget.limit:
            raise OverBudget(size, self.budget.limit)
        await self.budget.acquire(size)
        try:
            await self._slots.acquire()
        except BaseException:
            self.budget.release(size)
            raise
        return await self._submit(work, size)

    async def _submit(self, work: Callable[[], _T], size: int) -> _T:
        """Submit ``work``, holding a slot and ``size`` bytes until its thread finishes."""
        loop = asyncio.get_running_loop()
        try:
            job: Future[_T] = self._executor().submit(work)
        except BaseException:
            self._give_back(size)
            raise
        job.add_done_callback(functools.partial(self._finished, loop, size))
        return await asyncio.wrap_future(job)

    def _finished(self, loop: asyncio.AbstractEventLoop, size: int, _: object) -> None:
        """In the pool thread: give the thread and the bytes back, on the event loop."""
        try:
            loop.call_soon_threadsafe(self._give_back, size)
        except RuntimeError:  # the loop is closed: nobody is left to admit
            pass

    def _give_back(self, size: int) -> None:
        self._slots.release()
        if size:
            self.budget.release(size)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self._name)
        return self._pool

    def close(self) -> None:
        """Stop taking work; a job already running ends by its own deadline."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

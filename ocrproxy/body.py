"""Read a request body into memory: bounded in size, in time, and by a process-wide budget.

Theory of operation: a handler that must see the whole body (to parse its JSON) calls
``read_body``. Three limits hold, checked in this order:

- ``max_body_bytes``: a larger body is a 413, refused on its Content-Length before any of it is
  read, or as soon as it grows past the limit.
- ``buffered_bytes_limit``: the request bytes the whole process holds at once. A body
  reserves its bytes as they arrive, never its announced Content-Length up front (connections
  that announce large bodies and send nothing would otherwise hold the whole budget for
  nothing). A request that would go past the budget is a 503 with ``Retry-After``. What a
  request reserved stays reserved until the request ends (the middleware calls ``release``):
  its body lives that long. The streamed pass-through never comes here (its body goes
  upstream as it arrives).
- ``body_timeout_s``: a body that has not fully arrived this long after the read began is a 408.

Whatever the error, the bytes read so far are dropped at once. A body that came with the
headers (a small request) is taken as it is: no timer, no wait.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from . import config
from .errors import BodyTimeout, Overloaded, PayloadTooLarge


class Budget:
    """The body limits of one application, and the bytes its requests hold now."""

    __slots__ = ("limit", "max_body", "timeout_s", "held")

    def __init__(self, server: config.Server) -> None:
        self.limit = server.buffered_bytes_limit
        self.max_body = server.max_body_bytes
        self.timeout_s = server.body_timeout_s
        self.held = 0

    def take(self, request: web.Request, size: int) -> None:
        """Reserve ``size`` more bytes for ``request``, or raise Overloaded."""
        if self.held + size > self.limit:
            raise Overloaded(
                "The proxy is holding as many request bodies as it may; retry in a moment"
            )
        if size:
            self.held += size
            request[_HELD] = request.get(_HELD, 0) + size


BUDGET = web.AppKey("body_budget", Budget)
_HELD = web.RequestKey("body_bytes_held", int)


def release(request: web.Request) -> None:
    """Give back what ``request`` reserved (the request middleware calls this when it ends)."""
    held = request.get(_HELD)
    if held:
        request.app[BUDGET].held -= held
        request[_HELD] = 0


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes")


async def read_body(request: web.Request) -> bytes | bytearray:
    """The whole request body, within the size, budget and time limits (see the module doc)."""
    budget = request.app[BUDGET]
    limit = budget.max_body
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    content = request.content
    if content.is_eof():  # it all came with the headers (a small request): take it, no wait
        whole = content.read_nowait()
        if len(whole) > limit:
            raise _too_large(limit)
        budget.take(request, len(whole))
        return whole
    reserved = 0
    # Appended piece by piece as it arrives (a large buffer grows in place): joining pieces at
    # the end blocked the event loop for milliseconds and held the body twice, and a buffer
    # made at its announced length up front would cost a slow client nothing and us all of it.
    body = bytearray()
    try:
        async with asyncio.timeout(budget.timeout_s):
            async for piece in content.iter_any():
                body += piece
                size = len(body)
                if size > reserved:
                    if size > limit:
                        raise _too_large(limit)
                    budget.take(request, size - reserved)
                    reserved = size
    except TimeoutError:
        del body[:]  # the exception's traceback keeps this frame: free its bytes now
        raise BodyTimeout(
            f"The request body did not arrive within {budget.timeout_s:g} s"
        ) from None
    except BaseException:
        del body[:]
        raise
    return body

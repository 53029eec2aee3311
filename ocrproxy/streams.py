"""The SSE streams a process has open, and how each one is ended when the server shuts down.

Theory of operation: a stream is registered when its headers are sent, with the framing of its
dialect (``Framing``), and leaves the registry when its request's task ends, however it ends.
``Edge`` says whether the bytes sent so far end at an SSE event boundary: an error event may
only be written there. A shutdown whose grace period ran out calls ``Streams.end_all``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from aiohttp import web

from .errors import ProxyError


class Framing(Protocol):
    """What the relay needs of a dialect (``dialects.Dialect`` is one)."""

    @property
    def keep_alive(self) -> bytes: ...

    @property
    def usage_path(self) -> tuple[str, ...]: ...

    @property
    def stream_usage_path(self) -> tuple[str, ...]: ...

    @property
    def stream_usage_events(self) -> frozenset[str]: ...

    def error_event(self, error: ProxyError | bytes) -> bytes: ...

    def upstream_error_event(self, status: int, payload: bytes) -> bytes: ...

    def as_events(self, payload: bytes) -> bytes: ...


class Edge:
    """Whether the last piece of an SSE stream handed to the transport ended an event.

    The pass-through relay writes pieces where the upstream's reads cut them, so the bytes on
    the wire may end mid ``data:`` line. An error event written then would be glued to the half
    event and corrupt both for the client's parser, and ending the half event with a blank line
    would complete a truncated JSON line. So the error event is written only at an event
    boundary; elsewhere the connection is cut instead (a truncated body, which the client sees
    as an error). One ``endswith`` per piece; a boundary split across two pieces (``\n`` then
    ``\n``) is not seen, and counts as mid-event: the safe side.
    """

    __slots__ = ("clean",)

    def __init__(self) -> None:
        self.clean = True


EVENT_ENDS = (b"\n\n", b"\r\n\r\n")


class Streams:
    """The SSE streams an application has open, each with the task of the request serving it.

    A stream is added when its headers are sent and leaves when its request's task ends, however
    it ends. ``end_all`` is for a shutdown whose grace period ran out: it gives each client an
    error event and a proper end of the chunked body, then cancels the request's task (which
    stops the upstream read or the OCR wait); the request middleware still writes its access
    line, with the status the client got (``ended_by_shutdown``). All streams are ended at once,
    each write within END_TIMEOUT: a client that does not take its event in time (it stopped
    reading) has its connection aborted, so one stalled client cannot hold up the others or the
    shutdown. A stream whose last bytes are mid-event (``Edge``) is cut without the event.
    """

    def __init__(self) -> None:
        self._open: dict[asyncio.Task[Any], tuple[web.Request, web.StreamResponse, Framing]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(self, request: web.Request, response: web.StreamResponse, framing: Framing) -> None:
        task = asyncio.current_task()
        if task is None or task in self._open:
            return
        self._open[task] = (request, response, framing)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._open.pop(task, None)

    async def end_all(self) -> int:
        """End every open stream now; the number that got the error event."""
        ending = [
            self._end(task, request, response, framing)
            for task, (request, response, framing) in list(self._open.items())
            if not task.done()
        ]
        return sum(await asyncio.gather(*ending))

    @staticmethod
    async def _end(
        task: asyncio.Task[Any],
        request: web.Request,
        response: web.StreamResponse,
        framing: Framing,
    ) -> bool:
        ended = False
        transport = request.transport
        edge = request.get(EDGE)
        if transport is None:
            pass
        elif edge is not None and not edge.clean:
            transport.close()  # mid-event: what was sent goes out, then the cut
        elif request.protocol.writing_paused:
            transport.abort()  # a client that stopped reading would make the write wait
        else:
            try:
                # One write, with the end of the chunked body: nothing can come between.
                async with asyncio.timeout(END_TIMEOUT):
                    await response.write_eof(framing.error_event(SHUTTING_DOWN))
            except TimeoutError:  # its buffer filled up: it is not reading
                transport.abort()
            except (ConnectionError, RuntimeError):  # gone, or it had just ended
                pass
            else:
                request[_ENDED] = response
                ended = True
        task.cancel()
        return ended


# Seconds a stream's ending write may wait on its client at shutdown (``Streams``).
END_TIMEOUT = 0.5
STREAMS: web.AppKey[Streams] = web.AppKey("streams", Streams)
_ENDED: web.RequestKey[web.StreamResponse] = web.RequestKey("ended_by_shutdown", web.StreamResponse)
EDGE: web.RequestKey[Edge] = web.RequestKey("sse_edge", Edge)
SHUTTING_DOWN = ProxyError(
    "The server is shutting down; retry the request", code="server_shutting_down"
)


def ended_by_shutdown(request: web.Request) -> web.StreamResponse | None:
    """The stream of ``request`` if a shutdown ended it (its task was then cancelled)."""
    return request.get(_ENDED)


def register(request: web.Request, response: web.StreamResponse, framing: Framing) -> None:
    streams = request.app.get(STREAMS)
    if streams is not None:
        streams.add(request, response, framing)
    request[EDGE] = Edge()

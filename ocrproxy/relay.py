"""Send the upstream's answer back to the client: plain bodies, SSE streams, and the usage merge.

Theory of operation: bytes are relayed as they arrive (``iter_any``) and written at once; the
write waits for the client to drain, so a slow client holds back the upstream instead of filling
memory. Only two things are ever parsed: a plain JSON answer to an OCR request (to add
``usage.ocr``) and, in a stream whose client asked for usage, whole SSE events, so that the one
carrying ``usage`` can gain ``usage.ocr``. Everything else passes through untouched.

Every body and header relayed is masked (``redact``) before it is written; the usage edit itself
is ``usage``'s. Whatever the relay must hold is bounded: a plain OCR answer at most MAX_EDIT
bytes (past that it is streamed unedited), one SSE event at most ``usage.MAX_EVENT`` bytes. A
client that takes nothing for ``[server] write_timeout_s`` while a write waits on it is dropped
and the upstream response closed: one timer per stream, not per write.

Once a stream's headers are committed (early, as keep-alive, while OCR runs) an error can no
longer change the status: it is sent as an error event and the stream ends. The SSE framing
(keep-alives, error events, where usage sits) is the dialect's, passed in as a ``Framing``.
A shutdown that outlasts its grace period ends every SSE stream still open the same way, with
code ``server_shutting_down`` (``streams.Streams``). An error event is only ever written at an event
boundary: a pass-through stream whose last bytes sent are mid-event (the upstream's reads cut
it there) is cut instead, a truncated body, so that no parser gets a half event glued to an
error one (``streams.Edge``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from . import upstream
from .errors import ProxyError, UpstreamError, UpstreamTimeout
from .notes import with_message_note
from .redact import Redactor, redact, redact_headers
from .schema import encoder
from .streams import EDGE, EVENT_ENDS, Edge, Framing, register
from .usage import UsageEditor, with_ocr_usage

# Upstream bodies at most this large (with a Content-Length) are read whole and sent in one write.
SMALL_BODY = 256 * 1024
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
# Upstream error bodies are read whole (to redact echoed secrets) up to this size.
ERROR_BODY = 1024 * 1024
# A plain OCR answer is read whole (to add ``usage.ocr``) only up to this size.
MAX_EDIT = 8 * 1024 * 1024

log = logging.getLogger("ocrproxy.relay")


async def _read_all(source: aiohttp.ClientResponse) -> bytes:
    """The whole body; an upstream that breaks or stalls meanwhile is a 502/504."""
    try:
        return await source.read()
    except TimeoutError:
        raise UpstreamTimeout("The upstream stopped sending its answer") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"The upstream broke off its answer ({type(exc).__name__})") from None


async def read_capped(source: aiohttp.ClientResponse) -> bytes:
    """Up to ERROR_BODY bytes of a body; an upstream that breaks while erroring yields less.
    (An error body read so, looked at before it is relayed, goes out with ``error_response``.)"""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < ERROR_BODY:
            piece = await source.content.readany()
            if not piece:
                break
            chunks.append(piece)
            size += len(piece)
    except (aiohttp.ClientError, TimeoutError):
        pass
    return b"".join(chunks)[:ERROR_BODY]


def error_response(
    source: aiohttp.ClientResponse, payload: bytes, secrets: tuple[bytes, ...] = ()
) -> web.Response:
    """The upstream's error answer with ``payload`` (``read_capped``'s, or an edit of it) as
    its body, masked as ``relay`` masks one (last: after any edit)."""
    out_headers = upstream.response_headers(source.headers)
    redact_headers(out_headers, secrets)
    return web.Response(
        status=source.status,
        reason=source.reason,
        body=redact(payload, secrets),
        headers=out_headers,
    )


async def _read_upto(source: aiohttp.ClientResponse, limit: int) -> tuple[list[bytes], bool]:
    """The body's pieces until its end or past ``limit`` bytes, and whether it ended.

    An upstream that breaks or stalls meanwhile is a 502/504, as with ``_read_all``.
    """
    chunks: list[bytes] = []
    size = 0
    read = source.content.readany
    try:
        while size <= limit:
            piece = await read()
            if not piece:
                return chunks, True
            chunks.append(piece)
            size += len(piece)
    except TimeoutError:
        raise UpstreamTimeout("The upstream stopped sending its answer") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"The upstream broke off its answer ({type(exc).__name__})") from None
    return chunks, False


# Adds the headers every response of the app carries (and counts streams): set by the app.
# A response a handler returns is stamped by the request middleware; one sent from here, before
# the handler returns, by ``commit``.
STAMP: web.AppKey[Callable[[web.Request, web.StreamResponse], None]] = web.AppKey("stamp")


async def commit(request: web.Request, response: web.StreamResponse) -> None:
    """Stamp ``response`` and send its status and headers now."""
    stamp = request.app.get(STAMP)
    if stamp is not None:
        stamp(request, response)
    await response.prepare(request)


async def start_sse(
    request: web.Request, headers: Mapping[str, str], framing: Framing
) -> web.StreamResponse:
    """Commit a 200 SSE response now (before the upstream answered)."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    await commit(request, response)
    register(request, response, framing)
    return response


async def keep_alive(
    response: web.StreamResponse,
    task: asyncio.Future[Any],
    interval: float,
    framing: Framing,
    *,
    opening: bytes | None = None,
) -> None:
    """Write ``opening`` (default: a keep-alive) now, then a keep-alive every ``interval``
    seconds until ``task`` ends.

    The first bytes go out at once: a client (or a proxy in front) that got headers and then
    nothing for a whole interval may give up, or buffer.
    """
    await response.write(framing.keep_alive if opening is None else opening)
    while True:
        done, _ = await asyncio.wait({task}, timeout=interval)
        if done:
            return
        await response.write(framing.keep_alive)


class UpstreamBroke(Exception):
    """The upstream's body ended early (connection lost, idle read timeout)."""


# Seconds a client may take nothing while a write waits on it before it is dropped (0: never):
# set by the app from ``[server] write_timeout_s``.
WRITE_TIMEOUT: web.AppKey[float] = web.AppKey("write_timeout", float)


class _WriteWatch:
    """Drops a client that has taken nothing for ``timeout`` seconds while a write waits.

    The pump stamps when a write starts and clears the stamp when it returns (a clock read per
    piece, no timer); one timer per stream, re-armed only when it fires, looks at the stamp.
    Dropping aborts the client's connection and closes the upstream response, so the pump's
    next step fails and the upstream connection is freed at once.
    """

    __slots__ = ("_handle", "_loop", "_source", "_timeout", "_transport", "dropped", "since")

    def __init__(
        self, transport: asyncio.Transport, source: aiohttp.ClientResponse, timeout: float
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        self._source = source
        self._timeout = timeout
        self.since = 0.0  # when the write under way started; 0.0: none is
        self.dropped = False
        self._handle = self._loop.call_later(timeout, self._check)

    def _check(self) -> None:
        since = self.since
        now = self._loop.time()
        if since and now - since >= self._timeout:
            log.warning("client took nothing for %.0f s: connection dropped", now - since)
            self.dropped = True
            self._transport.abort()
            self._source.close()
            return
        self._handle = self._loop.call_at((since or now) + self._timeout, self._check)

    def stop(self) -> None:
        self._handle.cancel()


def _watch(request: web.Request | None, source: aiohttp.ClientResponse) -> _WriteWatch | None:
    if request is None:
        return None
    timeout = request.app.get(WRITE_TIMEOUT, 0.0)
    transport = request.transport
    if timeout <= 0 or transport is None:
        return None
    return _WriteWatch(transport, source, timeout)


async def _pump(
    source: aiohttp.ClientResponse,
    response: web.StreamResponse,
    editor: UsageEditor | None,
    *,
    redactor: Redactor | None = None,
    request: web.Request | None = None,
    first: Iterable[bytes] = (),
    edge: Edge | None = None,
) -> None:
    """Copy the upstream body to the client piece by piece, as it arrives.

    ``first`` are pieces of the body already read. Secrets are masked before the usage editor
    sees the bytes. Given the ``request``, a client that stops reading is dropped
    (``_WriteWatch``). Given an ``edge``, it says whether the last piece ended an SSE event.

    Reading and writing fail differently: a broken upstream raises UpstreamBroke (the caller can
    still tell the client), a client that went away raises ConnectionResetError (nobody to tell).
    """
    read = source.content.readany
    write = response.write
    ahead = list(first)
    ahead.reverse()
    watch = _watch(request, source)
    clock = asyncio.get_running_loop().time
    try:
        while True:
            if ahead:
                piece = ahead.pop()
            else:
                try:
                    piece = await read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise UpstreamBroke(type(exc).__name__) from None
                if not piece:
                    break
            if redactor is not None:
                piece = redactor.feed(piece)
            if editor is not None and piece:
                piece = editor.feed(piece)
            if not piece:
                continue
            if edge is not None:  # set before the write: the transport has the piece then
                edge.clean = piece.endswith(EVENT_ENDS)
            if watch is None:
                await write(piece)
            else:
                watch.since = clock()
                await write(piece)
                if watch.dropped:  # the write returned because the connection was aborted
                    raise ConnectionResetError("the client stopped reading")
                watch.since = 0.0
        tail = redactor.flush() if redactor is not None else b""
        if editor is not None:
            tail = (editor.feed(tail) if tail else b"") + editor.flush()
        if tail:
            if edge is not None:
                edge.clean = tail.endswith(EVENT_ENDS)
            if watch is not None:
                watch.since = clock()
            await write(tail)
    finally:
        if watch is not None:
            watch.stop()


async def _pump_sse(
    source: aiohttp.ClientResponse,
    response: web.StreamResponse,
    editor: UsageEditor | None,
    framing: Framing,
    *,
    redactor: Redactor | None = None,
    request: web.Request | None = None,
) -> None:
    """Relay an SSE body; if the upstream breaks, end with an error event instead of hanging.

    The error event is written only if the last bytes sent ended an event (``streams.Edge``);
    mid-event the connection is cut instead (ConnectionResetError), so no parser gets a
    corrupted event.
    """
    edge = request.get(EDGE) if request is not None else None
    try:
        await _pump(source, response, editor, redactor=redactor, request=request, edge=edge)
    except UpstreamBroke as exc:
        log.warning("upstream stream broke mid-response: %s", exc)
        if edge is not None and not edge.clean:
            if request is not None and request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("the upstream broke mid-event: connection cut") from None
        broke = UpstreamError("The upstream stream ended unexpectedly")
        await response.write(framing.error_event(broke))


async def relay(
    request: web.Request,
    source: aiohttp.ClientResponse,
    headers: Mapping[str, str],
    framing: Framing,
    *,
    ocr_usage: Mapping[str, Any] | None = None,
    edit_stream: bool = False,
    secrets: tuple[bytes, ...] = (),
    not_found_note: str | None = None,
) -> web.StreamResponse:
    """Relay an upstream response whose status the client has not seen yet.

    Any configured secret an upstream echoes is masked, in headers and bodies alike; a body
    the proxy cannot read (compressed against its ``Accept-Encoding: identity``) is relayed as
    it came. A 404's JSON error message gets ``not_found_note`` appended (``notes``).
    """
    out_headers = upstream.response_headers(source.headers)
    redact_headers(out_headers, secrets)
    out_headers.update(headers)
    content_type = source.headers.get("Content-Type", "")
    encoded = "Content-Encoding" in source.headers
    if encoded:
        secrets = ()
    if content_type.startswith("text/event-stream"):
        out_headers.update(SSE_HEADERS)
        out_headers["Content-Type"] = content_type
        response = web.StreamResponse(
            status=source.status, reason=source.reason, headers=out_headers
        )
        await commit(request, response)
        register(request, response, framing)
        editor = _editor(ocr_usage, edit_stream and not encoded, framing)
        redactor = Redactor(secrets) if secrets else None
        await _pump_sse(source, response, editor, framing, redactor=redactor, request=request)
        await response.write_eof()
        return response
    length = source.content_length
    if source.status >= 400 and not encoded and (length is None or length <= ERROR_BODY):
        payload = redact(_noted(await read_capped(source), source, not_found_note), secrets)
        return web.Response(
            status=source.status, reason=source.reason, body=payload, headers=out_headers
        )
    first: list[bytes] = []
    if (
        ocr_usage is not None
        and source.status == 200
        and not encoded
        and (length is None or length <= MAX_EDIT)
    ):
        first, ended = await _read_upto(source, MAX_EDIT)
        if ended:  # else: too large to hold and edit, streamed unedited
            payload = b"".join(first)
            ocr = msgspec.Raw(encoder.encode(ocr_usage))
            edited = with_ocr_usage(payload, ocr, framing.usage_path)
            body = redact(edited or payload, secrets)
            return web.Response(status=200, body=body, headers=out_headers)
    elif length is not None and length <= SMALL_BODY:
        payload = redact(await _read_all(source), secrets)
        return web.Response(
            status=source.status, reason=source.reason, body=payload, headers=out_headers
        )
    response = web.StreamResponse(status=source.status, reason=source.reason, headers=out_headers)
    if length is not None:
        response.content_length = length
    # With a Content-Length promised, a secret is masked by as many bytes as it has.
    redactor = Redactor(secrets, same_length=length is not None) if secrets else None
    await commit(request, response)
    try:
        await _pump(source, response, None, redactor=redactor, request=request, first=first)
    except UpstreamBroke as exc:
        # The status is sent and a plain body has no way to carry an error: cut the connection
        # so that the client sees a truncated body rather than a complete-looking one.
        log.warning("upstream body broke mid-response: %s", exc)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


def _noted(payload: bytes, source: aiohttp.ClientResponse, note: str | None) -> bytes:
    """An error body, with ``note`` in its message if it is a 404's (aiohttp sets the length)."""
    if note is None or source.status != 404:
        return payload
    return with_message_note(payload, note) or payload


def _editor(
    ocr_usage: Mapping[str, Any] | None, edit: bool, framing: Framing
) -> UsageEditor | None:
    if ocr_usage is None or not edit:
        return None
    return UsageEditor(ocr_usage, framing.stream_usage_path, framing.stream_usage_events)


async def relay_into(
    response: web.StreamResponse,
    source: aiohttp.ClientResponse,
    framing: Framing,
    *,
    ocr_usage: Mapping[str, Any] | None,
    edit_stream: bool,
    secrets: tuple[bytes, ...] = (),
    request: web.Request | None = None,
    not_found_note: str | None = None,
) -> None:
    """Relay an upstream answer into an SSE response that is already committed.

    Given the ``request``, a client that stops reading is dropped (``_WriteWatch``). An error
    answer becomes an error event, a 404's message noted as ``relay`` notes it.
    """
    content_type = source.headers.get("Content-Type", "")
    if source.status != 200:
        payload = redact(_noted(await read_capped(source), source, not_found_note), secrets)
        await response.write(framing.upstream_error_event(source.status, payload))
    elif content_type.startswith("text/event-stream"):
        editor = _editor(ocr_usage, edit_stream, framing)
        redactor = Redactor(secrets) if secrets else None
        await _pump_sse(source, response, editor, framing, redactor=redactor, request=request)
    else:
        try:
            pieces, ended = await _read_upto(source, MAX_EDIT)
            if not ended:
                raise UpstreamError("The upstream's answer is too large to relay as an event")
            payload = b"".join(pieces)
            if ocr_usage is not None and edit_stream:  # where a stream would carry it
                ocr = msgspec.Raw(encoder.encode(ocr_usage))
                payload = with_ocr_usage(payload, ocr, framing.usage_path) or payload
            events = framing.as_events(payload)
        except ProxyError as exc:
            await response.write(framing.error_event(exc))
        except msgspec.DecodeError:
            not_json = UpstreamError("The upstream's answer is not JSON")
            await response.write(framing.error_event(not_json))
        else:
            await response.write(redact(events, secrets))
    await response.write_eof()

"""Send the upstream's answer back to the client: plain bodies, SSE streams, and the usage merge.

Theory of operation: bytes are relayed as they arrive (``iter_any``) and written at once; the
write waits for the client to drain, so a slow client holds back the upstream instead of filling
memory. Only two things are ever parsed: a plain JSON answer to an OCR request (to add
``usage.ocr``) and, in a stream whose client asked for usage, whole SSE events, so that the one
carrying ``usage`` can gain ``usage.ocr``. Everything else passes through untouched.

Once a stream's headers are committed (early, as keep-alive, while OCR runs) an error can no
longer change the status: it is sent as a ``data: {"error": ...}`` event and the stream ends.
A shutdown that outlasts its grace period ends every SSE stream still open the same way, with
code ``server_shutting_down`` (``Streams``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from . import upstream
from .errors import ProxyError, UpstreamError, UpstreamTimeout
from .schema import encoder, is_json, object_decoder

# Upstream bodies at most this large (with a Content-Length) are read whole and sent in one write.
SMALL_BODY = 256 * 1024
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
# Upstream error bodies are read whole (to redact echoed secrets) up to this size.
ERROR_BODY = 1024 * 1024
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")

log = logging.getLogger("ocrproxy.relay")


async def _read_all(source: aiohttp.ClientResponse) -> bytes:
    """The whole body; an upstream that breaks or stalls meanwhile is a 502/504."""
    try:
        return await source.read()
    except TimeoutError:
        raise UpstreamTimeout("The upstream stopped sending its answer") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"The upstream broke off its answer ({type(exc).__name__})") from None


async def _read_capped(source: aiohttp.ClientResponse) -> bytes:
    """Up to ERROR_BODY bytes of a body; an upstream that breaks while erroring yields less."""
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


def with_ocr_usage(payload: bytes, ocr: msgspec.Raw) -> bytes | None:
    """``payload`` (a JSON object with a ``usage`` object) with ``usage.ocr`` added, else None."""
    try:
        obj = object_decoder.decode(payload)
        usage_raw = obj.get("usage")
        if usage_raw is None or not is_json(usage_raw, b"{"):
            return None
        usage = object_decoder.decode(usage_raw)
    except msgspec.DecodeError:
        return None
    usage["ocr"] = ocr
    obj["usage"] = msgspec.Raw(encoder.encode(usage))
    return encoder.encode(obj)


class UsageEditor:
    """Splits an SSE byte stream into whole events and adds ``usage.ocr`` where usage appears."""

    def __init__(self, ocr_usage: Mapping[str, Any]) -> None:
        self.ocr = msgspec.Raw(encoder.encode(ocr_usage))
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        """Return the bytes that can be sent now; keep a partial event for later."""
        buf = self.pending + data if self.pending else data
        end = max(buf.rfind(sep) + len(sep) if sep in buf else -1 for sep in _EVENT_ENDS)
        if end < 0:
            self.pending = buf
            return b""
        ready, self.pending = buf[:end], buf[end:]
        if b'"usage"' not in ready:
            return ready
        return b"".join(self._edit(line) for line in ready.splitlines(keepends=True))

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        if b'"usage"' not in rest:
            return rest
        return b"".join(self._edit(line) for line in rest.splitlines(keepends=True))

    def _edit(self, line: bytes) -> bytes:
        if not line.startswith(b"data:") or b'"usage"' not in line:
            return line
        body = line[5:].strip()
        edited = with_ocr_usage(body, self.ocr)
        if edited is None:
            return line
        ending = line[len(line.rstrip(b"\r\n")) :]
        return b"data: " + edited + ending


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


def error_event(error: ProxyError | bytes) -> bytes:
    """An SSE event carrying an OpenAI-shaped error object."""
    payload = error.to_bytes() if isinstance(error, ProxyError) else error
    return b"data: " + payload + b"\n\n"


class Streams:
    """The SSE streams an application has open, each with the task of the request serving it.

    A stream is added when its headers are sent and leaves when its request's task ends, however
    it ends. ``end_all`` is for a shutdown whose grace period ran out: it gives each client an
    error event and a proper end of the chunked body, then cancels the request's task (which
    stops the upstream read or the OCR wait); the request middleware still writes its access
    line, with the status the client got (``ended_by_shutdown``).
    """

    def __init__(self) -> None:
        self._open: dict[asyncio.Task[Any], tuple[web.Request, web.StreamResponse]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(self, request: web.Request, response: web.StreamResponse) -> None:
        task = asyncio.current_task()
        if task is None or task in self._open:
            return
        self._open[task] = (request, response)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._open.pop(task, None)

    async def end_all(self) -> int:
        """End every open stream now; the number that got the error event."""
        ended = 0
        for task, (request, response) in list(self._open.items()):
            if task.done():
                continue
            protocol = request.protocol
            # A client that stopped reading would make this write wait: it is cut instead.
            if request.transport is not None and not protocol.writing_paused:
                try:
                    # One write, with the end of the chunked body: nothing can come between.
                    await response.write_eof(SHUTDOWN_EVENT)
                except (ConnectionError, RuntimeError):  # gone, or it had just ended
                    pass
                else:
                    request[_ENDED] = response
                    ended += 1
            task.cancel()
        return ended


STREAMS: web.AppKey[Streams] = web.AppKey("streams", Streams)
_ENDED: web.RequestKey[web.StreamResponse] = web.RequestKey("ended_by_shutdown", web.StreamResponse)
SHUTDOWN_EVENT = error_event(
    ProxyError("The server is shutting down; retry the request", code="server_shutting_down")
)


def ended_by_shutdown(request: web.Request) -> web.StreamResponse | None:
    """The stream of ``request`` if a shutdown ended it (its task was then cancelled)."""
    return request.get(_ENDED)


def _register(request: web.Request, response: web.StreamResponse) -> None:
    streams = request.app.get(STREAMS)
    if streams is not None:
        streams.add(request, response)


async def start_sse(request: web.Request, headers: Mapping[str, str]) -> web.StreamResponse:
    """Commit a 200 SSE response now (before the upstream answered)."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    await commit(request, response)
    _register(request, response)
    return response


async def keep_alive(
    response: web.StreamResponse, task: asyncio.Future[Any], interval: float
) -> None:
    """Wait for ``task``, writing an SSE comment every ``interval`` seconds meanwhile."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=interval)
        if done:
            return
        await response.write(b": keep-alive\n\n")


class UpstreamBroke(Exception):
    """The upstream's body ended early (connection lost, idle read timeout)."""


async def _pump(
    source: aiohttp.ClientResponse,
    response: web.StreamResponse,
    editor: UsageEditor | None,
) -> None:
    """Copy the upstream body to the client piece by piece, as it arrives.

    Reading and writing fail differently: a broken upstream raises UpstreamBroke (the caller can
    still tell the client), a client that went away raises ConnectionResetError (nobody to tell).
    """
    read = source.content.readany
    while True:
        try:
            piece = await read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamBroke(type(exc).__name__) from None
        if not piece:
            break
        if editor is not None:
            piece = editor.feed(piece)
            if not piece:
                continue
        await response.write(piece)
    if editor is not None:
        tail = editor.flush()
        if tail:
            await response.write(tail)


async def _pump_sse(
    source: aiohttp.ClientResponse,
    response: web.StreamResponse,
    editor: UsageEditor | None,
) -> None:
    """Relay an SSE body; if the upstream breaks, end with an error event instead of hanging."""
    try:
        await _pump(source, response, editor)
    except UpstreamBroke as exc:
        log.warning("upstream stream broke mid-response: %s", exc)
        await response.write(error_event(UpstreamError("The upstream stream ended unexpectedly")))


def redact(payload: bytes, secrets: tuple[bytes, ...]) -> bytes:
    for secret in secrets:
        if secret in payload:
            payload = payload.replace(secret, b"[redacted]")
    return payload


async def relay(
    request: web.Request,
    source: aiohttp.ClientResponse,
    headers: Mapping[str, str],
    *,
    ocr_usage: Mapping[str, Any] | None = None,
    edit_stream: bool = False,
    secrets: tuple[bytes, ...] = (),
) -> web.StreamResponse:
    """Relay an upstream response whose status the client has not seen yet.

    Error bodies are read whole and any configured secret an upstream echoes is redacted.
    """
    out_headers = upstream.response_headers(source.headers)
    out_headers.update(headers)
    content_type = source.headers.get("Content-Type", "")
    encoded = "Content-Encoding" in source.headers
    if content_type.startswith("text/event-stream"):
        out_headers.update(SSE_HEADERS)
        out_headers["Content-Type"] = content_type
        response = web.StreamResponse(
            status=source.status, reason=source.reason, headers=out_headers
        )
        await commit(request, response)
        _register(request, response)
        editor = UsageEditor(ocr_usage) if ocr_usage is not None and edit_stream else None
        await _pump_sse(source, response, None if encoded else editor)
        await response.write_eof()
        return response
    length = source.content_length
    if source.status >= 400 and not encoded and (length is None or length <= ERROR_BODY):
        payload = redact(await _read_capped(source), secrets)
        return web.Response(
            status=source.status, reason=source.reason, body=payload, headers=out_headers
        )
    if ocr_usage is not None and source.status == 200 and not encoded:
        payload = await _read_all(source)
        edited = with_ocr_usage(payload, msgspec.Raw(encoder.encode(ocr_usage)))
        return web.Response(status=200, body=edited or payload, headers=out_headers)
    if length is not None and length <= SMALL_BODY:
        payload = await _read_all(source)
        return web.Response(
            status=source.status, reason=source.reason, body=payload, headers=out_headers
        )
    response = web.StreamResponse(status=source.status, reason=source.reason, headers=out_headers)
    if length is not None:
        response.content_length = length
    await commit(request, response)
    try:
        await _pump(source, response, None)
    except UpstreamBroke as exc:
        # The status is sent and a plain body has no way to carry an error: cut the connection
        # so that the client sees a truncated body rather than a complete-looking one.
        log.warning("upstream body broke mid-response: %s", exc)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


async def relay_into(
    response: web.StreamResponse,
    source: aiohttp.ClientResponse,
    *,
    ocr_usage: Mapping[str, Any] | None,
    edit_stream: bool,
    secrets: tuple[bytes, ...] = (),
) -> None:
    """Relay an upstream answer into an SSE response that is already committed."""
    content_type = source.headers.get("Content-Type", "")
    if source.status != 200:
        payload = redact(await _read_capped(source), secrets)
        try:
            obj = object_decoder.decode(payload)
            body = msgspec.json.format(payload, indent=0) if "error" in obj else None
        except msgspec.DecodeError:
            body = None
        if body is None:
            body = encoder.encode(
                {
                    "error": {
                        "message": f"The upstream answered HTTP {source.status}",
                        "type": "upstream_error",
                        "param": None,
                        "code": str(source.status),
                    }
                }
            )
        await response.write(error_event(body))
    elif content_type.startswith("text/event-stream"):
        editor = UsageEditor(ocr_usage) if ocr_usage is not None and edit_stream else None
        await _pump_sse(source, response, editor)
    else:
        try:
            payload = msgspec.json.format(await _read_all(source), indent=0)
        except ProxyError as exc:
            await response.write(error_event(exc))
        except msgspec.DecodeError:
            await response.write(error_event(UpstreamError("The upstream's answer is not JSON")))
        else:
            await response.write(b"data: " + payload + b"\n\ndata: [DONE]\n\n")
    await response.write_eof()

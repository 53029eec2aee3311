"""Route handlers: thin functions that run the pipeline for one request.

``chat_completions`` is the product: it decides from the body's top-level fields whether OCR runs
(model ends with the suffix, or ``ocr_model`` is given). If not, the body is forwarded byte for
byte. If so: images → identities → descriptions (cache, OCR model) → rewritten text-only body →
upstream → relay with ``usage.ocr``. A streaming request whose OCR step outlasts
``keepalive_after_s`` gets its 200 and SSE headers early, then keep-alive comments, so that
nginx and chat frontends do not give up while the images are being described.

Every body the proxy reads is judged by ``guard`` before any upstream call (names, redirecting
fields), and a number out of msgspec's range in a field the proxy decodes is a 400, on the chat
route and on the pass-through alike. A body the proxy forwards byte for byte (no OCR) is decoded
at its top level only, so its depth is the upstream's to judge, but past msgspec's own recursion
limit (~1000 levels) it is a 400 too; an OCR request, whose messages the proxy walks and
rebuilds, is refused past ``guard.MAX_DEPTH`` levels. The pass-through relays only the routes of
``[server] passthrough_routes`` (404 for the others), and streams only uploads (multipart,
octet-stream, media types); a compressed upload is inflated by aiohttp, so its inflated size
is capped at ``max_body_bytes``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from . import config, images, redact, relay, upstream
from .body import read_body
from .cache import DescriptionCache
from .describe import Describer, OcrReport, Outcome
from .errors import (
    BadRequest,
    BodyTimeout,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    UpstreamError,
)
from .fetch import Fetcher
from .guard import check_depth, check_name, check_redirecting, deep
from .rewrite import delimiter_tag, placeholder_block, reference_block, rewrite
from .schema import RawObject, encoder, is_json, models_decoder, object_decoder

CONFIG = web.AppKey("config", config.Config)
ROUTER = web.AppKey("router", upstream.Router)
SESSION = web.AppKey("session", aiohttp.ClientSession)
CACHE = web.AppKey("cache", DescriptionCache)
DESCRIBER = web.AppKey("describer", Describer)
FETCHER = web.AppKey("fetcher", Fetcher)  # present only when `[ocr] fetch_images` is on
SECRETS = web.AppKey("secrets", tuple[bytes, ...])  # masked in everything relayed to clients
PASSTHROUGH = web.AppKey("passthrough", re.Pattern[str])  # `routes_pattern` of the config
DELIMITER_KEY = web.AppKey("delimiter_key", bytes)  # `rewrite.delimiter_key` of the secrets


@dataclass(slots=True)
class Trace:
    """What the access log line says about one request."""

    request_id: str
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    real_model: str | None = None
    ocr_model: str | None = None
    images: int = 0
    cache_hits: int = 0
    ocr_failures: int = 0
    ocr_ms: float | None = None
    upstream: str | None = None
    upstream_status: int | None = None
    ttfb_ms: float | None = None

    def upstream_answered(self, up: config.Upstream, status: int) -> None:
        self.upstream = up.name
        self.upstream_status = status
        self.ttfb_ms = round((time.monotonic() - self.started) * 1000, 2)


TRACE = web.RequestKey("trace", Trace)

_str_decoder = msgspec.json.Decoder(str)


def _field(obj: RawObject, name: str) -> Any:
    raw = obj.get(name)
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:  # the only failure of a Raw slice: a number out of range
        raise BadRequest(
            f"`{name}` holds a number out of range (64-bit integers and doubles only)", param=name
        ) from None


def parse_chat(body: bytes | bytearray) -> tuple[RawObject, str, Any]:
    """Decode the top level of a chat request: (fields as raw JSON, model, ocr_model)."""
    try:
        obj = object_decoder.decode(body)
    except msgspec.ValidationError:
        raise BadRequest("The request body must be a JSON object") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:  # past ~1000 levels: msgspec's own limit
        raise deep() from None
    raw_model = obj.get("model")
    try:
        model = _str_decoder.decode(raw_model) if raw_model is not None else ""
    except msgspec.ValidationError:
        model = ""
    if not model:
        raise BadRequest("`model` is required and must be a non-empty string", param="model")
    check_name(model, "model")
    messages = obj.get("messages")
    if messages is None:
        raise BadRequest("`messages` is required", param="messages")
    if not is_json(messages, b"["):
        raise BadRequest("`messages` must be an array", param="messages")
    check_redirecting(obj)
    ocr_model = _field(obj, "ocr_model")
    if ocr_model is not None and (not isinstance(ocr_model, str) or not ocr_model):
        raise BadRequest("`ocr_model` must be a non-empty string", param="ocr_model")
    if ocr_model is not None:
        check_name(ocr_model, "ocr_model")
    return obj, model, ocr_model


async def chat_completions(request: web.Request) -> web.StreamResponse:
    cfg = request.app[CONFIG]
    trace = request[TRACE]
    body = await read_body(request)
    obj, model, ocr_model = parse_chat(body)
    if len(body) >= upstream.LARGE_BODY:
        await asyncio.sleep(0)  # so did reading megabytes of JSON
    trace.model = model
    suffix = cfg.ocr.suffix
    has_suffix = model.endswith(suffix) and len(model) > len(suffix)
    if not has_suffix and ocr_model is None:
        trace.real_model = model
        return await forward(request, request.app[ROUTER].route(model), "chat/completions", body)
    check_depth(body)  # the OCR step walks and rebuilds the body: bounded depth first
    real_model = model[: -len(suffix)] if has_suffix else model
    return await ocr_chat(request, obj, real_model, ocr_model or cfg.ocr.model)


async def forward(
    request: web.Request, up: config.Upstream, path: str, body: Any
) -> web.StreamResponse:
    """Send the client's request to ``up`` unchanged (but for headers) and relay the answer."""
    streamed = body is not None and not isinstance(body, bytes | bytearray)  # an upload
    headers = upstream.request_headers(
        request.headers, up, keep_length=streamed, relay_auth=not request.app[CONFIG].auth.keys
    )
    target = upstream.url(up, path, request.rel_url.raw_query_string)
    data = upstream.payload(body, headers) if isinstance(body, bytes | bytearray) else body
    source = await upstream.open_request(
        request.app[SESSION], up, request.method, target, headers=headers, data=data
    )
    request[TRACE].upstream_answered(up, source.status)
    async with source:
        return await relay.relay(request, source, {}, secrets=request.app[SECRETS])


def _ocr_headers(report: OcrReport | None, model: str) -> dict[str, str]:
    headers = {"X-OCR-Model": model}
    if report is not None:
        headers["X-OCR-Images"] = str(report.images)
        headers["X-OCR-Cache-Hits"] = str(report.cache_hits)
        headers["X-OCR-Ms"] = f"{report.ms:.0f}"
    return headers


def _wants_usage(obj: RawObject) -> bool:
    options = _field(obj, "stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


async def ocr_chat(
    request: web.Request, obj: RawObject, real_model: str, ocr_model: str
) -> web.StreamResponse:
    """The OCR pipeline for one chat request."""
    cfg = request.app[CONFIG]
    trace = request[TRACE]
    trace.real_model, trace.ocr_model = real_model, ocr_model
    up = request.app[ROUTER].route(real_model)
    describer = request.app[DESCRIBER]
    describer.check_model(ocr_model)  # 404 unknown, 400 unavailable: before work
    stream = _field(obj, "stream") is True
    edit_stream = stream and _wants_usage(obj)
    scan = await images.scan_and_identify(obj["messages"], cfg.ocr)
    # Images described in memory need nothing more; every other one is decoded and checked
    # now, so that a bad image is a 400 before any OCR call and before a stream is committed.
    hits = describer.memory_hits(scan.images, ocr_model, request.headers)
    await images.validate([im for im in scan.images if im.digest not in hits], cfg.ocr)

    loop = asyncio.get_running_loop()
    response: web.StreamResponse | None = None
    if not (stream and scan.images):  # nothing to keep alive meanwhile: no task needed
        report = await _describe(request, scan.images, ocr_model, hits)
    else:
        ocr_task = loop.create_task(_describe(request, scan.images, ocr_model, hits))
        try:
            done, _ = await asyncio.wait({ocr_task}, timeout=cfg.ocr.keepalive_after_s)
            if not done:
                early = _ocr_headers(None, ocr_model)
                early["X-OCR-Images"] = str(len({im.digest for im in scan.images}))
                response = await relay.start_sse(request, early)
                await relay.keep_alive(response, ocr_task, cfg.ocr.keepalive_interval_s)
            report = await ocr_task
        except ProxyError as exc:
            if response is None:
                raise
            await response.write(relay.error_event(exc))
            await response.write_eof()
            return response
        finally:
            if not ocr_task.done():
                ocr_task.cancel()

    trace.images, trace.cache_hits = report.images, report.cache_hits
    trace.ocr_failures, trace.ocr_ms = report.failures, round(report.ms, 1)
    blocks = []
    key = request.app[DELIMITER_KEY]
    for number, image in enumerate(scan.images, 1):
        described = report.outcomes[image.digest].description
        nonce = delimiter_tag(key, image.digest)  # unknown to whoever wrote the text
        blocks.append(
            reference_block(number, ocr_model, described.text, nonce)
            if described
            else placeholder_block(number, nonce)
        )
    new_body = rewrite(obj, scan, blocks, real_model)
    headers = upstream.request_headers(request.headers, up, relay_auth=not cfg.auth.keys)
    headers["Content-Type"] = "application/json"
    usage = report.usage()
    send = upstream.open_request(
        request.app[SESSION],
        up,
        "POST",
        upstream.url(up, "chat/completions"),
        headers=headers,
        data=upstream.payload(new_body, headers),
    )
    if response is None:
        source = await send
        trace.upstream_answered(up, source.status)
        async with source:
            return await relay.relay(
                request,
                source,
                _ocr_headers(report, ocr_model),
                ocr_usage=usage,
                edit_stream=edit_stream,
                secrets=request.app[SECRETS],
            )

    summary = f": ocr images={report.images} cache_hits={report.cache_hits} ms={report.ms:.0f}\n\n"
    send_task = loop.create_task(send)
    try:
        await relay.keep_alive(
            response, send_task, cfg.ocr.keepalive_interval_s, opening=summary.encode()
        )
        source = await send_task
    except UpstreamError as exc:
        await response.write(relay.error_event(exc))
        await response.write_eof()
        return response
    except BaseException:
        _discard(send_task)
        raise
    trace.upstream_answered(up, source.status)
    async with source:
        await relay.relay_into(
            response,
            source,
            ocr_usage=usage,
            edit_stream=edit_stream,
            secrets=request.app[SECRETS],
            request=request,
        )
    return response


async def _describe(
    request: web.Request, found: list[images.Image], model: str, hits: dict[bytes, Outcome]
) -> OcrReport:
    """The OCR step as one task: fetch remote images (if on), then describe them all."""
    fetcher = request.app.get(FETCHER)
    if fetcher is not None:
        cfg = request.app[CONFIG]
        await images.fetch_remote(found, cfg.ocr, fetcher, cfg.server.max_body_bytes)
    return await request.app[DESCRIBER].describe_all(found, model, request.headers, hits)


def _discard(task: asyncio.Task[aiohttp.ClientResponse]) -> None:
    """Cancel an upstream request nobody waits for, or close the response it already got."""
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None:
        task.result().close()


async def models(request: web.Request) -> web.StreamResponse:
    """The upstreams' model lists merged, each model also offered with the OCR suffix."""
    cfg = request.app[CONFIG]
    session = request.app[SESSION]
    router = request.app[ROUTER]

    async def fetch(up: config.Upstream) -> tuple[int, bytes]:
        headers = upstream.request_headers(request.headers, up, relay_auth=not cfg.auth.keys)
        source = await upstream.open_request(
            session, up, "GET", upstream.url(up, "models"), headers=headers
        )
        async with source:
            return source.status, await source.read()

    results = await asyncio.gather(*(fetch(up) for up in router.upstreams), return_exceptions=True)
    seen: dict[str, dict[str, Any]] = {}
    first_error: BaseException | tuple[int, bytes] | None = None
    for result in results:
        if isinstance(result, BaseException):
            if not isinstance(result, ProxyError):
                raise result
            first_error = first_error or result
            continue
        status, payload = result
        if status != 200:
            first_error = first_error or result
            continue
        try:
            listing = models_decoder.decode(payload)
        except msgspec.DecodeError:
            first_error = first_error or UpstreamError("An upstream's model list is malformed")
            continue
        for entry in listing.data:
            model_id = entry.get("id")
            if isinstance(model_id, str):
                seen.setdefault(model_id, entry)
    if not seen and first_error is not None:
        if isinstance(first_error, ProxyError):
            raise first_error
        if isinstance(first_error, tuple):
            status, payload = first_error
            payload = redact.redact(payload, request.app[SECRETS])
            return web.Response(status=status, body=payload, content_type="application/json")
        raise first_error
    suffix = cfg.ocr.suffix
    data = list(seen.values())
    data += [
        {**entry, "id": model_id + suffix}
        for model_id, entry in seen.items()
        if not model_id.endswith(suffix) and model_id + suffix not in seen
    ]
    body = redact.redact(encoder.encode({"object": "list", "data": data}), request.app[SECRETS])
    return web.Response(body=body, content_type="application/json")


def routes_pattern(globs: tuple[str, ...]) -> re.Pattern[str]:
    """One regex for the ``[server] passthrough_routes`` globs (none: one that matches nothing)."""
    if not globs:
        return re.compile(r"(?!)")
    return re.compile("|".join(fnmatch.translate(glob) for glob in globs))


# Content types the pass-through streams to the upstream unread: uploads, which can be large
# and are not JSON. Every other body is read whole (so `max_body_bytes` applies) and, if it is
# a JSON object, routed by `model` and checked like a chat request: gateways behind the proxy
# may parse a body as JSON whatever its declared type.
_STREAMED = ("multipart/", "application/octet-stream", "audio/", "image/", "video/")


async def _upload(request: web.Request, server: config.Server) -> AsyncIterator[bytes]:
    """A streamed upload, its pieces sent upstream as they come, within the limits of a
    buffered body: all of it within ``body_timeout_s`` (else 408), and a compressed one (which
    aiohttp inflates) within ``max_body_bytes`` once inflated (else 413).

    The piece past a limit is not sent: the send fails instead (``open_request`` raises this
    refusal), so the upstream never gets more. A clock read per piece, no task.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + server.body_timeout_s
    limit = server.max_body_bytes if "Content-Encoding" in request.headers else None
    content = request.content
    sent = 0
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                piece = await content.readany()
        except TimeoutError:
            raise BodyTimeout(
                f"The request body did not arrive within {server.body_timeout_s:g} s"
            ) from None
        if not piece:
            return
        sent += len(piece)
        if limit is not None and sent > limit:
            raise PayloadTooLarge(
                f"The request body is larger than the limit of {limit} bytes once inflated"
            )
        yield piece


def _json_model(body: bytes | bytearray) -> str | None:
    """The ``model`` of a pass-through JSON body, after the checks a chat body gets; None when
    the body is no JSON object (it is forwarded as it is: the upstream judges it)."""
    try:
        obj = object_decoder.decode(body)
    except RecursionError:
        raise deep() from None
    except msgspec.DecodeError:
        return None
    check_redirecting(obj)
    model = _field(obj, "model")
    if not isinstance(model, str) or not model:
        return None
    check_name(model, "model")
    return model


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Any other listed ``/v1/*`` route: relayed both ways, routed by ``model`` if JSON."""
    # The middleware refused every raw path that is not `/v1/` plus canonical segments.
    path = request.rel_url.raw_path[len("/v1/") :]
    if not request.app[PASSTHROUGH].match(path):
        raise NotFound(f"Unknown route {request.method} {request.path}")
    router = request.app[ROUTER]
    up = router.default
    body: Any = None
    if request.body_exists:
        declared = request.headers.get("Content-Type")
        if declared is not None and request.content_type.startswith(_STREAMED):
            body = _upload(request, request.app[CONFIG].server)
        else:
            body = await read_body(request)
            model = _json_model(body)
            if model is not None:
                up = router.route(model)
    return await forward(request, up, path, body)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})

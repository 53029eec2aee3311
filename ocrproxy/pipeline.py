"""The OCR pipeline, run once for every dialect: from a client's body to the relayed answer.

Theory of operation: ``serve`` reads and parses the body (the dialect's top level) and decides
whether OCR runs: the model ends with the suffix, the body names an ``ocr_model``, the request
has an ``X-OCR-Model`` header, or the model matches ``[ocr] text_only_models``. If not, the
body is forwarded byte for byte. If so, each step runs once, in this order: check the model
against its upstream's model list (``catalog``: a 404 before any OCR call) → find the images
(the dialect) → identify them (size, digest) → memory hits → validate the rest (decode, format,
dimensions: a bad image is a 400 before any OCR call and before a stream is committed) → fetch
remote ones → describe (cache, single-flight, OCR model or local engine) → rewrite (the
dialect splices reference blocks in place) → send upstream → relay, with ``usage.ocr`` where
the dialect's answers carry usage.

A streaming request whose OCR step outlasts ``keepalive_after_s`` gets its 200 and SSE headers
early, then the dialect's keep-alives, so that nginx and chat frontends do not give up while
the images are being described (with ``[ocr] progress``, a chat stream at once, with notes on
the reading: ``progress``); an error after that point is an error event in the dialect's
framing. ``serve(..., counting=True)`` is the token-counting variant (``_count``): it rewrites
with descriptions cached in memory only (a placeholder of typical size for the others) and never
calls the OCR model or fetches an image.

A request without OCR is forwarded (``forward``); if its upstream turns its images away (a
4xx that says so, before any byte reached the client) it is sent again through OCR, once, and
the model is learned as text-only for a while (``fallback``): its later requests with images
go to OCR at once.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Coroutine, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from . import catalog, config, fallback, images, notes, progress, relay, timeline, upstream
from .body import read_body
from .describe import Describer, OcrReport, Outcome
from .dialects import Dialect, Found, Parsed
from .errors import BadRequest, ProxyError, UpstreamError
from .fetch import Fetcher
from .forward import Refused, forward_watched
from .guard import check_depth, check_name
from .rewrite import delimiter_tag, placeholder_block, reference_block
from .state import (
    CATALOG,
    CONFIG,
    DELIMITER_KEY,
    DESCRIBER,
    FETCHER,
    ROUTER,
    SECRETS,
    SESSION,
    TRACE,
)

# Request JSON at least this large (bytes) is walked in a worker thread.
FIND_THREAD_THRESHOLD = 1024 * 1024
# What ``count`` puts in place of an image with no cached description: about as much text as
# a description usually is (the default prompt's answers run ~150-400 tokens).
TYPICAL_DESCRIPTION = "(not described yet) " * 50


def ocr_switch(
    settings: config.Ocr, parsed: Parsed, headers: Mapping[str, str]
) -> tuple[str, str] | None:
    """(real model, OCR model) if OCR runs for this request, else None."""
    model, suffix = parsed.model, settings.suffix
    header = headers.get("X-OCR-Model")
    if header is not None:
        header = header.strip()
        if not header:
            raise BadRequest("The X-OCR-Model header must name a model", param="X-OCR-Model")
        check_name(header, "X-OCR-Model")
    ocr_model = parsed.ocr_model or header or settings.model
    if model.endswith(suffix) and len(model) > len(suffix):
        return model[: -len(suffix)], ocr_model
    if parsed.ocr_model is not None or header is not None:
        return model, ocr_model
    if any(fnmatch.fnmatchcase(model, glob) for glob in settings.text_only_models):
        return model, ocr_model
    return None


async def serve(
    request: web.Request, dialect: Dialect, path: str | None = None, *, counting: bool = False
) -> web.StreamResponse:
    """A dialect's route (``path``: its main one): forwarded as it is, or through the OCR
    pipeline; ``counting``, through ``count`` instead."""
    cfg = request.app[CONFIG]
    trace = request[TRACE]
    body = await read_body(request)
    parsed = dialect.parse(body)
    if len(body) >= upstream.LARGE_BODY:
        await asyncio.sleep(0)  # decoding megabytes of JSON held the loop: let others run
    trace.model = parsed.model
    switch = ocr_switch(cfg.ocr, parsed, request.headers)
    if switch is None:
        trace.real_model = parsed.model
        up = request.app[ROUTER].route(parsed.model, dialect.api)
        trace.routed(up)
        store = request.app[fallback.STORE]
        learned = bool(store) and store.knows(_scope(request, up), parsed.model)  # empty: free
        if not (learned and await _has_images(dialect, parsed, cfg.ocr, len(body))):
            answer = await forward_watched(request, up, path or dialect.path, body, dialect)
            if not isinstance(answer, Refused):
                return answer
            return await _refused(request, dialect, parsed, body, path, counting, answer, up)
        trace.fallback = fallback.LEARNED  # as if it matched `text_only_models`
        switch = parsed.model, cfg.ocr.model
    check_depth(body)  # the OCR step walks and rebuilds the body: bounded depth first
    if counting:
        return await _count(request, dialect, parsed, path or dialect.path, *switch)
    return await _run(request, dialect, parsed, *switch)


async def _refused(
    request: web.Request,
    dialect: Dialect,
    parsed: Parsed,
    body: bytes | bytearray,
    path: str | None,
    counting: bool,
    refused: Refused,
    up: config.Upstream,
) -> web.StreamResponse:
    """An upstream's 4xx to a request without OCR: if it turned the request's images away, the
    request goes through OCR now (once: that answer is relayed whatever it is; the model is
    learned text-only if it succeeded), else the answer is relayed, with a hint naming the
    ``-ocr`` model if OCR would have helped."""
    settings, secrets, trace = request.app[CONFIG].ocr, request.app[SECRETS], request[TRACE]
    if not (
        fallback.rejects_images(refused.source.status, refused.payload)
        and await _has_images(dialect, parsed, settings, len(body))
    ):
        return relay.error_response(refused.source, refused.payload, secrets)
    model = parsed.model
    if not (
        settings.fallback_on_rejection and fallback.usable(request.app[DESCRIBER], settings.model)
    ):
        hinted = notes.with_message_note(refused.payload, fallback.hint(model + settings.suffix))
        return relay.error_response(refused.source, hinted or refused.payload, secrets)
    trace.fallback = fallback.REJECTED
    # The resend's answer overwrites the trace's TTFB: the refusal's is kept in its step.
    timeline.step("refused", upstream=up.name, status=refused.source.status, ttfb_ms=trace.ttfb_ms)
    check_depth(body)
    if counting:
        response = await _count(
            request, dialect, parsed, path or dialect.path, model, settings.model
        )
    else:
        response = await _run(request, dialect, parsed, model, settings.model)
    if trace.upstream_status is not None and 200 <= trace.upstream_status < 300:  # the resend's
        request.app[fallback.STORE].learn(_scope(request, up), model, up.name)
    return response


def _scope(request: web.Request, up: config.Upstream) -> tuple[int, bytes]:
    """Whose view of ``up`` this request has, for what the fallback learns (``catalog``)."""
    return catalog.scope_of(up, request.headers, relay_auth=not request.app[CONFIG].auth.keys)


async def _has_images(dialect: Dialect, parsed: Parsed, settings: config.Ocr, size: int) -> bool:
    """Whether the request has images (one whose part is malformed counts: the OCR route then
    refuses it in its own words)."""
    try:
        return bool((await _images_of(dialect, parsed, settings, size)).images)
    except ProxyError:
        return True


async def _images_of(dialect: Dialect, parsed: Parsed, settings: config.Ocr, size: int) -> Found:
    """The request's images; a large request is walked in a worker thread."""
    if size >= FIND_THREAD_THRESHOLD:
        return await asyncio.to_thread(dialect.find, parsed, settings.max_images)
    return dialect.find(parsed, settings.max_images)


async def _find(dialect: Dialect, parsed: Parsed, settings: config.Ocr, size: int) -> Found:
    """The request's images, identified."""
    found = await _images_of(dialect, parsed, settings, size)
    await images.identify(found.images, settings)
    return found


async def _prepare(
    request: web.Request, dialect: Dialect, parsed: Parsed, real_model: str, ocr_model: str
) -> tuple[config.Upstream, Found, dict[bytes, Outcome]]:
    """Route the request, admit the OCR model, find and identify the images, and look them up
    in memory: (upstream, images, memory hits by digest). Nothing is decoded yet."""
    trace = request[TRACE]
    trace.real_model, trace.ocr_model = real_model, ocr_model
    typed = parsed.model if parsed.model != real_model else None
    up = request.app[ROUTER].route(real_model, dialect.api, typed=typed)
    trace.routed(up)
    describer = request.app[DESCRIBER]
    describer.check_model(ocr_model)  # 404 unknown, 400 unavailable: before work
    settings = request.app[CONFIG].ocr
    if trace.fallback is None:  # else the upstream has just taken the model's name
        await request.app[CATALOG].check(
            up, request.headers, real_model, parsed.model, settings.suffix
        )
    items = parsed.obj.get(dialect.items)  # a dialect may let it be absent (Responses' input)
    size = len(memoryview(items)) if items is not None else 0
    found = await _find(dialect, parsed, settings, size)
    timeline.step("scan", images=len(found.images))
    hits = describer.memory_hits(found.images, ocr_model, request.headers)
    trace.images, trace.cache_hits = len({im.digest for im in found.images}), len(hits)
    return up, found, hits


def ocr_headers(report: OcrReport | None, model: str) -> dict[str, str]:
    headers = {"X-OCR-Model": model}
    if report is not None:
        headers["X-OCR-Images"] = str(report.images)
        headers["X-OCR-Cache-Hits"] = str(report.cache_hits)
        headers["X-OCR-Failures"] = str(report.failures)
        headers["X-OCR-Ms"] = f"{report.ms:.0f}"
    return headers


def blocks(found: Found, report: OcrReport, model: str, key: bytes) -> list[str]:
    """The text standing in for each image, in order: its reference block, or a placeholder."""
    out = []
    for number, image in enumerate(found.images, 1):
        outcome = report.outcomes[image.digest]
        described = outcome.description
        reason = outcome.reason.name if outcome.reason else None
        timeline.image(number, image.digest, described.text if described else None, reason)
        nonce = delimiter_tag(key, image.digest)  # unknown to whoever wrote the text
        out.append(
            reference_block(number, model, described.text, nonce)
            if described
            else placeholder_block(number, nonce, outcome.reason)
        )
    return out


async def _run(
    request: web.Request, dialect: Dialect, parsed: Parsed, real_model: str, ocr_model: str
) -> web.StreamResponse:
    """The OCR pipeline for one request."""
    cfg = request.app[CONFIG]
    trace = request[TRACE]
    edit = not parsed.stream or dialect.edits_stream(parsed)  # a bad field is a 400 now
    up, found, hits = await _prepare(request, dialect, parsed, real_model, ocr_model)
    await images.validate([im for im in found.images if im.digest not in hits], cfg.ocr)

    described = await _describe_alive(request, dialect, parsed, found, ocr_model, hits, up)
    if isinstance(described, web.StreamResponse):
        return described  # committed early, then failed: the error event was sent
    report, response = described
    trace.images, trace.cache_hits = report.images, report.cache_hits
    trace.ocr_failures, trace.ocr_ms = report.failures, round(report.ms, 1)
    text = blocks(found, report, ocr_model, request.app[DELIMITER_KEY])
    new_body = dialect.splice(parsed, found, text, real_model)
    usage = dialect.ocr_usage(report.usage())
    if response is None:
        source = await _send(request, up, dialect.path, new_body)
        trace.upstream_answered(up, source.status)
        async with source:
            return await relay.relay(
                request,
                source,
                ocr_headers(report, ocr_model),
                dialect,
                ocr_usage=usage,
                edit_stream=edit,
                secrets=request.app[SECRETS],
                not_found_note=catalog.requested_as(parsed.model, real_model),
            )
    summary = (
        f": ocr images={report.images} cache_hits={report.cache_hits} "
        f"failures={report.failures} ms={report.ms:.0f}\n\n"
    )
    loop = asyncio.get_running_loop()
    send_task = loop.create_task(_send(request, up, dialect.path, new_body))
    try:
        await relay.keep_alive(
            response, send_task, cfg.ocr.keepalive_interval_s, dialect, opening=summary.encode()
        )
        source = await send_task
    except UpstreamError as exc:
        await response.write(dialect.error_event(exc))
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
            dialect,
            ocr_usage=usage,
            edit_stream=edit,
            secrets=request.app[SECRETS],
            request=request,
            not_found_note=catalog.requested_as(parsed.model, real_model),
        )
    return response


async def _describe_alive(
    request: web.Request,
    dialect: Dialect,
    parsed: Parsed,
    found: Found,
    model: str,
    hits: dict[bytes, Outcome],
    home: config.Upstream,
) -> tuple[OcrReport, web.StreamResponse | None] | web.StreamResponse:
    """The OCR step; a stream that waits past ``keepalive_after_s`` is committed meanwhile.

    Returns the report and the committed stream (if it was), or only the stream when the OCR
    step failed after the commit (the error event was then written and the stream ended).
    """
    if not (parsed.stream and found.images):  # nothing to keep alive meanwhile: no task needed
        return await _describe(request, found.images, model, hits, home), None
    settings = request.app[CONFIG].ocr
    note = progress.plan(request, dialect, parsed, found, hits, model)
    task = asyncio.get_running_loop().create_task(
        _describe(request, found.images, model, hits, home)
    )
    response: web.StreamResponse | None = None
    try:
        after = settings.keepalive_after_s  # with progress notes: commit at once
        if note is not None or not (await asyncio.wait({task}, timeout=after))[0]:
            early = ocr_headers(None, model)
            early["X-OCR-Images"] = str(len({im.digest for im in found.images}))
            response = await relay.start_sse(request, early, dialect)
            opening = note.opening if note else None
            interval = settings.keepalive_interval_s
            await relay.keep_alive(response, task, interval, dialect, opening=opening)
        report = await task
        if note is not None and response is not None:
            await response.write(note.closing(report))
        return report, response
    except ProxyError as exc:
        if response is None:
            raise
        await response.write(dialect.error_event(exc))
        await response.write_eof()
        return response
    finally:
        if not task.done():
            task.cancel()


async def _describe(
    request: web.Request,
    found: list[images.Image],
    model: str,
    hits: dict[bytes, Outcome],
    home: config.Upstream,
) -> OcrReport:
    app = request.app
    return await describe(
        found, model, request.headers, app[DESCRIBER], app[CONFIG], app.get(FETCHER), hits, home
    )


async def describe(
    found: list[images.Image],
    model: str,
    headers: Mapping[str, str],
    describer: Describer,
    cfg: config.Config,
    fetcher: Fetcher | None,
    hits: dict[bytes, Outcome] | None = None,
    home: config.Upstream | None = None,
) -> OcrReport:
    """The OCR step as one task: fetch remote images (if on), then describe them all
    (``home``: the upstream the request is for, see ``Describer.describe_all``)."""
    if fetcher is not None:
        await images.fetch_remote(found, cfg.ocr, fetcher, cfg.server.max_body_bytes)
    return await describer.describe_all(found, model, headers, hits, home)


def _send(
    request: web.Request, up: config.Upstream, path: str, body: bytes
) -> Coroutine[Any, Any, aiohttp.ClientResponse]:
    """The rewritten request, sent to ``up`` (awaited, or wrapped in a task, at once)."""
    cfg = request.app[CONFIG]
    headers = upstream.request_headers(request.headers, up, relay_auth=not cfg.auth.keys)
    headers["Content-Type"] = "application/json"
    return upstream.open_request(
        request.app[SESSION],
        up,
        "POST",
        upstream.url(up, path, request.rel_url.raw_query_string),
        headers=headers,
        data=upstream.payload(body, headers),
    )


def _discard(task: asyncio.Task[aiohttp.ClientResponse]) -> None:
    """Cancel an upstream request nobody waits for, or close the response it already got."""
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None:
        task.result().close()


async def _count(
    request: web.Request,
    dialect: Dialect,
    parsed: Parsed,
    path: str,
    real_model: str,
    ocr_model: str,
) -> web.StreamResponse:
    """A token count of what the upstream would be sent: images in place as their
    descriptions cached in memory (a placeholder of typical size for the others). No OCR
    call, no fetch, no wait on the shared tier, ever: clients call this many times a second."""
    trace = request[TRACE]
    up, found, hits = await _prepare(request, dialect, parsed, real_model, ocr_model)
    key = request.app[DELIMITER_KEY]
    text = []
    for number, image in enumerate(found.images, 1):
        hit = hits.get(image.digest)
        known = hit.description.text if hit is not None and hit.description else None
        nonce = delimiter_tag(key, image.digest)
        text.append(reference_block(number, ocr_model, known or TYPICAL_DESCRIPTION, nonce))
    new_body = dialect.splice(parsed, found, text, real_model)
    source = await _send(request, up, path, new_body)
    trace.upstream_answered(up, source.status)
    async with source:
        note = catalog.requested_as(parsed.model, real_model)
        return await relay.relay(
            request, source, {}, dialect, secrets=request.app[SECRETS], not_found_note=note
        )

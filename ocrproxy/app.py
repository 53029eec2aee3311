"""Build the aiohttp application: shared state under typed keys, middleware, routes.

One middleware wraps every request: it assigns the request id (kept from a sane incoming
``X-Request-Id``, else new), refuses a path that is not spelled canonically, checks the client
key on ``/v1`` routes (``Authorization: Bearer`` or ``x-api-key``), renders every
``ProxyError`` in the error shape of the request's dialect (Anthropic's under ``/v1/messages``
and for an Anthropic client of the model routes, OpenAI's elsewhere), turns anything
unexpected into a 500 without leaking internals, counts the request in the metrics and writes
the one access-log line (one layer: each middleware is a wrapper and a coroutine more on every
request). The client session, cache and describer are opened and closed in a ``cleanup_ctx``.

Paths are judged as the client sent them (``rel_url.raw_path``), not as aiohttp decoded them:
the pass-through forwards the raw path, so a dot segment (``..``, ``%2e%2e``, ``.%2E``), an
encoded slash or backslash, a raw backslash, an empty segment (``//``, a trailing ``/``) or an
encoded control character would reach the upstream outside its base URL, or give one route
several spellings that skip the chat route's rules. Such a path is a 400 ``invalid_path``
before any key check or routing work, and is never forwarded. Normal paths pay five substring
tests; only a path with ``%``, ``/.``, ``//``, a backslash or a trailing slash runs the regex.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from . import (
    body,
    config,
    current,
    fallback,
    handlers,
    local,
    logs,
    metrics,
    models,
    redact,
    relay,
    rewrite,
    state,
    streams,
    tiers,
    timeline,
    ui,
    upstream,
)
from .admission import Budget as PixelBudget
from .cache import DescriptionCache, MemoryLRU
from .catalog import Catalog
from .describe import Describer
from .errors import BadRequest, MethodNotAllowed, NotFound, ProxyError, Unauthorized
from .fetch import Fetcher
from .ocr_remote import RemoteReader

log = logging.getLogger("ocrproxy.access")
stall_log = logging.getLogger("ocrproxy.stall")  # the loop watchdog's: not a request's line
# The local engine's bytes of pixels: one budget for the process, carried over by a reload
# (server.py), so that an old generation draining and the new one share one bound.
LOCAL_BUDGET: web.AppKey[PixelBudget] = web.AppKey("local_budget", PixelBudget)

_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})  # probes: debug, not info
# (and the live page's own calls, which poll: its refusals stay at info)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# A path with one of these is refused (case-insensitive): an encoded dot, slash, backslash or
# control character; a raw backslash; an empty segment; a `.` or `..` segment (also `..;x`,
# which Java servers read as `..`); a trailing slash.
_BAD_PATH = re.compile(r"%(?:2e|2f|5c|[01][0-9a-f]|7f)|\\|//|/\.\.?(?:/|;|$)|./$", re.I)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Ids:
    """Random 128-bit ids as 32 hex digits, cut from a pool of random hex refilled 256 ids at a
    time: one ``getrandom`` call (or a UUID object) per request was a measurable cost."""

    _POOL = 16 * 256

    def __init__(self) -> None:
        self._pool = ""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)  # a worker must not repeat its parent

    def _forget(self) -> None:
        self._pool, self._at = "", 0

    def new(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(self._POOL).hex(), 0
        self._at = at + 32
        return self._pool[at : at + 32]


_ids = _Ids()


def _request_id(request: web.Request) -> str:
    incoming = request.headers.get("X-Request-Id", "")
    return incoming if _REQUEST_ID.match(incoming) else _ids.new()


def _check_path(request: web.Request) -> None:
    """Refuse a path that is not the one canonical spelling of itself (see the module doc)."""
    raw = request.rel_url.raw_path
    if not ("%" in raw or "/." in raw or "//" in raw or "\\" in raw or raw[-1:] == "/"):
        return  # the common case: nothing that could be a dot segment, an escape or a `//`
    if _BAD_PATH.search(raw) or (
        # `/%76%31/...` is routed as `/v1/...` but would not be forwarded below /v1
        not raw.startswith("/v1/") and request.path.startswith("/v1")
    ):
        raise BadRequest(
            "The request path must not contain `.` or `..` segments, empty segments, a "
            "trailing slash, backslashes or percent-encoded dots, slashes or control characters",
            code="invalid_path",
        )


def _check_authorization(request: web.Request) -> None:
    # aiohttp decodes header bytes that are not UTF-8 as surrogates: such a value cannot be
    # compared as bytes, nor sent on upstream in relay mode.
    for name in ("Authorization", "x-api-key"):
        value = request.headers.get(name)
        if value is not None and not value.isascii():
            raise BadRequest(f"The {name} header must be ASCII", code="invalid_header")


def _check_key(request: web.Request, keys: tuple[str, ...]) -> None:
    """The client's key, as ``Authorization: Bearer`` or as ``x-api-key`` (Anthropic clients),
    must be one of ``keys``."""
    headers = request.headers
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    # Either may hold it: the anthropic SDK sends both when given an api_key and a token.
    tokens = (
        value.strip().encode() if scheme.lower() == "bearer" else b"",
        headers.get("x-api-key", "").strip().encode(),  # ASCII: checked above
    )
    matched = False
    for key in keys:
        for token in tokens:
            matched |= bool(token) and hmac.compare_digest(token, key.encode())
    if not matched:
        raise Unauthorized(
            "Incorrect or missing API key. Send `Authorization: Bearer <key>` or "
            "`x-api-key: <key>` with a key this proxy was configured with."
        )


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    cfg = app[state.CONFIG]
    counters = app[metrics.METRICS]
    trace = state.Trace(_request_id(request))
    request[state.TRACE] = trace
    token = current.request.set(trace)
    recorder = app.get(timeline.RECORDER)  # only with [ui] enabled
    recording = None
    if recorder is not None and timeline.recorded(request.path):
        recording = recorder.begin(request, trace)
    counters.started()
    response: web.StreamResponse | None = None
    error: BaseException | None = None
    status = 500
    try:
        _check_path(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response = _preflight(request, cfg.server.cors_origins)
            return response
        if request.path.startswith("/v1"):
            _check_authorization(request)
            if cfg.auth.keys:
                _check_key(request, cfg.auth.keys)
        response = await handler(request)
    except ProxyError as exc:
        error = exc
        response = _render(request, exc)
    except web.HTTPException as exc:
        if exc.status == 404:
            response = _render(request, NotFound(f"Unknown route {request.method} {request.path}"))
        elif exc.status == 405:
            refused = MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}")
            response = _render(request, refused)
        else:
            status = exc.status
            stamp(request, exc)
            raise
    except (ConnectionResetError, asyncio.CancelledError):
        status = 499  # the client went away (or a shutdown cut the request)
        response = streams.ended_by_shutdown(request)  # a stream a shutdown ended: logged as sent
        raise
    except Exception:
        log.exception("unhandled error")
        response = _render(request, ProxyError("The proxy failed to handle this request"))
    finally:
        if response is not None:
            status = response.status
            if not response.prepared:
                stamp(request, response)
        body.release(request)
        counters.finished(request, trace, status, error)
        _access_log(request, trace, status, response)
        if recording is not None and recorder is not None:
            recorder.finish(trace, recording, status)
        current.request.reset(token)
    return response


def _render(request: web.Request, error: ProxyError) -> web.Response:
    """``error`` in the shape of the dialect the request speaks."""
    return error.to_response(body=handlers.dialect_of(request).error_body(error))


def _access_log(
    request: web.Request,
    trace: state.Trace,
    status: int,
    response: web.StreamResponse | None,
) -> None:
    if response is not None and response.prepared:
        bytes_out = response.body_length
    elif isinstance(response, web.Response) and response.body is not None:
        bytes_out = len(response.body) if isinstance(response.body, bytes) else 0
    else:
        bytes_out = 0
    quiet = request.path in _QUIET_ROUTES or request.path.startswith("/ui")  # probes, the page
    level = logging.DEBUG if quiet and status < 400 else logging.INFO
    logs.access(
        log,
        level,
        {
            "request_id": trace.request_id,
            "method": request.method,
            "route": request.path,
            "remote": request.remote,
            "forwarded_for": request.headers.get("X-Forwarded-For"),
            "status": status,
            "model": trace.model,
            "real_model": trace.real_model,
            "ocr_model": trace.ocr_model,
            "images": trace.images,
            "cache_hits": trace.cache_hits,
            "ocr_failures": trace.ocr_failures,
            "ocr_ms": trace.ocr_ms,
            "upstream": trace.upstream,
            "upstream_status": trace.upstream_status,
            "ttfb_ms": trace.ttfb_ms,
            "fallback": trace.fallback,
            "total_ms": round((time.monotonic() - trace.started) * 1000, 2),
            "bytes_out": bytes_out,
        },
    )


_EXPOSED = (
    "X-Request-Id, X-Upstream-Request-Id, X-OCR-Model, X-OCR-Images, X-OCR-Cache-Hits, "
    "X-OCR-Failures, X-OCR-Ms, X-OCR-Fallback"
)


def _allowed_origin(request: web.Request, origins: tuple[str, ...]) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None or not origins:
        return None
    return origin if "*" in origins or origin in origins else None


def _preflight(request: web.Request, origins: tuple[str, ...]) -> web.Response:
    """Answer a browser's CORS preflight (no key needed: browsers send none with it)."""
    origin = _allowed_origin(request, origins)
    if origin is None:
        return web.Response(status=403, headers={"Vary": "Origin"})
    requested = request.headers.get("Access-Control-Request-Headers", "")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": requested or "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        },
    )


def stamp(request: web.Request, response: web.StreamResponse) -> None:
    """Add the headers every response carries, before it is sent.

    Called by the middleware for a response the handler returns and, through ``_commit``, for
    one sent earlier (aiohttp's on_response_prepare signal did this for ~5 µs a request more).
    """
    trace = request.get(state.TRACE)
    if trace is not None:
        response.headers["X-Request-Id"] = trace.request_id
        if trace.fallback is not None:  # the request went through OCR without a switch
            response.headers["X-OCR-Fallback"] = trace.fallback
    origins = request.app[state.CONFIG].server.cors_origins
    origin = _allowed_origin(request, origins) if origins else None
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _EXPOSED
        response.headers.add("Vary", "Origin")


def _commit(request: web.Request, response: web.StreamResponse) -> None:
    """A response sent before its handler returns (a stream, a large body): stamp and count."""
    stamp(request, response)
    request.app[metrics.METRICS].prepared(request, response)


async def _state(app: web.Application) -> AsyncIterator[None]:
    cfg = app[state.CONFIG]
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        trust_env=False,
    )  # every request sets Accept-Encoding itself (identity): aiohttp's default is not added
    tier = tiers.open_tier(cfg.cache, cfg.ocr.timeout_s)
    if isinstance(tier, tiers.SqliteTier):
        await tier.open()
    lru = MemoryLRU(cfg.cache.max_entries, cfg.cache.max_bytes, cfg.cache.ttl_s)
    cache = DescriptionCache(lru, tier, on_lookup=app[metrics.METRICS].cache_lookup)
    app[state.SESSION] = session
    app[state.CACHE] = cache
    relay_auth = not cfg.auth.keys
    catalog = Catalog(models.lister(session, relay_auth=relay_auth), relay_auth=relay_auth)
    app[state.CATALOG] = catalog
    engine = local.open_engine(cfg.ocr.local, budget=app[LOCAL_BUDGET])
    reader = RemoteReader(
        session, cfg.ocr, config.secrets(cfg), on_call=app[metrics.METRICS].ocr_call
    )
    app[state.DESCRIBER] = Describer(
        reader,
        app[state.ROUTER],
        cfg.ocr,
        cache,
        engine,
        client_keys=bool(cfg.auth.keys),
        scope=cfg.cache.scope,
    )
    try:
        await engine.start()  # RapidOCR loads its models (1.5-6 s) now, not on a request
        if cfg.ocr.model == cfg.ocr.local_alias and (problem := engine.problem()):
            local.log.warning(
                "the default OCR model is the local engine, which can't run: %s", problem
            )
        yield
    finally:
        await catalog.close()
        await cache.close()
        engine.close()
        await session.close()


async def _fetcher(app: web.Application) -> AsyncIterator[None]:
    """The image fetcher's own session, kept apart from the upstream one (own resolver, rules)."""
    if not app[state.CONFIG].ocr.fetch_images:
        yield
        return
    fetcher = Fetcher(app[state.CONFIG].ocr)
    app[state.FETCHER] = fetcher
    try:
        yield
    finally:
        await fetcher.close()


async def _watch_loop(threshold_s: float, period_s: float = 0.05) -> None:
    """Warn whenever the event loop was blocked longer than ``threshold_s`` (as the logger
    ``ocrproxy.stall``, at the configured log level like every line, with no request's id).

    The warning says how much CPU the loop's thread used meanwhile: close to the stall, the
    proxy's own code was busy; near zero, a blocking call slept (or the machine starved us).
    """
    loop = asyncio.get_running_loop()
    while True:
        started, cpu_started = loop.time(), time.thread_time()
        await asyncio.sleep(period_s)
        stalled = loop.time() - started - period_s
        if stalled > threshold_s:
            cpu = time.thread_time() - cpu_started
            fields = {"stalled_ms": round(stalled * 1000), "cpu_ms": round(cpu * 1000)}
            stall_log.warning(
                "event loop stalled for %.0f ms",
                stalled * 1000,
                extra={"request_id": "-", "fields": fields},
            )


async def _watchdog(app: web.Application) -> AsyncIterator[None]:
    threshold = app[state.CONFIG].server.stall_warning_ms / 1000
    task = asyncio.get_running_loop().create_task(_watch_loop(threshold))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def create_app(cfg: config.Config) -> web.Application:
    """The proxy as an aiohttp Application, ready for ``web.run_app`` or a test client."""
    app = web.Application(client_max_size=cfg.server.max_body_bytes, middlewares=[middleware])
    app[state.CONFIG] = cfg
    app[state.ROUTER] = upstream.Router(cfg.upstreams)
    relayed = config.secrets(cfg, admin=False)
    app[state.SECRETS] = redact.secrets_of(relayed)
    # Not the admin key: turning the page on, or changing its key, must not change the tags
    # (an upstream's prefix cache) nor make two instances of one deployment tag differently.
    app[state.DELIMITER_KEY] = rewrite.delimiter_key(relayed)
    app[fallback.STORE] = fallback.Learned(cfg.ocr.learned_ttl_s)
    app[relay.WRITE_TIMEOUT] = cfg.server.write_timeout_s
    app[state.PASSTHROUGH] = handlers.routes_pattern(cfg.server.passthrough_routes)
    app.cleanup_ctx.append(_state)
    app.cleanup_ctx.append(_fetcher)
    if cfg.server.stall_warning_ms > 0:
        app.cleanup_ctx.append(_watchdog)
    app[relay.STAMP] = _commit
    app[body.BUDGET] = body.Budget(cfg.server)
    app[LOCAL_BUDGET] = PixelBudget(cfg.ocr.local.max_decoded_bytes)
    app[streams.STREAMS] = streams.Streams()
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/responses", handlers.responses)
    app.router.add_post("/v1/messages", handlers.messages)
    app.router.add_post("/v1/messages/count_tokens", handlers.count_tokens)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_route("*", "/v1/{tail:.*}", handlers.passthrough)
    app.router.add_get("/healthz", handlers.healthz)
    metrics.install(app)
    if cfg.ui.enabled:
        app[timeline.RECORDER] = timeline.Recorder(cfg.ui, app[metrics.METRICS].models)
        ui.install(app)
    return app

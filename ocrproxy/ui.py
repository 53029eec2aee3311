"""The live page: ``/ui`` and the JSON and event feed it reads, for the operator only.

Theory of operation: the routes exist only with ``[ui] enabled`` (else ``/ui`` is a 404 like any
unknown path). They answer where ``/metrics`` does (``metrics.guard``): on ``[server]
metrics_port`` when it is set, else on the main port to *direct* loopback clients only (a
request that came through nginx is a 404), and only under a loopback host name or the
metrics port's address (any other ``Host`` is a page elsewhere whose name was pointed here:
DNS rebinding; a 404 too). The page itself (``/ui``, ``/ui/app.js``,
``/ui/app.css``, ``/ui/icon.svg``: package data in ``ocrproxy/page/``) holds no data and
needs no key; it asks for ``[ui] admin_key``, keeps it in ``sessionStorage`` and sends it as
``Authorization: Bearer`` on every call for data: ``/ui/recent``, ``/ui/totals``,
``/ui/requests/{id}`` and the feed ``/ui/events``. Any other credential, a client key
included, is a 401.

The feed is server-sent events read with ``fetch()`` and a stream reader rather than
``EventSource``, which cannot send a header: so one credential, in one header, serves every
call, and no token is ever put in a URL (URLs land in access logs and browser history) nor
minted and kept on the server. A row arrives as ``data: {json}``, with a comment every
``KEEPALIVE_S`` so idle connections stay open; a shutdown ends every feed at once.

Every response carries ``Cache-Control: no-store`` and a Content-Security-Policy that allows
nothing but this origin's own script and style files (no inline code, no frames, no other
hosts), and every data answer is redacted of the configured secrets (``redact``) before it is
sent: a client may have typed a key into a model name. No answer holds image bytes: the
recorder (``timeline``) never keeps them.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from . import config, metrics, redact, state, timeline
from .errors import NotFound, ProxyError, Unauthorized
from .timeline import RECORDER, Recorder

KEEPALIVE_S = 10.0

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

_ASSETS = {  # path -> (file in ocrproxy/page, content type)
    "/ui": ("index.html", "text/html"),
    "/ui/app.js": ("app.js", "text/javascript"),
    "/ui/app.css": ("app.css", "text/css"),
    "/ui/icon.svg": ("icon.svg", "image/svg+xml"),  # else the browser asks for /favicon.ico
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Masked in every data answer: the relay's secrets and the admin key, which relayed traffic is
# not searched for (``config.secrets``).
PAGE_SECRETS = web.AppKey("ui_secrets", tuple[bytes, ...])


def _asset(name: str) -> bytes:
    return importlib.resources.files("ocrproxy").joinpath("page", name).read_bytes()


def _operator(handler: Handler, *, key: bool = True) -> Handler:
    """``handler`` for the operator only: the guard, the admin key (if ``key``), the headers,
    and errors rendered here (the metrics port has no middleware to render them)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            metrics.guard(request)
            _check_host(request)
            if key:
                _check_admin(request)
            response = await handler(request)
        except ProxyError as exc:
            response = exc.to_response()
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    return wrapped


# Host names the page answers to: the loopback names (a tunnel, the machine itself), and the
# operator port's own address. Any other is a page elsewhere whose name now points here (DNS
# rebinding): it could guess the admin key at loopback speed.
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def _check_host(request: web.Request) -> None:
    host = (request.host or "").lower()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    allowed = _LOOPBACK_HOSTS | {metrics.main_app(request)[state.CONFIG].server.metrics_host}
    if name not in allowed:
        raise NotFound("Not found")


def _check_admin(request: web.Request) -> None:
    admin = metrics.main_app(request)[state.CONFIG].ui.admin_key.encode()
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    token = value.strip().encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" else b""
    if not (token and hmac.compare_digest(token, admin)):
        raise Unauthorized("This page needs the [ui] admin_key, as `Authorization: Bearer <key>`")


def _masked(encoded: bytes, secrets: tuple[bytes, ...]) -> bytes:
    """JSON with every secret masked, also as JSON spells it (a ``\\`` or ``"`` in a secret is
    escaped once it sits in a string)."""
    spelled = tuple(orjson.dumps(s.decode("utf-8", "replace"))[1:-1] for s in secrets)
    return redact.redact(encoded, tuple(dict.fromkeys(secrets + spelled)))


def _recorder(request: web.Request) -> Recorder:
    return metrics.main_app(request)[RECORDER]


def _json(request: web.Request, value: Any) -> web.Response:
    """``value`` as JSON, every configured secret masked."""
    body = _masked(orjson.dumps(value), metrics.main_app(request)[PAGE_SECRETS])
    return web.Response(body=body, content_type="application/json")


async def recent(request: web.Request) -> web.Response:
    """The ring, oldest first, and which worker process answered."""
    rows = [timeline.row(trace) for trace in _recorder(request).rows]
    return _json(request, {"worker": os.getpid(), "rows": rows})


async def totals(request: web.Request) -> web.Response:
    return _json(request, {"worker": os.getpid(), **_recorder(request).totals.as_dict()})


async def one_request(request: web.Request) -> web.Response:
    """One recorded request: its row and the steps of its timeline."""
    found = _recorder(request).find(request.match_info["request_id"])
    if found is None:
        raise NotFound("No such request among the recent ones of this worker")
    return _json(request, {"row": timeline.row(found), "steps": timeline.steps(found)})


async def events(request: web.Request) -> web.StreamResponse:
    """New rows as they are recorded, as server-sent events, until the client or a shutdown
    ends the feed."""
    recorder = _recorder(request)
    secrets = metrics.main_app(request)[PAGE_SECRETS]
    response = web.StreamResponse(
        headers={**SECURITY_HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    queue = recorder.subscribe()
    try:
        await response.prepare(request)
        await response.write(f": worker {os.getpid()}\n\n".encode())
        while True:
            try:
                row = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if row is None:
                break
            await response.write(b"data: " + _masked(orjson.dumps(row), secrets) + b"\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the page went away
    finally:
        recorder.unsubscribe(queue)
    return response


def _static(name: str, content_type: str) -> Handler:
    body = _asset(name)

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    return serve


async def _close_feeds(app: web.Application) -> None:
    app[RECORDER].close_feeds()


def add_routes(app: web.Application, main: web.Application) -> None:
    """The page's routes on ``app`` (the main app, or the metrics port's), if it is on."""
    if RECORDER not in main:
        return
    for path, (name, content_type) in _ASSETS.items():
        app.router.add_get(path, _operator(_static(name, content_type), key=False))
    app.router.add_get("/ui/recent", _operator(recent))
    app.router.add_get("/ui/totals", _operator(totals))
    app.router.add_get("/ui/events", _operator(events))
    app.router.add_get("/ui/requests/{request_id}", _operator(one_request))


def install(app: web.Application) -> None:
    """The page on the main app (when there is no metrics port), and its feeds ended at
    shutdown."""
    app[PAGE_SECRETS] = redact.secrets_of(config.secrets(app[state.CONFIG]))
    app.on_shutdown.append(_close_feeds)
    if not app[state.CONFIG].server.metrics_port:
        add_routes(app, app)

"""Route handlers: thin functions that hand each request to its stage.

The dialects' main routes go to the pipeline (``pipeline.serve``): Chat Completions, Responses,
Anthropic Messages and its token count. ``models`` merges the upstreams' model lists
(``models.py``).
Every other listed ``/v1/*`` route is the pass-through: relayed both ways, routed by ``model``
if its body is JSON, in the API its path belongs to (``/v1/messages/...`` to Anthropic
upstreams). Every body the proxy reads is judged by ``guard`` before any upstream call (names,
redirecting fields), and a number out of msgspec's range in a field the proxy decodes is a 400.
A body the proxy forwards byte for byte (no OCR) is decoded at its top level only, so its depth
is the upstream's to judge, but past msgspec's own recursion limit (~1000 levels) it is a 400
too; an OCR request, whose messages the proxy walks and rebuilds, is refused past
``guard.MAX_DEPTH`` levels. The pass-through relays only the routes of ``[server]
passthrough_routes`` (404 for the others), and streams only uploads (multipart, octet-stream,
media types); a compressed upload is inflated by aiohttp, so its inflated size is capped at
``max_body_bytes``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from . import config, pipeline
from . import models as model_list
from .body import read_body
from .dialects import Dialect, field_value
from .dialects.chat import CHAT
from .dialects.messages import MESSAGES
from .dialects.responses import RESPONSES
from .errors import BodyTimeout, NotFound, PayloadTooLarge
from .forward import forward
from .guard import check_name, check_redirecting, deep
from .schema import object_decoder
from .state import CONFIG, PASSTHROUGH, ROUTER, TRACE


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: the product, for OpenAI clients."""
    return await pipeline.serve(request, CHAT)


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: the product, for Responses clients (Codex CLI, openai-agents)."""
    return await pipeline.serve(request, RESPONSES)


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: the product, for Anthropic clients (Claude Code)."""
    return await pipeline.serve(request, MESSAGES)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages/count_tokens``: counted as the upstream would be sent it, with no
    OCR call."""
    return await pipeline.serve(request, MESSAGES, "messages/count_tokens", counting=True)


async def models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: every upstream's models, each also offered with the OCR suffix; in
    Anthropic's shape, from Anthropic upstreams, for a client that sends ``anthropic-version``."""
    return await model_list.serve(request, dialect_of(request).api)


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
    model = field_value(obj, "model")
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
    dialect = dialect_of(request)
    up = router.first(dialect.api)
    body: Any = None
    if request.body_exists:
        declared = request.headers.get("Content-Type")
        if declared is not None and request.content_type.startswith(_STREAMED):
            body = _upload(request, request.app[CONFIG].server)
        else:
            body = await read_body(request)
            model = _json_model(body)
            if model is not None:
                up = router.route(model, dialect.api)
    request[TRACE].routed(up)
    return await forward(request, up, path, body, dialect)


def dialect_of(request: web.Request) -> Dialect:
    """The dialect a request speaks: its errors' shape, and the API of its upstreams. The
    model routes are shared, so there an Anthropic client is known by its ``anthropic-version``."""
    path = request.path
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return MESSAGES
    if (path == "/v1/models" or path.startswith("/v1/models/")) and (
        "anthropic-version" in request.headers
    ):
        return MESSAGES
    if path == "/v1/responses":  # its other routes (retrieve, cancel...) are the pass-through
        return RESPONSES
    return CHAT


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})

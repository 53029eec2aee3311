"""The request forwarded as the client sent it: no OCR, the body byte for byte.

Theory of operation: the client's request goes to its upstream with only the headers changed
(``upstream.request_headers``: hop-by-hop headers dropped, the upstream's credentials in place
of the client's unless the proxy relays them), and the answer is relayed as it comes
(``relay.relay``: masked, streamed). ``forward_watched`` is the variant for a dialect's main
route: an answer that may be a refusal of the request's images (``fallback.suspect``: a small
4xx) is read whole and handed back unsent, so that the pipeline can still decide to describe
the images and send the request again; nothing of it has reached the client then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from . import config, fallback, relay, upstream
from .dialects import Dialect
from .state import CONFIG, SECRETS, SESSION, TRACE


@dataclass(slots=True)
class Refused:
    """An upstream's answer to a forwarded request that may turn its images away
    (``fallback.suspect``), read whole and released: its head still tells status and headers."""

    source: aiohttp.ClientResponse
    payload: bytes


async def forward(
    request: web.Request, up: config.Upstream, path: str, body: Any, dialect: Dialect
) -> web.StreamResponse:
    """Send the client's request to ``up`` unchanged (but for headers) and relay the answer."""
    async with await _open(request, up, path, body) as source:
        return await relay.relay(request, source, {}, dialect, secrets=request.app[SECRETS])


async def forward_watched(
    request: web.Request, up: config.Upstream, path: str, body: bytes | bytearray, dialect: Dialect
) -> web.StreamResponse | Refused:
    """``forward``, but an answer that may turn the images away is read and returned, unsent."""
    async with await _open(request, up, path, body) as source:
        if not fallback.suspect(source):
            return await relay.relay(request, source, {}, dialect, secrets=request.app[SECRETS])
        return Refused(source, await relay.read_capped(source))


async def _open(
    request: web.Request, up: config.Upstream, path: str, body: Any
) -> aiohttp.ClientResponse:
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
    return source

"""The model list: every upstream's models merged, each also offered with the OCR suffix.

Theory of operation: the upstreams speaking the client's API are asked at once (OpenAI's
``{"object": "list", "data": [...]}``, or Anthropic's page ``{"data", "has_more", "first_id",
"last_id"}`` for a client that sends ``anthropic-version``; asked for its largest page, so that
the one page the proxy answers is the whole list). The first upstream to list a model
id wins; every id then gets an ``-ocr`` twin (unless it already ends with the suffix or has
one). If no upstream answered with a list, the first failure is the answer: relayed as the
upstream sent it (masked), or the proxy's own error.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from . import config, redact, upstream
from .errors import ProxyError, UpstreamError
from .schema import encoder, models_decoder
from .state import CONFIG, ROUTER, SECRETS, SESSION

Failure = ProxyError | tuple[int, bytes]  # the proxy's own error, or an upstream's answer
# Anthropic's list answers 20 models unless asked for more; 1000 is its largest page.
ANTHROPIC_PAGE = "limit=1000"


async def _listing(request: web.Request, up: config.Upstream) -> list[dict[str, Any]] | Failure:
    """One upstream's model entries, or why there are none."""
    cfg = request.app[CONFIG]
    headers = upstream.request_headers(request.headers, up, relay_auth=not cfg.auth.keys)
    target = upstream.url(up, "models", ANTHROPIC_PAGE if up.api == "anthropic" else "")
    try:
        source = await upstream.open_request(
            request.app[SESSION], up, "GET", target, headers=headers
        )
        async with source:
            status, payload = source.status, await source.read()
    except ProxyError as exc:
        return exc
    if status != 200:
        return status, payload
    try:
        return models_decoder.decode(payload).data
    except msgspec.DecodeError:
        return UpstreamError("An upstream's model list is malformed")


def merge(listings: list[list[dict[str, Any]]], suffix: str) -> list[dict[str, Any]]:
    """The entries by id (first listing wins), then an OCR twin of each."""
    seen: dict[str, dict[str, Any]] = {}
    for entries in listings:
        for entry in entries:
            model_id = entry.get("id")
            if isinstance(model_id, str):
                seen.setdefault(model_id, entry)
    twins = [
        _twin(entry, model_id + suffix)
        for model_id, entry in seen.items()
        if not model_id.endswith(suffix) and model_id + suffix not in seen
    ]
    return list(seen.values()) + twins


def _twin(entry: dict[str, Any], twin_id: str) -> dict[str, Any]:
    twin = {**entry, "id": twin_id}
    if isinstance(entry.get("display_name"), str):  # Anthropic's entries name themselves
        twin["display_name"] = f"{entry['display_name']} (OCR)"
    return twin


def _page(data: list[dict[str, Any]], api: str) -> dict[str, Any]:
    if api == "anthropic":
        return {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    return {"object": "list", "data": data}


async def serve(request: web.Request, api: str) -> web.Response:
    """The merged list of the upstreams speaking ``api``, in that API's shape."""
    ups = [up for up in request.app[ROUTER].upstreams if up.api == api]
    if not ups:
        ups = [request.app[ROUTER].first(api)]  # raises: no upstream speaks it
    results = await asyncio.gather(*(_listing(request, up) for up in ups))
    listings = [r for r in results if isinstance(r, list)]
    secrets = request.app[SECRETS]
    if not listings:
        failure = next(r for r in results if not isinstance(r, list))
        if isinstance(failure, ProxyError):
            raise failure
        status, payload = failure
        return web.Response(
            status=status, body=redact.redact(payload, secrets), content_type="application/json"
        )
    data = merge(listings, request.app[CONFIG].ocr.suffix)
    body = redact.redact(encoder.encode(_page(data, api)), secrets)
    return web.Response(body=body, content_type="application/json")

"""The model list: every upstream's models merged, each also offered with the OCR suffix.

Theory of operation: the upstreams speaking the client's API are asked at once (OpenAI's
``{"object": "list", "data": [...]}``, or Anthropic's page ``{"data", "has_more", "first_id",
"last_id"}`` for a client that sends ``anthropic-version``; asked for its largest page, so that
the one page the proxy answers is the whole list). The first upstream to list a model id
wins. Each chat model's ``-ocr`` twin comes right after it, so a picker shows the pair
together; models that are not chat models (embeddings, speech, image generation, moderation,
rerankers: ``NOT_CHAT``), ids already ending with the suffix, and models in
``text_only_models`` (already OCR'd) get none; ``[ocr] list_twins``/``hide_twins`` let the
operator choose otherwise. If no upstream answered with a list, the first failure is the
answer: relayed as the upstream sent it (masked), or the proxy's own error. Every list fetched
is kept in the ``catalog`` (a failure as "unknown"), which checks OCR requests' models against
it; ``fetch_listing`` is how the catalog asks for one itself.

The access line names every upstream asked (``"upstream": "anthropic,fake"``) and, as
``upstream_status``, 200 if any of them listed its models, else the status of the failure
answered (none if that upstream could not be reached).
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Mapping
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from . import catalog, config, redact, upstream
from .errors import ProxyError, UpstreamError
from .schema import encoder, models_decoder
from .state import CATALOG, CONFIG, ROUTER, SECRETS, SESSION, TRACE

Failure = ProxyError | tuple[int, bytes]  # the proxy's own error, or an upstream's answer
# Anthropic's list answers 20 models unless asked for more; 1000 is its largest page.
ANTHROPIC_PAGE = "limit=1000"


async def fetch_listing(
    session: aiohttp.ClientSession,
    up: config.Upstream,
    incoming: Mapping[str, str],
    *,
    relay_auth: bool,
) -> list[dict[str, Any]] | Failure:
    """One upstream's model entries, or why there are none, asked with the credentials a
    client request (``incoming``'s headers) would be sent with."""
    headers = upstream.request_headers(incoming, up, relay_auth=relay_auth)
    headers.pop("Content-Type", None)  # an OCR request's headers: this GET has no body
    headers["Accept"] = "application/json"  # not a streaming client's text/event-stream
    if up.api == "anthropic":  # the check of a Messages request whose client sent none
        headers.setdefault("anthropic-version", upstream.ANTHROPIC_VERSION)
    target = upstream.url(up, "models", ANTHROPIC_PAGE if up.api == "anthropic" else "")
    try:
        source = await upstream.open_request(session, up, "GET", target, headers=headers)
        async with source:
            status, payload = source.status, await source.read()
    except ProxyError as exc:
        return exc
    except (aiohttp.ClientError, TimeoutError):
        return UpstreamError(f"The upstream `{up.name}` broke off its model list")
    if status != 200:
        return status, payload
    try:
        return models_decoder.decode(payload).data
    except msgspec.DecodeError:
        return UpstreamError("An upstream's model list is malformed")


def ids_of(entries: list[dict[str, Any]]) -> list[str]:
    """The model ids of a listing's entries."""
    return [i for entry in entries if isinstance(i := entry.get("id"), str)]


# The client headers that can change an upstream's model list: the credential and the account
# (OpenAI), the API version and betas (Anthropic).
LIST_HEADERS = (
    "Authorization",
    "x-api-key",
    "OpenAI-Organization",
    "OpenAI-Project",
    "anthropic-version",
    "anthropic-beta",
)


def lister(session: aiohttp.ClientSession, *, relay_auth: bool) -> catalog.Fetch:
    """The catalog's way to learn what an upstream lists: its ids, or None if it did not say."""

    async def listed(up: config.Upstream, incoming: Mapping[str, str]) -> list[str] | None:
        # Asked on behalf of another request (a POST): only what decides which list the
        # upstream answers goes along, not that request's own headers (Idempotency-Key...).
        asked = {name: incoming[name] for name in LIST_HEADERS if name in incoming}
        found = await fetch_listing(session, up, asked, relay_auth=relay_auth)
        if isinstance(found, list):
            return ids_of(found)
        reason = found.message if isinstance(found, ProxyError) else f"HTTP {found[0]}"
        catalog.log.info(
            "upstream %s did not list its models (%s): model names go unchecked for a while",
            up.name,
            reason,
        )
        return None

    return listed


async def _listing(request: web.Request, up: config.Upstream) -> list[dict[str, Any]] | Failure:
    """One upstream's model entries (kept in the catalog too), or why there are none."""
    app = request.app
    found = await fetch_listing(
        app[SESSION], up, request.headers, relay_auth=not app[CONFIG].auth.keys
    )
    app[CATALOG].store(up, request.headers, ids_of(found) if isinstance(found, list) else None)
    return found


# Ids of models that take no chat messages, matched case-insensitively: no OCR twin for them.
NOT_CHAT = (
    "*embed*",
    "*tts*",
    "*whisper*",
    "*transcribe*",
    "dall-e*",
    "*image*",
    "*moderation*",
    "*rerank*",
)


def _matches(model_id: str, globs: tuple[str, ...]) -> bool:
    low = model_id.lower()
    return any(fnmatch.fnmatchcase(low, glob.lower()) for glob in globs)


def wants_twin(model_id: str, settings: config.Ocr) -> bool:
    """Whether ``model_id`` is offered with the OCR suffix too."""
    if model_id.endswith(settings.suffix):
        return False
    if settings.list_twins:
        if not _matches(model_id, settings.list_twins):
            return False
    elif _matches(model_id, NOT_CHAT):
        return False
    return not _matches(model_id, settings.hide_twins + settings.text_only_models)


def merge(listings: list[list[dict[str, Any]]], settings: config.Ocr) -> list[dict[str, Any]]:
    """The entries by id (first listing wins), each followed by its OCR twin if it gets one
    (an upstream's own ``-ocr`` entry stands in for the twin, right after its base)."""
    seen: dict[str, dict[str, Any]] = {}
    for entries in listings:
        for entry in entries:
            model_id = entry.get("id")
            if isinstance(model_id, str):
                seen.setdefault(model_id, entry)
    suffix = settings.suffix
    out: list[dict[str, Any]] = []
    for model_id, entry in seen.items():
        if model_id.endswith(suffix) and model_id[: -len(suffix)] in seen:
            continue  # placed after its base
        out.append(entry)
        if model_id + suffix in seen:
            out.append(seen[model_id + suffix])
        elif wants_twin(model_id, settings):
            out.append(_twin(entry, model_id + suffix))
    return out


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
    trace = request[TRACE]
    if not listings:
        failure = next(r for r in results if not isinstance(r, list))
        trace.listed(ups, failure[0] if isinstance(failure, tuple) else None)
        if isinstance(failure, ProxyError):
            raise failure
        status, payload = failure
        return web.Response(
            status=status, body=redact.redact(payload, secrets), content_type="application/json"
        )
    trace.listed(ups, 200)
    data = merge(listings, request.app[CONFIG].ocr)
    body = redact.redact(encoder.encode(_page(data, api)), secrets)
    return web.Response(body=body, content_type="application/json")

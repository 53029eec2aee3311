"""Routing a model to an upstream, and sending requests there with clean headers.

Theory of operation: upstreams are tried in config order and the first that speaks the
request's API (``api``) and whose ``models`` glob matches the model wins; the OCR model is
routed the same way, to an upstream of either API. Headers are copied from the client minus
hop-by-hop headers, the client's address, the proxy's own ``X-OCR-Model``, and its credentials:
when the upstream has its own ``api_key`` that key is sent, in the upstream's style
(``Authorization: Bearer`` for OpenAI, ``x-api-key`` for Anthropic unless ``auth = "bearer"``);
when it has none, the client's credential (``Authorization`` or ``x-api-key``) is relayed in
that style (pure relay mode). Account headers (``OpenAI-Organization``, ``OpenAI-Project``,
``Cookie``) go with the client's own key only: with the operator's key they would let a client
pick which of the operator's organisations or projects it uses. An upstream's ``headers`` are
set on every request to it (chat, pass-through, models and OCR calls), over the client's.
Connection errors become 502 and a missing answer 504, rendered by the error middleware; an
upstream's own error statuses are relayed untouched by the caller.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from . import config
from .errors import NotFound, ProxyError, UpstreamError, UpstreamTimeout

log = logging.getLogger("ocrproxy.upstream")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: recomputed by the client library, or credentials/addresses of the
# client that the upstream must not see.
_DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    "content-encoding",
    "authorization",
    "api-key",
    "x-api-key",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
    "expect",
    "x-ocr-model",
}
# Sent on only with the client's own credentials (relay mode): they choose whose account is used.
_ACCOUNT = frozenset({"openai-organization", "openai-project", "cookie"})
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "x-request-id", "server", "date"}


class Router:
    """Maps a model name to the first upstream whose patterns match it."""

    def __init__(self, upstreams: Iterable[config.Upstream]) -> None:
        self.upstreams = tuple(upstreams)
        self._memo: dict[tuple[str | None, str], config.Upstream] = {}

    @property
    def default(self) -> config.Upstream:
        return self.upstreams[0]

    def first(self, api: str) -> config.Upstream:
        """The first upstream speaking ``api`` (for requests no model routes)."""
        for up in self.upstreams:
            if up.api == api:
                return up
        raise _no_api(api)

    def route(
        self, model: str, api: str | None = "openai", *, typed: str | None = None
    ) -> config.Upstream:
        """The upstream serving ``model`` in ``api`` (None: in any API, for the OCR model);
        ``typed``: the model as the client named it (with the OCR suffix), for the 404."""
        found = self._memo.get((api, model))
        if found is not None:
            return found
        for up in self.upstreams:
            if api is not None and up.api != api:
                continue
            if any(fnmatch.fnmatchcase(model, pattern) for pattern in up.models):
                if len(self._memo) < 4096:
                    self._memo[(api, model)] = up
                return up
        if api is not None and not any(up.api == api for up in self.upstreams):
            raise _no_api(api)
        named = f"`{typed}` (`{model}` once the OCR suffix is off)" if typed else f"`{model}`"
        raise NotFound(
            f"The model {named} is not served by any upstream of this proxy",
            param="model",
            code="model_not_found",
        )


_API_NAMES = {"openai": "the OpenAI API", "anthropic": "the Anthropic Messages API"}


def _no_api(api: str) -> NotFound:
    return NotFound(
        f"No upstream of this proxy speaks {_API_NAMES.get(api, api)} "
        f'(an [[upstreams]] entry with api = "{api}" is needed)',
        code="no_upstream_for_api",
    )


def url(up: config.Upstream, path: str, query: str = "") -> str:
    """Join an upstream's base URL (``…/v1``, perhaps with a query such as
    ``?api-version=...``), a path below ``/v1`` and the client's raw query string.

    An Anthropic base URL is what vendors document for ``ANTHROPIC_BASE_URL``, without the
    ``/v1`` (``https://api.deepseek.com/anthropic``): it is added unless already there.
    """
    base, _, fixed = up.base_url.partition("?")
    base = base.rstrip("/")
    if up.api == "anthropic" and not base.endswith("/v1"):
        base += "/v1"
    target = base + "/" + path.lstrip("/")
    if fixed and query:
        return f"{target}?{fixed}&{query}"
    if fixed or query:
        return f"{target}?{fixed or query}"
    return target


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("Connection", "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(
    incoming: Mapping[str, str],
    up: config.Upstream,
    *,
    keep_length: bool = False,
    relay_auth: bool = True,
) -> CIMultiDict[str]:
    """The headers to send upstream for a client request."""
    extra = _connection_tokens(incoming)
    # aiohttp hands the handler a decompressed body: its encoding and length no longer apply.
    keep_length = keep_length and "Content-Encoding" not in incoming
    clients_own_key = relay_auth and not up.api_key
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        low = name.lower()
        if low in _DROP_REQUEST or low in extra or (low in _ACCOUNT and not clients_own_key):
            if keep_length and low == "content-length":
                out[name] = value
            continue
        out.add(name, value)
    out["Accept-Encoding"] = "identity"  # bodies the proxy reads (errors, models) stay plain
    out.update(auth_headers(incoming, up, relay_auth=relay_auth))
    for name, value in up.headers.items():
        out[name] = value
    return out


def call_headers(up: config.Upstream, auth: Mapping[str, str]) -> dict[str, str]:
    """The headers of a request the proxy makes itself (an OCR call): JSON, uncompressed
    answers, the credentials ``auth_headers`` chose and the upstream's own ``headers``."""
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", **auth}
    if up.api == "anthropic":
        headers["anthropic-version"] = ANTHROPIC_VERSION
    headers.update(up.headers)
    return headers


ANTHROPIC_VERSION = "2023-06-01"  # sent with the proxy's own calls to an Anthropic upstream


def client_credential(incoming: Mapping[str, str]) -> str | None:
    """The client's credential: a Bearer token, else its ``x-api-key``, else None. Another
    ``Authorization`` scheme counts whole (``Basic ...``)."""
    value = incoming.get("Authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return value
        return token.strip() or None
    return incoming.get("x-api-key") or None


def _bearer(up: config.Upstream) -> bool:
    return up.auth == "bearer" or (not up.auth and up.api == "openai")


def auth_headers(
    incoming: Mapping[str, str], up: config.Upstream, *, relay_auth: bool = True
) -> dict[str, str]:
    """The credential header for the upstream, in its style: its own key, or the client's in
    relay mode (an ``Authorization`` sent to a Bearer upstream goes on as it came)."""
    if up.api_key:
        token = up.api_key
    elif not relay_auth or (token := client_credential(incoming) or "") == "":
        return {}
    elif _bearer(up) and "Authorization" in incoming:
        return {"Authorization": incoming["Authorization"]}
    return {"Authorization": f"Bearer {token}"} if _bearer(up) else {"x-api-key": token}


def response_headers(incoming: Mapping[str, str]) -> CIMultiDict[str]:
    """The upstream's response headers that may be relayed to the client."""
    extra = _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        low = name.lower()
        if low in _DROP_RESPONSE or low in extra:
            if low == "x-request-id":
                out["X-Upstream-Request-Id"] = value
            continue
        out.add(name, value)
    return out


def timeout(up: config.Upstream) -> aiohttp.ClientTimeout:
    """No total limit (long streams are healthy); bounded connect and idle read."""
    return _timeout(up.connect_timeout_s, up.read_timeout_s)


@functools.lru_cache(maxsize=256)
def _timeout(connect_s: float, read_s: float) -> aiohttp.ClientTimeout:
    # Cached: a ClientTimeout is immutable. Keyed by its numbers: an Upstream with headers
    # (a dict) cannot be hashed.
    return aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)


_urls: dict[str, URL] = {}  # parsed once: most requests go to a few fixed URLs

# A request body at least this large is sent in pieces of PIECE bytes, each written once the
# connection took the one before: written whole, it is copied into the transport's buffer in
# one go (megabytes, with the event loop blocked meanwhile).
LARGE_BODY = 1024 * 1024
PIECE = 256 * 1024


async def pieces(*parts: bytes | bytearray | memoryview) -> AsyncIterator[memoryview]:
    """``parts`` one after another, as slices of at most PIECE bytes (no copies)."""
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), PIECE):
            yield view[start : start + PIECE]


def payload(
    body: bytes | bytearray, headers: CIMultiDict[str]
) -> bytes | bytearray | AsyncIterator[memoryview]:
    """``body`` as the client library should send it; a large one in pieces (with its length,
    so that it is not sent chunked)."""
    if len(body) < LARGE_BODY:
        return body
    headers["Content-Length"] = str(len(body))
    return pieces(body)


async def open_request(
    session: aiohttp.ClientSession,
    up: config.Upstream,
    method: str,
    target: str,
    *,
    headers: CIMultiDict[str],
    data: Any = None,
    request_timeout: aiohttp.ClientTimeout | None = None,
) -> aiohttp.ClientResponse:
    """Send a request and return the response once its headers arrived.

    The caller owns the response and must close or release it.
    """
    url = _urls.get(target)
    if url is None:
        url = URL(target, encoded=True)  # the client's path and query, not re-quoted
        if "?" not in target and len(_urls) < 1024:  # an upstream's fixed routes
            _urls[target] = url
    try:
        return await session.request(
            method,
            url,
            headers=headers,
            data=data,
            timeout=request_timeout or timeout(up),
            allow_redirects=False,
        )
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        log.warning("upstream %s timed out: %s", up.name, type(exc).__name__)
        raise UpstreamTimeout(f"The upstream `{up.name}` did not answer in time") from None
    except aiohttp.ClientError as exc:
        if isinstance(exc.__cause__, ProxyError):  # the body refused itself (cut at its limit)
            raise exc.__cause__ from None
        log.warning("upstream %s failed: %s", up.name, type(exc).__name__)
        raise UpstreamError(f"The upstream `{up.name}` is unreachable") from None

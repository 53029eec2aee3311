"""Routing a model to an upstream, and sending requests there with clean headers.

Theory of operation: upstreams are tried in config order and the first whose ``models`` glob
matches the model wins (the OCR model is routed the same way). Headers are copied from the
client minus hop-by-hop headers, the client's address, and its credentials: when the upstream
has its own ``api_key`` that key is sent; when it has none, the client's ``Authorization`` is
relayed (pure relay mode). Account headers (``OpenAI-Organization``, ``OpenAI-Project``,
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
}
# Sent on only with the client's own credentials (relay mode): they choose whose account is used.
_ACCOUNT = frozenset({"openai-organization", "openai-project", "cookie"})
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "x-request-id", "server", "date"}


class Router:
    """Maps a model name to the first upstream whose patterns match it."""

    def __init__(self, upstreams: Iterable[config.Upstream]) -> None:
        self.upstreams = tuple(upstreams)
        self._memo: dict[str, config.Upstream] = {}

    @property
    def default(self) -> config.Upstream:
        return self.upstreams[0]

    def route(self, model: str) -> config.Upstream:
        found = self._memo.get(model)
        if found is not None:
            return found
        for up in self.upstreams:
            if any(fnmatch.fnmatchcase(model, pattern) for pattern in up.models):
                if len(self._memo) < 4096:
                    self._memo[model] = up
                return up
        raise NotFound(
            f"The model `{model}` is not served by any upstream of this proxy",
            param="model",
            code="model_not_found",
        )


def url(up: config.Upstream, path: str, query: str = "") -> str:
    """Join an upstream's base URL (``…/v1``, perhaps with a query such as
    ``?api-version=...``), a path below ``/v1`` and the client's raw query string."""
    base, _, fixed = up.base_url.partition("?")
    target = base.rstrip("/") + "/" + path.lstrip("/")
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
    auth = auth_header(incoming, up, relay_auth=relay_auth)
    if auth:
        out["Authorization"] = auth
    for name, value in up.headers.items():
        out[name] = value
    return out


def call_headers(up: config.Upstream, auth: str | None) -> dict[str, str]:
    """The headers of a request the proxy makes itself (an OCR call): JSON, uncompressed
    answers, the credentials ``auth_header`` chose and the upstream's own ``headers``."""
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if auth:
        headers["Authorization"] = auth
    headers.update(up.headers)
    return headers


def auth_header(
    incoming: Mapping[str, str], up: config.Upstream, *, relay_auth: bool = True
) -> str | None:
    """The Authorization value for the upstream: its own key, or the client's in relay mode."""
    if up.api_key:
        return f"Bearer {up.api_key}"
    return incoming.get("Authorization") if relay_auth else None


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

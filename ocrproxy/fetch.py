"""Download remote images for strangers without becoming their way into our network (SSRF).

Theory of operation: a client may name any URL, so every URL is treated as hostile.

- The URL must be ``http`` or ``https``, carry no user name or password, and use a port from
  ``allowed_ports``. An IP literal, or a legacy numeric host (``2130706433``, ``127.1``,
  ``0x7f.1``, ``0177.0.0.1``) that ``getaddrinfo`` would turn into one, is checked before any
  request, since aiohttp connects to IP literals without asking the resolver; ``localhost`` and
  ``*.localhost`` count as 127.0.0.1 whatever the resolver says.
- A host name is resolved once, by ``GuardedResolver``, which the connector asks for addresses:
  if *any* address is not public the fetch is refused, otherwise the connector connects to exactly
  the addresses that were checked. There is no second lookup, so DNS rebinding has no window.
  The URL keeps its host name, so TLS SNI, certificate checks and ``Host`` are unchanged.
- "Public" means globally routable unicast: loopback, private, link-local (cloud metadata at
  169.254.169.254), 0.0.0.0/8, 100.64/10, multicast, reserved and documentation ranges, IPv6
  ULA and link-local are refused, and so is an IPv6 address that embeds a refused IPv4 one
  (IPv4-mapped, IPv4-compatible, 6to4, NAT64). ``allow_private_hosts`` lets an operator name
  host names or networks that may be private anyway.
- Redirects are followed by hand, at most ``MAX_REDIRECTS`` hops, each one checked like the first.
  Environment proxies are ignored, cookies are never kept, nothing is decompressed: a
  ``Content-Encoding`` other than identity is refused, so a gzip bomb is never inflated.
- The body is streamed under a byte cap that aborts the download as soon as it is crossed (per
  image, and a ``Budget`` for all the images of one request), and under connect, idle-read and
  total timeouts. The connection pool (``limit``, ``limit_per_host``) is shared by all requests;
  a request runs at most ``max_fetches_per_request`` downloads at once (``images``), and a wait
  for a pool slot is not a connect failure: the connect timeout counts from the socket's start.
  It must be served as ``image/*``, and its magic bytes and header dimensions must pass
  ``sniff.inspect``: checked on the first bytes, so a bomb is dropped at its header.

Error messages are shown to clients, so they name the rule that refused the URL and never a
resolved address, an internal host name or a socket error's text; those go to the debug log.
Each error also carries a ``reasons.Reason``, the fixed words the model reads in the image's
placeholder.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from . import config, sniff, timeline
from .reasons import Reason

log = logging.getLogger("ocrproxy.fetch")

MAX_REDIRECTS = 3
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
CHUNK_BYTES = 64 * 1024
HEAD_BYTES = 32  # enough for PNG, GIF and WebP dimensions

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_-]{1,63})*$")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")  # one inet_aton part
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(Exception):
    """Fetching an image failed; the message is safe to show. ``status`` under ``on_error=fail``;
    ``reason``: what the model is told (the class's unless given)."""

    status = 502
    reason = Reason.DOWNLOAD_FAILED

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class FetchRefused(FetchError):
    """The URL, or what it served, breaks a rule: the proxy will not fetch or use it."""

    status = 400
    reason = Reason.DOWNLOAD_REFUSED


class FetchTooLarge(FetchRefused):
    """The image is larger than ``max_image_bytes``."""

    status = 413
    reason = Reason.TOO_LARGE


class Budget:
    """The bytes the fetches of one request may still download, together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise FetchTooLarge(
                f"the request's remote images together are larger than {self.limit} bytes"
            )


@dataclass(frozen=True, slots=True)
class Fetched:
    """A downloaded image that passed every check."""

    data: bytes
    media_type: str

    def data_url(self) -> bytes:
        return b"data:" + self.media_type.encode() + b";base64," + base64.b64encode(self.data)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, in the forms a router would translate."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    value = int(ip)
    if value >> 32 == 0 or value >> 32 == 0xFFFF0000:  # IPv4-compatible, IPv4-translated
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if ip in _NAT64:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """Whether ``ip`` is a globally routable unicast address (and embeds no other kind)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public(embedded)
        if ip in _NAT64_LOCAL or ip.is_site_local:
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address ``inet_aton`` makes of a numeric host (``127.1``, ``0x7f.1``...), else None."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_NUMBER.fullmatch(part) for part in parts):
        return None
    numbers = [
        int(part[2:], 16) if part[:2] in ("0x", "0X") else int(part, 8 if part[0] == "0" else 10)
        for part in parts
    ]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    value = last
    for i, n in enumerate(head):
        value |= n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def literal_address(host: str) -> IPAddress | None:
    """The IP address ``host`` spells, in any form a resolver would accept, else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return _legacy_ipv4(host)


class Policy:
    """Which hosts and addresses may be fetched from: public ones, and the operator's exceptions."""

    def __init__(self, allow_private_hosts: tuple[str, ...] = ()) -> None:
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow_private_hosts:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry.rstrip(".").lower())

    def allows(self, host: str, ip: IPAddress) -> bool:
        if is_public(ip) or host in self.names:
            return True
        plain: IPAddress = ip
        if isinstance(ip, ipaddress.IPv6Address):  # match ::ffff:10.0.0.1 and fe80::1%eth0 too
            plain = ip.ipv4_mapped or ipaddress.IPv6Address(str(ip).partition("%")[0])
        return any(plain in network for network in self.networks)

    def check(self, host: str, addresses: list[str]) -> None:
        """Raise FetchRefused if any of ``addresses`` (of ``host``) is not allowed."""
        for address in addresses:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
            if ip is None or not self.allows(host, ip):
                log.debug(
                    "refused image host",
                    extra={"fields": {"host": host, "address": address}},
                )
                raise FetchRefused("the image URL points to a non-public network address")


def _host(raw_host: str) -> str:
    return raw_host.rstrip(".").lower()


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner`` and refuses the whole answer if any address is not allowed."""

    def __init__(self, policy: Policy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner if inner is not None else aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        if not results:
            raise FetchError("the image host has no address")
        self.policy.check(_host(host), [r["host"] for r in results])
        return results

    async def close(self) -> None:
        await self.inner.close()


class Fetcher:
    """Downloads images under the rules above; one per application, with its own session."""

    def __init__(
        self,
        settings: config.Ocr,
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``resolver`` and ``ssl_context`` replace the system ones (tests, private CAs)."""
        self.policy = Policy(settings.allow_private_hosts)
        self.ports = frozenset(settings.allowed_ports)
        self.max_bytes = settings.max_image_bytes
        self.max_pixels = settings.max_image_pixels
        self.timeout_s = settings.fetch_timeout_s
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.policy, resolver),
            use_dns_cache=False,
            force_close=True,  # no idle connections to client-chosen hosts; every fetch re-checks
            ssl=ssl_context if ssl_context is not None else True,
            limit=64,
            limit_per_host=8,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            # ``sock_connect``, not ``connect``: aiohttp's ``connect`` includes the wait for a
            # pool slot, and a busy pool is not the image server's failure (the whole fetch
            # stays under ``fetch_timeout_s``).
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=min(CONNECT_TIMEOUT_S, self.timeout_s),
                sock_read=min(READ_TIMEOUT_S, self.timeout_s),
            ),
            headers={"Accept": "image/*", "Accept-Encoding": "identity"},
        )

    async def close(self) -> None:
        await self.session.close()

    def check_url(self, url: str | URL) -> URL:
        """The parsed URL if its scheme, credentials, port and (literal) host are allowed."""
        try:
            parsed = url if isinstance(url, URL) else URL(url)
            port = parsed.port
            raw_host = parsed.raw_host
        except (ValueError, TypeError):
            raise FetchRefused("the image URL is malformed") from None
        if parsed.scheme not in ("http", "https"):
            raise FetchRefused("only http and https image URLs can be fetched")
        if "@" in (parsed.raw_authority or ""):
            raise FetchRefused("the image URL must not carry a user name or password")
        if not raw_host:
            raise FetchRefused("the image URL has no host")
        if port not in self.ports:
            allowed = ", ".join(str(p) for p in sorted(self.ports))
            raise FetchRefused(f"the image URL's port is not allowed (allowed: {allowed})")
        host = _host(raw_host)
        address = literal_address(host)
        if host == "localhost" or host.endswith(".localhost"):  # loopback by definition (RFC 6761)
            address = ipaddress.IPv4Address("127.0.0.1")
        if address is not None:
            self.policy.check(host, [str(address)])
        elif not _HOSTNAME.match(host):
            raise FetchRefused("the image URL's host is not a valid host name")
        return parsed

    async def fetch(self, url: str, budget: Budget | None = None) -> Fetched:
        """Download and check one image; FetchError (or a subclass) says why it was not.

        ``budget``, shared by the fetches of one request, caps the bytes they download together.
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                fetched = await self._follow(url, budget or Budget(self.max_bytes))
        except TimeoutError:
            raise FetchError(
                f"the image server did not deliver the image within {self.timeout_s:g} s",
                Reason.TIMED_OUT,
            ) from None
        except aiohttp.ClientError as exc:
            log.debug("image fetch failed: %r", exc)
            raise FetchError(f"the image could not be downloaded ({type(exc).__name__})") from None
        took_ms = round((time.monotonic() - started) * 1000, 2)
        timeline.step("fetch", ok=True, bytes=len(fetched.data), took_ms=took_ms)
        return fetched

    async def _follow(self, url: str, budget: Budget) -> Fetched:
        target = self.check_url(url)
        for _ in range(MAX_REDIRECTS + 1):
            async with self.session.get(target, allow_redirects=False) as response:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchError("the image server sent a redirect without a location")
                    try:
                        next_url = target.join(URL(location))
                    except (ValueError, TypeError):
                        raise FetchRefused(
                            "the image server redirected to a malformed URL"
                        ) from None
                    target = self.check_url(next_url)
                    continue
                if response.status != 200:
                    raise FetchError(f"the image server answered HTTP {response.status}")
                try:
                    return await self._read(response, budget)
                except BaseException:
                    response.close()  # drop the connection instead of draining the rest
                    raise
        raise FetchRefused(f"the image URL redirected more than {MAX_REDIRECTS} times")

    async def _read(self, response: aiohttp.ClientResponse, budget: Budget) -> Fetched:
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchRefused("the image server sent a compressed response (Content-Encoding)")
        media_type = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if not media_type.startswith("image/"):
            shown = media_type[:60] or "none"
            raise FetchRefused(
                f"the URL does not serve an image (Content-Type: {shown})", Reason.NOT_AN_IMAGE
            )
        too_large = FetchTooLarge(f"the image is larger than the limit of {self.max_bytes} bytes")
        if response.content_length is not None and response.content_length > self.max_bytes:
            raise too_large
        body = bytearray()
        checked_head = False
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            body += chunk
            if len(body) > self.max_bytes:
                raise too_large
            budget.take(len(chunk))
            if not checked_head and len(body) >= HEAD_BYTES:
                self._inspect(bytes(body[:HEAD_BYTES]), complete=False)
                checked_head = True
        data = bytes(body)
        found = self._inspect(data)
        return Fetched(data, found.media_type)

    def _inspect(self, data: bytes, complete: bool = True) -> sniff.Sniffed:
        try:
            return sniff.inspect(data, self.max_pixels, complete)
        except sniff.TooManyPixels as exc:
            raise FetchRefused(f"the downloaded image {exc}", Reason.TOO_LARGE) from None
        except sniff.ImageRejected as exc:
            raise FetchRefused(f"the downloaded image {exc}", Reason.NOT_AN_IMAGE) from None

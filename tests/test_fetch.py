"""The image fetcher against hostile URLs and hostile image servers, all on loopback.

Names like ``images.test`` are answered by a test resolver (``MapResolver``) that stands in for
DNS; the fetcher's own guard sits on top of it exactly as it sits on top of the system resolver.
Where a fetch must really happen, ``allow_private_hosts`` admits the loopback image server.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from ocrproxy import config
from ocrproxy.fetch import (
    Fetcher,
    FetchError,
    FetchRefused,
    FetchTooLarge,
    Policy,
    literal_address,
)
from tests.conftest import chat
from tests.fakes import FakeOpenAI, image_part, png
from tests.imagedata import png_header

URL = "/v1/chat/completions"
IMAGE = png("cat", 300)  # what every good image route serves
BIG = 64 * 1024 * 1024


class MapResolver(AbstractResolver):
    """DNS for tests: each name maps to a list of answers, one per lookup (the last repeats)."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        if host not in self.answers:
            return await aiohttp.ThreadedResolver().resolve(host, port, family)
        queue = self.answers[host]
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        return [
            {
                "hostname": host,
                "host": a,
                "port": port,
                "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for a in addresses
        ]

    async def close(self) -> None:
        pass


@dataclass
class ImageServer:
    """A hostile-or-not image host; records every request it gets."""

    host: str = "127.0.0.1"
    port: int = 0
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # path, Host, Cookie
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    sent: int = 0
    aborted: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{name}", self.handle)
        return app

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append((name, request.host, request.headers.get("Cookie", "")))
        self.seen_headers.append(dict(request.headers))
        if name in ("ok.png", "same.png", "also.png"):
            return web.Response(body=IMAGE, content_type="image/png")
        if name == "sized.png":
            body = png(request.query["label"], int(request.query["size"]))
            return web.Response(body=body, content_type="image/png")
        if name == "slow-ok.png":
            await asyncio.sleep(1.0)
            return web.Response(body=IMAGE, content_type="image/png")
        if name == "cookie.png":
            response = web.Response(body=IMAGE, content_type="image/png")
            response.set_cookie("session", "tracked")
            return response
        if name == "text.html":
            return web.Response(body=IMAGE, content_type="text/html")
        if name == "no-type":
            return web.Response(body=IMAGE, headers={"Content-Type": ""})
        if name == "bad-magic.png":
            return web.Response(body=b"<html>you are logged in</html>", content_type="image/png")
        if name == "huge.png":
            return web.Response(
                body=png_header(60000, 60000) + b"\0" * 100, content_type="image/png"
            )
        if name == "gzip-bomb.png":
            bomb = gzip.compress(b"\0" * BIG, compresslevel=9)
            return web.Response(
                body=bomb, headers={"Content-Type": "image/png", "Content-Encoding": "gzip"}
            )
        if name == "gzip-raw.png":  # compressed bytes served as if they were the image
            return web.Response(body=gzip.compress(b"\0" * BIG), content_type="image/png")
        if name == "declared-big.png":
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            response.content_length = BIG
            await response.prepare(request)
            await response.write(IMAGE)
            await asyncio.sleep(5)
            return response
        if name == "endless.png":
            return await self.endless(request)
        if name == "huge-endless.png":
            return await self.endless(request, png_header(60000, 60000))
        if name == "slow-headers.png":
            await asyncio.sleep(10)
        if name == "slow-body.png":
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            await response.prepare(request)
            await response.write(IMAGE[:40])
            await asyncio.sleep(10)
            return response
        if name.startswith("hop"):  # hop3 -> hop2 -> hop1 -> hop0 -> ok.png
            left = int(name[3:])
            raise web.HTTPFound(f"/hop{left - 1}" if left > 0 else "/ok.png")
        if name == "to-loopback":
            raise web.HTTPFound(f"http://127.0.0.1:{self.port}/ok.png")
        if name == "to-localhost":
            raise web.HTTPFound(f"http://localhost:{self.port}/ok.png")
        if name == "slow-to-metadata":
            await asyncio.sleep(0.6)
            raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")
        if name == "to-metadata":
            raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")
        if name == "to-ftp":
            raise web.HTTPFound("ftp://images.test/ok.png")
        raise web.HTTPNotFound()

    async def endless(self, request: web.Request, head: bytes = IMAGE) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        await response.prepare(request)
        chunk = head + b"\0" * (64 * 1024 - len(head))
        try:
            while self.sent < BIG:
                await response.write(chunk)
                self.sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):  # the fetcher hung up
            self.aborted.set()
            raise
        return response


ServerFactory = Callable[..., Awaitable[ImageServer]]


@pytest.fixture
def image_server_factory(aiohttp_server: Any) -> ServerFactory:
    async def make(host: str = "127.0.0.1", port: int | None = None) -> ImageServer:
        state = ImageServer(host=host)
        server: TestServer = await aiohttp_server(state.app(), host=host, port=port)
        assert server.port is not None
        state.port = server.port
        return state

    return make


@pytest.fixture
async def images(image_server_factory: ServerFactory) -> ImageServer:
    return await image_server_factory()


FetcherFactory = Callable[..., Fetcher]


@pytest.fixture
async def make_fetcher(images: ImageServer) -> Any:
    """A Fetcher whose allowed ports include the image server's; closed after the test."""
    made: list[Fetcher] = []

    def make(
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        **settings: Any,
    ) -> Fetcher:
        settings.setdefault("allowed_ports", (80, 443, images.port))
        fetcher = Fetcher(config.Ocr(**settings), resolver=resolver, ssl_context=ssl_context)
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        await fetcher.close()


def trusted(extra: dict[str, list[list[str]]] | None = None) -> MapResolver:
    """``images.test`` resolves to the loopback image server (admitted by name)."""
    return MapResolver({"images.test": [["127.0.0.1"]], **(extra or {})})


async def test_happy_fetch_keeps_the_host_name_and_returns_checked_bytes(
    images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    fetcher = make_fetcher(trusted(), allow_private_hosts=("images.test",))
    fetched = await fetcher.fetch(images.url("/ok.png", host="images.test"))
    assert fetched.data == IMAGE and fetched.media_type == "image/png"
    assert fetched.data_url() == b"data:image/png;base64," + base64.b64encode(IMAGE)
    # Connected to the resolved address, but Host (and SNI under TLS) is still the name.
    assert images.requests == [("ok.png", f"images.test:{images.port}", "")]


@pytest.mark.parametrize("cert_for", ["images.test", "other.test"])
async def test_tls_keeps_the_host_name_for_sni_and_certificate_checks(
    cert_for: str, aiohttp_server: Any, make_fetcher: FetcherFactory
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(cert_for).configure_cert(server_ctx)
    sni: list[str | None] = []

    def record_sni(_sock: Any, name: str | None, _ctx: Any) -> None:
        sni.append(name)

    server_ctx.sni_callback = record_sni
    state = ImageServer()
    server: TestServer = await aiohttp_server(state.app(), ssl=server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    fetcher = make_fetcher(
        trusted(), client_ctx, allow_private_hosts=("images.test",), allowed_ports=(server.port,)
    )
    url = f"https://images.test:{server.port}/ok.png"
    if cert_for == "images.test":
        assert (await fetcher.fetch(url)).data == IMAGE
        assert state.requests == [("ok.png", f"images.test:{server.port}", "")]
    else:  # the certificate is checked against the name, not the address we connected to
        with pytest.raises(FetchError, match="ClientConnectorCertificateError"):
            await fetcher.fetch(url)
        assert state.requests == []
    assert sni == ["images.test"]


METADATA_URLS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://0xa9fea9fe/latest/meta-data/",
    "http://2852039166/latest/meta-data/",
]


@pytest.mark.parametrize("url", METADATA_URLS)
async def test_cloud_metadata_address_is_refused(url: str, make_fetcher: FetcherFactory) -> None:
    fetcher = make_fetcher()
    with pytest.raises(FetchRefused, match="non-public") as caught:
        await fetcher.fetch(url)
    assert "169.254" not in str(caught.value)


LOOPBACK_HOSTS = [
    "127.0.0.1",
    "127.0.0.2",
    "127.255.255.254",
    "2130706433",
    "127.1",
    "127.0.1",
    "0x7f.1",
    "0x7f.0.0.1",
    "0x7F000001",
    "0177.0.0.1",
    "017700000001",
    "127.000.000.001",
    "127.0.0.1.",
    "１２７.０.０.１",
    "localhost",
    "LOCALHOST",
    "localhost.",
    "0",
    "0.0.0.0",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[::]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::127.0.0.1]",
    "[64:ff9b::127.0.0.1]",
    "[2002:7f00:1::]",
    "[fe80::1]",
]


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
async def test_loopback_in_every_spelling_is_refused_before_any_connection(
    host: str, images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    fetcher = make_fetcher()
    with pytest.raises(FetchRefused, match="non-public"):
        await fetcher.fetch(f"http://{host}:{images.port}/ok.png")
    assert images.requests == []  # the server on 127.0.0.1 was never reached


@pytest.mark.parametrize(
    "host", ["2130706433", "127.1", "0x7f.1", "0177.0.0.1", "017700000001", "0x7f000001"]
)
def test_odd_numeric_forms_mean_what_the_system_resolver_says(host: str) -> None:
    # Our parser agrees with getaddrinfo, so the literal check sees what a connect would hit.
    system = socket.getaddrinfo(host, 80, socket.AF_INET)[0][4][0]
    assert str(literal_address(host)) == system == "127.0.0.1"


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet="0123456789xXabcdefABF._", min_size=1, max_size=20))
def test_numeric_host_parser_agrees_with_inet_aton(host: str) -> None:
    # Whatever the C library would read as an IPv4 address, the literal check reads the same.
    try:
        expected: ipaddress.IPv4Address | None = ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        expected = None
    found = literal_address(host)
    assert found is None or isinstance(found, ipaddress.IPv4Address)
    assert found == expected


@pytest.mark.parametrize(
    "answers",
    [
        ["10.0.0.5"],
        ["192.168.1.10"],
        ["172.16.3.4"],
        ["100.64.0.1"],
        ["169.254.169.254"],
        ["fd12:3456::1"],
        ["93.184.216.34", "127.0.0.1"],  # one bad address among good ones is enough
        ["2606:4700::1111", "::1"],
    ],
)
async def test_host_name_resolving_to_a_private_address_is_refused(
    answers: list[str], make_fetcher: FetcherFactory
) -> None:
    resolver = MapResolver({"internal.example": [answers]})
    fetcher = make_fetcher(resolver)
    with pytest.raises(FetchRefused, match="non-public") as caught:
        await fetcher.fetch("https://internal.example/cat.png")
    assert resolver.lookups == ["internal.example"]
    for address in answers:
        assert address not in str(caught.value)


@pytest.mark.parametrize("host", ["localhost", "img.localhost", "a.b.LOCALHOST."])
async def test_localhost_names_are_loopback_whatever_dns_says(
    host: str, images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    resolver = MapResolver({host.rstrip(".").lower(): [["93.184.216.34"]]})
    fetcher = make_fetcher(resolver)
    with pytest.raises(FetchRefused, match="non-public"):
        await fetcher.fetch(images.url("/ok.png", host=host))
    assert images.requests == [] and resolver.lookups == []


async def test_dns_rebinding_connects_only_to_the_checked_address(
    image_server_factory: ServerFactory, make_fetcher: FetcherFactory
) -> None:
    good = await image_server_factory("127.0.0.1")
    internal = await image_server_factory("127.0.0.2", port=good.port)
    # 127.0.0.1 plays a public address (admitted by CIDR); 127.0.0.2 is the internal target.
    resolver = MapResolver({"rebind.test": [["127.0.0.1"], ["127.0.0.2"]]})
    fetcher = make_fetcher(
        resolver, allow_private_hosts=("127.0.0.1/32",), allowed_ports=(good.port,)
    )
    url = f"http://rebind.test:{good.port}/ok.png"
    assert (await fetcher.fetch(url)).data == IMAGE
    assert resolver.lookups == ["rebind.test"]  # one lookup, no second one at connect time
    assert [r[0] for r in good.requests] == ["ok.png"]
    with pytest.raises(FetchRefused):  # the next lookup answers the internal address
        await fetcher.fetch(url)
    assert resolver.lookups == ["rebind.test", "rebind.test"]
    assert internal.requests == [] and len(good.requests) == 1


async def test_redirect_to_loopback_is_refused(
    images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    fetcher = make_fetcher(trusted(), allow_private_hosts=("images.test",))
    for path in ("/to-loopback", "/to-localhost", "/to-metadata"):
        with pytest.raises(FetchRefused, match="non-public"):
            await fetcher.fetch(images.url(path, host="images.test"))
    with pytest.raises(FetchRefused, match="http and https"):
        await fetcher.fetch(images.url("/to-ftp", host="images.test"))
    # Only the redirecting requests reached the server; the targets never did.
    assert [r[0] for r in images.requests] == [
        "to-loopback",
        "to-localhost",
        "to-metadata",
        "to-ftp",
    ]


async def test_redirects_are_followed_at_most_three_hops(
    images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    fetcher = make_fetcher(trusted(), allow_private_hosts=("images.test",))
    assert (await fetcher.fetch(images.url("/hop2", host="images.test"))).data == IMAGE
    images.requests.clear()
    with pytest.raises(FetchRefused, match="more than 3"):
        await fetcher.fetch(images.url("/hop3", host="images.test"))
    assert [r[0] for r in images.requests] == ["hop3", "hop2", "hop1", "hop0"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://images.test/a.png", "http and https"),
        ("file:///etc/passwd", "http and https"),
        ("gopher://images.test:70/_x", "http and https"),
        ("http://user:pw@images.test/a.png", "user name"),
        ("http://user@images.test/a.png", "user name"),
        ("http://images.test:8080/a.png", "port"),
        ("https://images.test:22/a.png", "port"),
        ("http://%31%32%37.0.0.1/a.png", "valid host name"),
        ("http:///a.png", "no host"),
    ],
)
async def test_url_rules(url: str, message: str, make_fetcher: FetcherFactory) -> None:
    resolver = trusted()
    fetcher = make_fetcher(resolver, allow_private_hosts=("images.test",), allowed_ports=(80, 443))
    with pytest.raises(FetchRefused, match=message):
        await fetcher.fetch(url)
    assert resolver.lookups == []


async def test_environment_proxies_are_ignored(
    images: ImageServer,
    image_server_factory: ServerFactory,
    make_fetcher: FetcherFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = await image_server_factory()
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
    fetcher = make_fetcher(trusted(), allow_private_hosts=("images.test",))
    assert (await fetcher.fetch(images.url("/ok.png", host="images.test"))).data == IMAGE
    assert proxy.requests == [] and len(images.requests) == 1


async def test_cookies_are_never_kept_between_fetches(
    images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    fetcher = make_fetcher(trusted(), allow_private_hosts=("images.test",))
    await fetcher.fetch(images.url("/cookie.png", host="images.test"))
    await fetcher.fetch(images.url("/ok.png", host="images.test"))
    assert [r[2] for r in images.requests] == ["", ""]


async def test_oversized_stream_is_cut_off_while_streaming(
    images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    fetcher = make_fetcher(
        trusted(), allow_private_hosts=("images.test",), max_image_bytes=256 * 1024
    )
    started = time.monotonic()
    with pytest.raises(FetchTooLarge, match="larger than the limit of 262144 bytes"):
        await fetcher.fetch(images.url("/endless.png", host="images.test"))
    assert time.monotonic() - started < 5
    await asyncio.wait_for(images.aborted.wait(), 5)  # the server saw the connection dropped
    assert images.sent < BIG // 4


async def test_huge_dimensions_stop_the_download_at_the_header(
    images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    fetcher = make_fetcher(trusted(), allow_private_hosts=("images.test",))  # 20 MiB cap
    with pytest.raises(FetchRefused, match="60000x60000"):
        await fetcher.fetch(images.url("/huge-endless.png", host="images.test"))
    await asyncio.wait_for(images.aborted.wait(), 5)
    assert images.sent < 20 * 1024 * 1024  # dropped long before the byte cap


async def test_declared_oversize_is_refused_before_reading_the_body(
    images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    fetcher = make_fetcher(
        trusted(), allow_private_hosts=("images.test",), max_image_bytes=1024 * 1024
    )
    started = time.monotonic()
    with pytest.raises(FetchTooLarge):
        await fetcher.fetch(images.url("/declared-big.png", host="images.test"))
    assert time.monotonic() - started < 2  # did not wait for the body the server holds back


@pytest.mark.parametrize("path", ["/slow-headers.png", "/slow-body.png"])
async def test_slow_image_server_times_out(
    path: str, images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    fetcher = make_fetcher(trusted(), allow_private_hosts=("images.test",), fetch_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(FetchError, match="within 0.5 s"):
        await fetcher.fetch(images.url(path, host="images.test"))
    assert time.monotonic() - started < 2


async def test_gzip_bomb_is_never_inflated(
    images: ImageServer, make_fetcher: FetcherFactory
) -> None:
    fetcher = make_fetcher(trusted(), allow_private_hosts=("images.test",))
    with pytest.raises(FetchRefused, match="compressed"):
        await fetcher.fetch(images.url("/gzip-bomb.png", host="images.test"))
    # Served as identity, the compressed bytes fail the magic-bytes check instead.
    with pytest.raises(FetchRefused, match="first bytes"):
        await fetcher.fetch(images.url("/gzip-raw.png", host="images.test"))


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("/bad-magic.png", FetchRefused, "first bytes"),
        ("/text.html", FetchRefused, "Content-Type: text/html"),
        ("/no-type", FetchRefused, "Content-Type"),
        ("/huge.png", FetchRefused, "60000x60000"),
        ("/missing.png", FetchError, "HTTP 404"),
    ],
)
async def test_what_the_server_sends_must_be_an_acceptable_image(
    path: str,
    error: type[Exception],
    message: str,
    images: ImageServer,
    make_fetcher: FetcherFactory,
) -> None:
    fetcher = make_fetcher(trusted(), allow_private_hosts=("images.test",))
    with pytest.raises(error, match=message):
        await fetcher.fetch(images.url(path, host="images.test"))


async def test_connection_failure_message_reveals_no_address(
    make_fetcher: FetcherFactory,
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fetcher = make_fetcher(
        MapResolver({"down.test": [["127.0.0.1"]]}),
        allow_private_hosts=("127.0.0.0/8",),
        allowed_ports=(port,),
    )
    with pytest.raises(FetchError) as caught:
        await fetcher.fetch(f"http://down.test:{port}/a.png")
    assert type(caught.value) is FetchError
    assert "127.0.0.1" not in str(caught.value) and str(port) not in str(caught.value)


# --- through the proxy -------------------------------------------------------------------------


def ocr_bodies(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [r.json() for r in fake.received if r.json().get("model") == "vision-1"]


def allow(images: ImageServer, **extra: Any) -> dict[str, Any]:
    return {"allow_private_hosts": ["127.0.0.1"], "allowed_ports": [images.port], **extra}


async def test_fetched_images_reach_the_ocr_model_as_data_urls_and_share_a_cache_entry(
    make_proxy: Any, fake: FakeOpenAI, images: ImageServer
) -> None:
    proxy = await make_proxy(ocr=allow(images))
    request = chat(
        "m-ocr",
        image_part(images.url("/ok.png?sig=abc")),
        "and",
        image_part(images.url("/same.png?sig=xyz")),
    )
    r = await proxy.post(URL, json=request, headers={"Authorization": "Bearer sk-client-key"})
    assert r.status == 200, await r.text()
    assert fake.ocr_calls == ["cat"]  # two URLs, same bytes: one OCR call
    # The image host sees none of the client's headers, its key least of all.
    assert len(images.seen_headers) == 2
    for headers in images.seen_headers:
        assert "Authorization" not in headers and "sk-client-key" not in str(headers)
        assert headers["Accept-Encoding"] == "identity"
    (body,) = ocr_bodies(fake)
    sent = body["messages"][0]["content"][1]["image_url"]["url"]
    assert sent == "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    assert content.count("A picture showing cat.") == 2
    assert r.headers["X-OCR-Images"] == "1"
    # A third URL (a new signature) for the same bytes is a cache hit: still one OCR call.
    r = await proxy.post(URL, json=chat("m-ocr", image_part(images.url("/also.png?sig=new"))))
    assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == "1"
    assert fake.ocr_calls == ["cat"]
    # The same bytes sent inline (under another media type) share the fetched image's entry.
    inline = "data:image/jpeg;base64," + base64.b64encode(IMAGE).decode()
    r = await proxy.post(URL, json=chat("m-ocr", image_part(inline)))
    assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == "1"
    assert fake.ocr_calls == ["cat"]


async def test_refused_fetch_gets_a_placeholder_by_default(
    make_proxy: Any, fake: FakeOpenAI, images: ImageServer
) -> None:
    proxy = await make_proxy()
    request = chat(
        "m-ocr",
        image_part("http://169.254.169.254/latest/meta-data/"),
        image_part(images.url("/ok.png", host="localhost")),
    )
    r = await proxy.post(URL, json=request)
    assert r.status == 200
    assert fake.ocr_calls == [] and images.requests == []
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    assert re.search(r"\[Image 1 #[0-9a-f]{8}: this image could not be analysed", content)
    assert re.search(r"\[Image 2 #[0-9a-f]{8}: this image could not be analysed", content)


async def test_refused_fetch_is_400_under_fail_without_internal_details(
    make_proxy: Any, fake: FakeOpenAI, images: ImageServer
) -> None:
    proxy = await make_proxy(ocr={"on_error": "fail", "allowed_ports": [80, 443, images.port]})
    r = await proxy.post(URL, json=chat("m-ocr", image_part(images.url("/a.png", "localhost"))))
    assert r.status == 400
    error = (await r.json())["error"]
    assert error["code"] == "image_url_refused"
    assert error["param"] == "messages[0].content[0]"
    assert "127.0.0.1" not in error["message"] and "::1" not in error["message"]
    assert fake.received == [] and images.requests == []


async def test_failed_fetch_is_502_under_fail(
    make_proxy: Any, fake: FakeOpenAI, images: ImageServer
) -> None:
    proxy = await make_proxy(ocr=allow(images, on_error="fail"))
    r = await proxy.post(URL, json=chat("m-ocr", image_part(images.url("/missing.png"))))
    assert r.status == 502
    error = (await r.json())["error"]
    assert error["code"] == "image_fetch_failed" and "HTTP 404" in error["message"]
    assert fake.received == []


async def test_oversized_remote_image_is_413_under_fail(
    make_proxy: Any, images: ImageServer
) -> None:
    proxy = await make_proxy(ocr=allow(images, on_error="fail", max_image_bytes=100_000))
    r = await proxy.post(URL, json=chat("m-ocr", image_part(images.url("/endless.png"))))
    assert r.status == 413
    assert (await r.json())["error"]["code"] == "payload_too_large"


async def test_remote_urls_pass_through_when_fetching_is_off(
    make_proxy: Any, fake: FakeOpenAI, images: ImageServer
) -> None:
    proxy = await make_proxy(ocr={"fetch_images": False})
    url = "https://images.example/a.png?sig=1"
    r = await proxy.post(URL, json=chat("m-ocr", image_part(url)))
    assert r.status == 200
    assert ocr_bodies(fake)[0]["messages"][0]["content"][1]["image_url"]["url"] == url


@pytest.mark.parametrize(
    ("ocr", "message"),
    [
        ({"allow_private_hosts": ["not a host!"]}, "allow_private_hosts[0]"),
        ({"allowed_ports": [0]}, "allowed_ports"),
        ({"allowed_ports": []}, "allowed_ports"),
        ({"fetch_timeout_s": 0}, "fetch_timeout_s"),
        ({"max_images": 0}, "max_images"),
        ({"max_image_bytes": 0}, "max_image_bytes"),
    ],
)
def test_fetch_and_limit_settings_are_validated(ocr: dict[str, Any], message: str) -> None:
    raw = {"upstreams": [{"base_url": "http://127.0.0.1:9/v1"}], "ocr": ocr}
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[")):
        config.from_mapping(raw, env={})


def test_private_host_entries_may_be_names_or_networks() -> None:
    raw = {
        "upstreams": [{"base_url": "http://127.0.0.1:9/v1"}],
        "ocr": {"allow_private_hosts": ["images.internal", "10.0.0.0/8", "fd00::/8", "10.1.2.3"]},
    }
    assert config.from_mapping(raw, env={}).ocr.allow_private_hosts[1] == "10.0.0.0/8"


def test_allow_private_hosts_networks_match_mapped_and_scoped_forms() -> None:
    policy = Policy(("10.0.0.0/8", "fe80::/10", "Images.Internal."))
    assert policy.allows("x", ipaddress.ip_address("10.1.2.3"))
    assert policy.allows("x", ipaddress.ip_address("::ffff:10.1.2.3"))
    assert policy.allows("x", ipaddress.ip_address("fe80::1%eth0"))
    assert policy.allows("images.internal", ipaddress.ip_address("192.168.0.9"))
    assert not policy.allows("x", ipaddress.ip_address("127.0.0.1"))
    assert not policy.allows("x", ipaddress.ip_address("169.254.169.254"))
    assert policy.allows("x", ipaddress.ip_address("93.184.216.34"))


async def test_slow_fetch_counts_as_ocr_time_for_stream_keepalive(
    make_proxy: Any, fake: FakeOpenAI, images: ImageServer
) -> None:
    # The fetch runs inside the OCR step, so a stream gets its headers and keep-alive comments
    # while a slow image host is still sending, instead of waiting on the download in silence.
    proxy = await make_proxy(ocr=allow(images, keepalive_after_s=0.2, keepalive_interval_s=0.3))
    started = time.monotonic()
    r = await proxy.post(
        URL, json=chat("m-ocr", image_part(images.url("/slow-ok.png")), stream=True)
    )
    assert r.status == 200 and time.monotonic() - started < 0.8
    text = (await r.read()).decode()
    assert time.monotonic() - started >= 1.0
    assert text.startswith(": ") and "data: [DONE]" in text
    assert fake.ocr_calls == ["cat"]


async def test_refused_fetch_after_stream_started_ends_with_an_error_event(
    make_proxy: Any, fake: FakeOpenAI, images: ImageServer
) -> None:
    proxy = await make_proxy(ocr=allow(images, on_error="fail", keepalive_after_s=0.2))
    request = chat(
        "m-ocr",
        image_part(images.url("/slow-ok.png")),
        image_part(images.url("/slow-to-metadata")),
        stream=True,
    )
    started = time.monotonic()
    r = await proxy.post(URL, json=request)
    assert r.status == 200
    text = (await r.read()).decode()
    assert '"code":"image_url_refused"' in text.replace(" ", "") and "169.254" not in text
    assert time.monotonic() - started < 0.95  # the refusal cancelled the other, slower fetch
    assert fake.received == []


@pytest.mark.parametrize("on_error", ["placeholder", "fail"])
async def test_remote_images_of_one_request_share_a_byte_budget(
    on_error: str, make_proxy: Any, fake: FakeOpenAI, images: ImageServer
) -> None:
    # Each image is under max_image_bytes, but together they exceed max_body_bytes: the most a
    # client could have sent inline is also the most the proxy downloads for one request.
    proxy = await make_proxy(
        server={"max_body_bytes": 500_000}, ocr=allow(images, on_error=on_error)
    )
    parts = [image_part(images.url(f"/sized.png?label={x}&size=200000")) for x in "abc"]
    r = await proxy.post(URL, json=chat("m-ocr", *parts))
    if on_error == "fail":
        assert r.status == 413
        assert "together" in (await r.json())["error"]["message"]
        return
    assert r.status == 200
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    failed = content.count("could not be analysed")
    # Downloads run concurrently, so which ones cross the line first is up to the scheduler.
    assert failed >= 1 and len(fake.ocr_calls) + failed == 3 and len(fake.ocr_calls) <= 2


async def test_local_engine_reads_a_fetched_remote_image(
    make_proxy: Any, fake: FakeOpenAI, aiohttp_server: Any
) -> None:
    # The built-in Tesseract engine cannot download anything: with fetching on, a remote image
    # reaches it as bytes, and is read like an inline one.
    from ocrproxy import local
    from tests.conftest import missing
    from tests.test_local import PARAGRAPHS, cer, encode, font, render

    problem = local.Engine(config.OcrLocal()).problem()
    if problem is not None:
        missing(problem)
    scan = encode(render(PARAGRAPHS, font(22)))

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=scan, content_type="image/png")

    app = web.Application()
    app.router.add_get("/scan.png", serve)
    server: TestServer = await aiohttp_server(app)
    proxy = await make_proxy(
        ocr={"model": "local", "allow_private_hosts": ["127.0.0.1"], "allowed_ports": [server.port]}
    )
    url = f"http://127.0.0.1:{server.port}/scan.png?sig=1"
    r = await proxy.post(URL, json=chat("gpt-3.5-turbo-ocr", "Summarise", image_part(url)))
    assert r.status == 200, await r.text()
    assert fake.ocr_calls == []
    sent = fake.chat_requests[-1].json()["messages"][0]["content"]
    transcript = sent.split("TEXT:\n", 1)[1].split("\nDESCRIPTION:", 1)[0]
    assert cer(PARAGRAPHS, transcript) <= 0.02, transcript


async def test_cli_describe_fetches_like_the_proxy(
    images: ImageServer, fake: FakeOpenAI, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from ocrproxy import cli

    logger = logging.getLogger("ocrproxy")  # `describe` sets up logging for the process
    saved = logger.handlers[:], logger.level, logger.propagate
    cfg = tmp_path / "ocrproxy.toml"
    cfg.write_text(
        f'[[upstreams]]\nbase_url = "{fake.url}"\n[ocr]\nmodel = "vision-1"\n'
        f'allow_private_hosts = ["127.0.0.1"]\nallowed_ports = [80, 443, {images.port}]\n'
    )

    def run(url: str) -> tuple[int, str, str]:
        code = cli.main(["describe", url, "--config", str(cfg)])
        out, err = capsys.readouterr()
        return code, out, err

    try:
        code, out, _ = await asyncio.to_thread(run, images.url("/ok.png?sig=1"))
        assert code == 0 and "A picture showing cat." in out
        assert [r[0] for r in images.requests] == ["ok.png"]
        code, out, err = await asyncio.to_thread(run, "http://169.254.169.254/latest/meta-data/")
        assert code == 1 and "non-public" in err and "could not be analysed" in out
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved

"""Hardening of the relay: secrets never reach a client, bounded holds, dropped idle readers.

Each test runs the proxy against a real loopback upstream (an aiohttp app defined here, or the
shared fake of tests/fakes.py extended with hostile models).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import msgspec
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ocrproxy import config, redact, state
from ocrproxy.app import create_app
from ocrproxy.usage import MAX_EVENT as EDITOR_MAX_EVENT
from ocrproxy.usage import UsageEditor
from tests.conftest import chat
from tests.fakes import FakeOpenAI, data_url, image_part

UPSTREAM_KEY = "sk-UPSTREAMSECRET-abcdef123456"
CLIENT_KEY = "ck-client-key-0123456789"
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
URL = "/v1/chat/completions"
MAX_EVENT = 1024 * 1024  # usage.MAX_EVENT: what the usage editor may hold of one event


# -- a careless upstream that echoes what it got -------------------------------------------


class Echo:
    """Routes under /v1/models/<mode>: each answers with the Authorization (and X-Echo) it got."""

    def __init__(self) -> None:
        self.release = asyncio.Event()  # a stream that waits for the test before it ends
        self.closed = asyncio.Event()  # the proxy closed the connection of a "forever" stream

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models/{mode}", self.handle)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        """A model list (merged and re-encoded by the proxy) with the key as a model's owner."""
        owner = request.headers.get("Authorization", "")
        return web.json_response({"object": "list", "data": [{"id": "m", "owned_by": owner}]})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        auth = request.headers.get("Authorization", "")
        echo = request.headers.get("X-Echo", "")
        if mode == "json":
            return web.json_response({"auth": auth, "echo": echo})
        if mode == "header":
            return web.json_response({}, headers={"X-Echo-Auth": auth, "X-Echo": echo})
        if mode in ("big-length", "big-chunked"):
            return await self.big(request, auth, with_length=mode == "big-length")
        if mode == "sse":
            return await self.sse(request, auth)
        if mode in ("forever-sse", "forever-plain", "slow-sse"):
            return await self.forever(request, mode)
        raise web.HTTPNotFound()

    async def big(
        self, request: web.Request, auth: str, *, with_length: bool
    ) -> web.StreamResponse:
        """300 KiB of padding, then the key split across two writes a moment apart."""
        key = auth.encode()
        head = b'{"pad":"' + b"a" * (300 * 1024) + b'","auth":"' + key[:12]
        tail = key[12:] + b'","end":true}'
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if with_length:
            response.content_length = len(head) + len(tail)
        await response.prepare(request)
        await response.write(head)
        await asyncio.sleep(0.2)
        await response.write(tail)
        await response.write_eof()
        return response

    async def sse(self, request: web.Request, auth: str) -> web.StreamResponse:
        """An event with the key split across two writes, then one that must not wait."""
        key = auth.encode()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"auth":"' + key[: len(key) // 2])
        await asyncio.sleep(0.2)
        await response.write(key[len(key) // 2 :] + b'"}\n\n')
        await response.write(b'data: {"n":2}\n\n')
        await asyncio.wait_for(self.release.wait(), 10)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def forever(self, request: web.Request, mode: str) -> web.StreamResponse:
        sse = mode != "forever-plain"
        ctype = "text/event-stream" if sse else "application/octet-stream"
        response = web.StreamResponse(headers={"Content-Type": ctype})
        await response.prepare(request)
        try:
            if mode == "slow-sse":  # a healthy stream, longer than the write timeout
                for i in range(25):
                    await response.write(b'data: {"n":%d}\n\n' % i)
                    await asyncio.sleep(0.1)
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            piece = (b"data: " + b"x" * (64 * 1024) + b"\n\n") if sse else b"x" * (64 * 1024)
            while True:
                await response.write(piece)
        finally:
            if mode != "slow-sse":
                self.closed.set()


@pytest.fixture
async def echo(aiohttp_server: Any) -> tuple[Echo, str]:
    state = Echo()
    server: TestServer = await aiohttp_server(state.app())
    return state, str(server.make_url("/v1"))


def proxy_config(base_url: str, **server: Any) -> config.Config:
    return config.from_mapping(
        {
            "server": server,
            "auth": {"keys": [CLIENT_KEY]},
            "upstreams": [
                {"name": "u", "base_url": base_url, "api_key": UPSTREAM_KEY, "check_models": False}
            ],
            "ocr": {"model": "vision-1", "retries": 0},
        },
        env={},
    )


@pytest.fixture
async def echo_proxy(echo: tuple[Echo, str], aiohttp_client: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(create_app(proxy_config(echo[1])))
    return client


def assert_clean(data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    assert UPSTREAM_KEY.encode() not in raw
    assert CLIENT_KEY.encode() not in raw


# -- H1: no configured secret reaches a client ---------------------------------------------


async def test_2xx_json_body_echoing_keys_is_redacted(echo_proxy):
    r = await echo_proxy.get("/v1/models/json", headers={**CLIENT, "X-Echo": CLIENT_KEY})
    assert r.status == 200
    body = await r.read()
    assert_clean(body)
    assert orjson.loads(body) == {"auth": "Bearer [redacted]", "echo": "[redacted]"}


async def test_merged_model_list_echoing_the_key_is_redacted(echo_proxy):
    r = await echo_proxy.get("/v1/models", headers=CLIENT)
    assert r.status == 200
    body = await r.read()
    assert_clean(body)
    assert orjson.loads(body)["data"][0]["owned_by"] == "Bearer [redacted]"


async def test_response_headers_echoing_keys_are_redacted(echo_proxy):
    r = await echo_proxy.get("/v1/models/header", headers={**CLIENT, "X-Echo": CLIENT_KEY})
    assert r.status == 200
    assert_clean("\n".join(f"{k}: {v}" for k, v in r.headers.items()))
    assert r.headers["X-Echo-Auth"] == "Bearer [redacted]"


@pytest.mark.parametrize("mode", ["big-length", "big-chunked"])
async def test_large_streamed_body_with_a_key_split_across_writes(echo_proxy, mode):
    r = await echo_proxy.get(f"/v1/models/{mode}", headers=CLIENT)
    assert r.status == 200
    body = await r.read()  # aiohttp checks the Content-Length: a broken body would raise
    assert_clean(body)
    decoded = orjson.loads(body)
    assert decoded["end"] is True and len(decoded["pad"]) == 300 * 1024
    if mode == "big-length":  # masked with as many bytes as the key has: the length holds
        assert int(r.headers["Content-Length"]) == len(body)
        assert decoded["auth"] == "Bearer " + "*" * len(UPSTREAM_KEY)
    else:
        assert decoded["auth"] == "Bearer [redacted]"


async def test_sse_with_a_key_split_across_chunks_and_no_event_held(echo, echo_proxy):
    state, _ = echo
    r = await echo_proxy.get("/v1/models/sse", headers=CLIENT)
    assert r.status == 200
    first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
    assert first == b'data: {"auth":"Bearer [redacted]"}\n\n'
    # The next event arrives while the upstream is still open: nothing is held back.
    second = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
    assert second == b'data: {"n":2}\n\n'
    state.release.set()
    rest = await r.read()
    assert rest == b"data: [DONE]\n\n"


class EchoingFake(FakeOpenAI):
    """The shared fake, plus text models that misbehave (see ``chat``)."""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        model = body.get("model", "")
        if model == "echo-auth":  # an OCR request's answer (usage gets edited) with the key
            auth = request.headers.get("Authorization", "")
            return web.json_response(
                {"choices": [], "auth": auth, "usage": {"prompt_tokens": 1, "total_tokens": 1}}
            )
        if model == "echo-auth-stream":  # an SSE answer whose one event carries the key
            auth = request.headers.get("Authorization", "").encode()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"auth":"' + auth[:10])
            await asyncio.sleep(0.1)
            await response.write(auth[10:] + b'"}\n\ndata: [DONE]\n\n')
            await response.write_eof()
            return response
        if model == "unterminated":
            return await self.unterminated(request)
        if model in ("huge-json-length", "huge-json-chunked"):
            return await self.huge_json(request, with_length=model.endswith("length"))
        return await super().chat(request)

    release: asyncio.Event | None = None

    async def unterminated(self, request: web.Request) -> web.StreamResponse:
        """``data: `` then 64 KiB pieces and no blank line for 1.5 MiB, then a usage chunk."""
        assert self.release is not None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: ")
        for _ in range(24):
            await response.write(b"x" * (64 * 1024))
            await asyncio.sleep(0.01)
        await asyncio.wait_for(self.release.wait(), 15)
        final = {"choices": [], "usage": {"prompt_tokens": 2, "total_tokens": 3}}
        await response.write(b"\n\ndata: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    async def huge_json(self, request: web.Request, *, with_length: bool) -> web.StreamResponse:
        """A 9 MiB JSON answer whose end waits for the test."""
        assert self.release is not None
        head = b'{"id":"x","choices":[],"pad":"'
        piece = b"p" * (256 * 1024)
        tail = b'","usage":{"prompt_tokens":1,"total_tokens":1}}'
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if with_length:
            response.content_length = len(head) + 36 * len(piece) + len(tail)
        await response.prepare(request)
        await response.write(head)
        for _ in range(36):
            await response.write(piece)
        await asyncio.wait_for(self.release.wait(), 15)
        await response.write(tail)
        await response.write_eof()
        return response


@pytest.fixture
async def hostile(aiohttp_server: Any) -> EchoingFake:
    state = EchoingFake()
    state.release = asyncio.Event()
    server: TestServer = await aiohttp_server(state.app())
    state.url = str(server.make_url("/v1"))
    return state


@pytest.fixture
async def hostile_proxy(hostile: EchoingFake, aiohttp_client: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(create_app(proxy_config(hostile.url)))
    return client


async def test_ocr_answer_with_usage_edit_is_redacted(hostile_proxy):
    r = await hostile_proxy.post(
        URL, json=chat("echo-auth-ocr", image_part(data_url("a"))), headers=CLIENT
    )
    assert r.status == 200
    body = await r.read()
    assert_clean(body)
    decoded = orjson.loads(body)
    assert decoded["auth"] == "Bearer [redacted]" and decoded["usage"]["ocr"]["images"] == 1


async def test_early_committed_stream_echoing_the_key_is_redacted(hostile, aiohttp_client):
    cfg = proxy_config(hostile.url)
    cfg = config.from_mapping(
        {**msgspec.to_builtins(cfg), "ocr": {"model": "vision-1", "keepalive_after_s": 0.05}},
        env={},
    )
    proxy = await aiohttp_client(create_app(cfg))
    hostile.ocr_delay = 0.3  # the stream is committed early, then relayed into (relay_into)
    r = await proxy.post(
        URL,
        json=chat("echo-auth-stream-ocr", image_part(data_url("e")), stream=True),
        headers=CLIENT,
    )
    body = await r.read()
    assert body.startswith(b": keep-alive\n\n")
    assert_clean(body)
    assert b'data: {"auth":"Bearer [redacted]"}\n\n' in body


def test_redis_password_is_a_secret():
    cfg = config.from_mapping(
        {
            "upstreams": [{"base_url": "http://127.0.0.1:9/v1", "api_key": UPSTREAM_KEY}],
            "auth": {"keys": [CLIENT_KEY]},
            "cache": {"backend": "redis", "redis_url": "redis://:s3cret%2FRedis@127.0.0.1:6379/0"},
        },
        env={},
    )
    secrets = create_app(cfg)[state.SECRETS]
    assert b"s3cret/Redis" in secrets and b"s3cret%2FRedis" in secrets
    assert UPSTREAM_KEY.encode() in secrets and CLIENT_KEY.encode() in secrets
    assert redact.redact(b"pw=s3cret/Redis", secrets) == b"pw=[redacted]"


def test_redactor_masks_a_secret_split_anywhere():
    assert EDITOR_MAX_EVENT == MAX_EVENT
    secrets = redact.secrets_of([UPSTREAM_KEY, CLIENT_KEY])
    body = b'data: {"a":"' + UPSTREAM_KEY.encode() + b'","b":"' + CLIENT_KEY.encode() + b'"}\n\n'
    for same_length in (False, True):
        for cut in range(1, len(body)):
            r = redact.Redactor(secrets, same_length=same_length)
            out = r.feed(body[:cut]) + r.feed(body[cut:]) + r.flush()
            assert_clean(out)
            if same_length:
                assert len(out) == len(body)
    # A piece that does not end with the start of a secret goes out whole, at once.
    r = redact.Redactor(secrets)
    assert r.feed(b'data: {"sk":"s"}\n\n') == b'data: {"sk":"s"}\n\n'
    assert r.feed(b"tail sk-UP") == b"tail " and r.flush() == b"sk-UP"


# -- L12: the usage editor's hold is bounded and linear --------------------------------------


def test_usage_editor_feed_is_linear():
    editor = UsageEditor({"images": 1})
    piece = b"y" * 1024
    started = time.perf_counter()
    out = [editor.feed(b"data: ")]
    out += [editor.feed(piece) for _ in range(4000)]
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, elapsed  # re-joining the pending event each time took seconds
    assert sum(map(len, out)) > 3 * MAX_EVENT  # and it was let go, not held


def test_usage_editor_passes_an_overlong_event_and_resumes_after_it():
    editor = UsageEditor({"images": 1})
    big = b"data: " + b"z" * (MAX_EVENT + 10)
    final = b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
    out = b""
    for i in range(0, len(big), 4096):
        out += editor.feed(big[i : i + 4096])
    assert len(out) > MAX_EVENT  # held no more than the bound
    # The separator is split across pieces (and CRLF style at that): found all the same.
    out += editor.feed(b"\r\n\r") + editor.feed(b"\n" + final) + editor.flush()
    assert out.startswith(big) and out[len(big) : len(big) + 4] == b"\r\n\r\n"
    usage = orjson.loads(out[len(big) + 4 :].strip()[6:])["usage"]
    assert usage == {"prompt_tokens": 1, "ocr": {"images": 1}}


def test_usage_editor_finds_a_separator_split_across_pieces():
    editor = UsageEditor({"images": 1})
    assert editor.feed(b'data: {"usage":{"a":1}}\n') == b""
    assert editor.feed(b"\ndata: x") == b'data: {"usage":{"a":1,"ocr":{"images":1}}}\n\n'
    assert editor.flush() == b"data: x"


async def test_unterminated_sse_event_is_relayed_past_the_bound(hostile, hostile_proxy):
    req = chat(
        "unterminated-ocr",
        image_part(data_url("u")),
        stream=True,
        stream_options={"include_usage": True},
    )
    r = await hostile_proxy.post(URL, json=req, headers=CLIENT)
    assert r.status == 200
    got = b""

    async def read_a_mebibyte() -> None:
        nonlocal got
        while len(got) <= MAX_EVENT:
            piece = await r.content.readany()
            assert piece, "the stream ended early"
            got += piece

    # Bytes arrive while the upstream has not ended the event (it waits for `release`).
    await asyncio.wait_for(read_a_mebibyte(), 10)
    started = time.monotonic()
    health = await hostile_proxy.get("/healthz")
    assert health.status == 200 and time.monotonic() - started < 2.0
    assert hostile.release is not None
    hostile.release.set()
    got += await r.read()
    events = [e for e in got.split(b"\n\n") if e]
    assert events[0] == b"data: " + b"x" * (24 * 64 * 1024)  # relayed unedited
    usage = orjson.loads(events[1][6:])["usage"]
    assert usage["prompt_tokens"] == 2 and usage["ocr"]["images"] == 1  # editing resumed
    assert events[-1] == b"data: [DONE]"


@pytest.mark.parametrize("model", ["huge-json-length", "huge-json-chunked"])
async def test_large_plain_ocr_answer_is_streamed_unedited(hostile, hostile_proxy, model):
    r = await hostile_proxy.post(
        URL, json=chat(f"{model}-ocr", image_part(data_url("h"))), headers=CLIENT
    )
    assert r.status == 200
    first = await asyncio.wait_for(r.content.readany(), 10)  # before the upstream's end
    assert first.startswith(b'{"id":"x"')
    assert hostile.release is not None
    hostile.release.set()
    body = first + await r.read()
    decoded = orjson.loads(body)
    assert len(decoded["pad"]) == 36 * 256 * 1024
    assert decoded["usage"] == {"prompt_tokens": 1, "total_tokens": 1}  # not edited


# -- L13: a client that stops reading is dropped, and the upstream freed --------------------


@pytest.mark.parametrize("mode", ["forever-sse", "forever-plain"])
async def test_client_that_stops_reading_is_dropped(echo, aiohttp_server, mode):
    state, base = echo
    server: TestServer = await aiohttp_server(create_app(proxy_config(base, write_timeout_s=1.0)))
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        request = f"GET /v1/models/{mode} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}"
        await loop.sock_sendall(sock, request.encode() + b"\r\n\r\n")
        started = time.monotonic()
        # The client reads nothing: within a few seconds the upstream's connection is closed...
        await asyncio.wait_for(state.closed.wait(), 10)
        assert time.monotonic() - started < 10

        # ...and so is the client's: draining it now ends in EOF (or a reset), not in a wait.
        async def drain() -> None:
            while True:
                try:
                    if not await loop.sock_recv(sock, 1 << 16):
                        return
                except ConnectionResetError:
                    return

        await asyncio.wait_for(drain(), 10)
    finally:
        sock.close()


async def test_a_reading_client_outlives_the_write_timeout(echo, aiohttp_client):
    _, base = echo
    proxy = await aiohttp_client(create_app(proxy_config(base, write_timeout_s=0.5)))
    r = await proxy.get("/v1/models/slow-sse", headers=CLIENT)
    body = await r.read()  # 2.5 s of stream, each write taken at once
    assert body.count(b"\n\n") == 26 and body.endswith(b"data: [DONE]\n\n")


# -- an early-committed stream shows a body byte at once ------------------------------------


async def test_early_commit_writes_a_keepalive_at_once(make_proxy, fake):
    proxy = await make_proxy(ocr={"keepalive_after_s": 0.2, "keepalive_interval_s": 5.0})
    fake.ocr_delay = 2.5
    started = time.monotonic()
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("k")), stream=True))
    first = await r.content.readany()
    first_at = time.monotonic() - started
    assert first.startswith(b": keep-alive\n\n")
    assert first_at < 1.5, first_at  # not after keepalive_after_s + keepalive_interval_s
    body = first + await r.read()
    assert b": ocr images=1 cache_hits=0" in body and body.endswith(b"data: [DONE]\n\n")
    assert body.count(b": keep-alive") == 1  # the OCR summary opens the upstream wait

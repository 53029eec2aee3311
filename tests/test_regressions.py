"""Regression tests for defects found in review: SSE framing after an early commit, single-flight
hand-over, key relaying, compressed upstream answers, bodies dying mid-read, Expect: 100-continue."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web

from ocrproxy import config
from ocrproxy.app import create_app
from ocrproxy.cache import Description, DescriptionCache, MemoryLRU
from tests.conftest import chat
from tests.fakes import data_url, image_part

URL = "/v1/chat/completions"

# What api.openai.com really sends for an error: indented JSON over several lines.
PRETTY_ERROR = (
    b'{\n    "error": {\n        "message": "Rate limit reached",\n'
    b'        "type": "requests",\n        "param": null,\n        "code": "rate_limit_exceeded"\n'
    b"    }\n}\n"
)


def sse_events(raw: bytes) -> list[str]:
    """The `data` of each SSE event, as an SSE client (EventSource) would assemble it."""
    out = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln[5:].lstrip(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(lines).decode())
    return out


async def pretty_upstream(aiohttp_server: Any, status: int, body: bytes) -> str:
    async def chat_handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_handler)
    app.router.add_get("/v1/models", chat_handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1"))


async def keepalive_proxy(aiohttp_client, other: str, fake) -> Any:
    """A proxy that routes `pretty*` models to ``other`` and commits streams after 0.1 s."""
    cfg = config.from_mapping(
        {
            "upstreams": [
                {"name": "real", "base_url": other, "api_key": "k1", "models": ["pretty*"]},
                {"name": "fake", "base_url": fake.url, "api_key": "k2"},
            ],
            "ocr": {"model": "vision-1", "keepalive_after_s": 0.1, "keepalive_interval_s": 0.1},
        },
        env={},
    )
    return await aiohttp_client(create_app(cfg))


async def test_upstream_error_after_keepalive_is_a_parseable_sse_event(
    aiohttp_client, aiohttp_server, fake
):
    other = await pretty_upstream(aiohttp_server, 429, PRETTY_ERROR)
    proxy = await keepalive_proxy(aiohttp_client, other, fake)
    fake.ocr_delay = 0.4  # the OCR step outlasts keepalive_after_s: the 200 is committed early
    r = await proxy.post(URL, json=chat("pretty-ocr", image_part(data_url("k")), stream=True))
    assert r.status == 200
    events = sse_events(await r.read())
    assert events, "no event at all"
    # The client must be able to read the error object out of the last event.
    err = orjson.loads(events[-1])
    assert err["error"]["code"] == "rate_limit_exceeded"


async def test_flight_cancelled_by_a_leaving_client_does_not_cancel_a_newcomer():
    cache = DescriptionCache(MemoryLRU(10, 10**6, 60))
    started = asyncio.Event()

    async def slow_to_unwind() -> Description:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # e.g. the aiohttp response closing, or tier.release()
            raise
        return Description("never", "m")

    async def quick() -> Description:
        return Description("fresh", "m")

    leaver = asyncio.ensure_future(cache.get_or_create(b"k", slow_to_unwind))
    await started.wait()
    leaver.cancel()  # client A disconnects: its flight is cancelled...
    await asyncio.sleep(0)
    # ...and client B, who was never cancelled, asks for the same image meanwhile.
    value, _ = await asyncio.wait_for(cache.get_or_create(b"k", quick), 1)
    assert value.text == "fresh"


async def test_client_proxy_key_never_reaches_an_upstream_without_its_own_key(make_proxy, fake):
    proxy = await make_proxy(
        auth={"keys": ["sk-client-of-proxy"]},
        upstreams=[{"name": "local", "base_url": fake.url}],  # e.g. a keyless vLLM/Ollama
    )
    headers = {"Authorization": "Bearer sk-client-of-proxy"}
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("z"))), headers=headers)
    assert r.status == 200
    for received in fake.received:
        assert "sk-client-of-proxy" not in received.headers.get("Authorization", ""), received.path


async def test_models_error_echoing_the_key_is_redacted(aiohttp_client, aiohttp_server):
    body = b'{"error": {"message": "Incorrect API key provided: sk-upstream-secret"}}'
    other = await pretty_upstream(aiohttp_server, 401, body)
    cfg = config.from_mapping(
        {"upstreams": [{"name": "u", "base_url": other, "api_key": "sk-upstream-secret"}]},
        env={},
    )
    proxy = await aiohttp_client(create_app(cfg))
    r = await proxy.get("/v1/models")
    assert r.status == 401
    assert b"sk-upstream-secret" not in await r.read()


async def test_models_list_survives_a_compressing_upstream(aiohttp_client, aiohttp_server):
    # api.openai.com (behind Cloudflare) gzips JSON when the client accepts it, and every
    # common client (openai SDK/httpx, requests, aiohttp, browsers) sends Accept-Encoding: gzip.
    async def models_handler(request: web.Request) -> web.Response:
        r = web.json_response({"object": "list", "data": [{"id": "gpt-x", "object": "model"}]})
        r.enable_compression()  # honours the request's Accept-Encoding
        return r

    app = web.Application()
    app.router.add_get("/v1/models", models_handler)
    server = await aiohttp_server(app)
    cfg = config.from_mapping(
        {"upstreams": [{"name": "u", "base_url": str(server.make_url("/v1")), "api_key": "k"}]},
        env={},
    )
    proxy = await aiohttp_client(create_app(cfg))
    r = await proxy.get("/v1/models", headers={"Accept-Encoding": "gzip, deflate"})
    assert r.status == 200, await r.text()
    ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == ["gpt-x", "gpt-x-ocr"]


async def test_plain_answer_after_keepalive_is_a_parseable_sse_event(
    aiohttp_client, aiohttp_server, fake
):
    # The upstream ignores stream=true and answers plain (pretty-printed) JSON with 200.
    pretty_ok = b'{\n  "id": "c1",\n  "object": "chat.completion",\n  "choices": []\n}\n'
    other = await pretty_upstream(aiohttp_server, 200, pretty_ok)
    proxy = await keepalive_proxy(aiohttp_client, other, fake)
    fake.ocr_delay = 0.4
    r = await proxy.post(URL, json=chat("pretty-ocr", image_part(data_url("k")), stream=True))
    events = sse_events(await r.read())
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[-2])["id"] == "c1"


async def test_client_expect_100_continue_is_not_forwarded_with_an_already_read_body(
    aiohttp_client,
):
    # curl sends `Expect: 100-continue` for any body over 1 KB (every inline image). The proxy
    # has already read the body; forwarding the header makes aiohttp's client hold the body back
    # until the upstream says 100 Continue, which many servers (HTTP/1.0-style, some inference
    # servers, load balancers) never do: the request then hangs until the read timeout.
    got_body = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        try:
            await asyncio.wait_for(reader.readexactly(length), 1.0)
            got_body.set()
            body = b'{"id":"x","choices":[]}'
            status = b"200 OK"
        except TimeoutError:
            body, status = b'{"error":{"message":"no body"}}', b"408 Request Timeout"
        writer.write(
            b"HTTP/1.1 "
            + status
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = config.from_mapping(
            {
                "upstreams": [
                    {"name": "u", "base_url": f"http://127.0.0.1:{port}/v1", "api_key": "k"}
                ]
            },
            env={},
        )
        proxy = await aiohttp_client(create_app(cfg))
        r = await proxy.post(
            URL, json=chat("gpt-3.5-turbo", "x" * 2000), headers={"Expect": "100-continue"}
        )
        assert got_body.is_set() and r.status == 200, await r.text()
    finally:
        server.close()
        await server.wait_closed()


async def test_compressed_upstream_error_echoing_the_key_is_redacted(
    aiohttp_client, aiohttp_server
):
    async def chat_handler(request: web.Request) -> web.Response:
        await request.read()
        r = web.json_response(
            {"error": {"message": f"bad key {request.headers.get('Authorization')}"}}, status=401
        )
        r.enable_compression()  # gzip, because the client said it accepts it
        return r

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_handler)
    server = await aiohttp_server(app)
    cfg = config.from_mapping(
        {
            "upstreams": [
                {
                    "name": "u",
                    "base_url": str(server.make_url("/v1")),
                    "api_key": "sk-upstream-secret",
                }
            ]
        },
        env={},
    )
    proxy = await aiohttp_client(create_app(cfg))
    # aiohttp's client, like httpx/openai and requests, sends Accept-Encoding: gzip by default
    r = await proxy.post(URL, json=chat("gpt-3.5-turbo", "hi"))
    assert r.status == 401
    assert "sk-upstream-secret" not in await r.text()  # r.text() decompresses


async def _dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A raw HTTP upstream that reads the request, promises 1000 bytes, sends 14, and hangs up."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        b'{"id":"partial'
    )
    await writer.drain()
    writer.close()


@pytest.fixture
async def dying_port():
    server = await asyncio.start_server(_dying, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_plain_upstream_body_dying_after_keepalive_ends_the_stream_cleanly(
    aiohttp_client, fake, dying_port
):
    # After the 200 + SSE headers are committed, the upstream answers plain JSON and dies
    # mid-body: the client must get an error event and a clean end, not a hang.
    cfg = config.from_mapping(
        {
            "upstreams": [
                {
                    "name": "real",
                    "base_url": f"http://127.0.0.1:{dying_port}/v1",
                    "models": ["dying*"],
                },
                {"name": "fake", "base_url": fake.url},
            ],
            "ocr": {"model": "vision-1", "keepalive_after_s": 0.1, "keepalive_interval_s": 0.1},
        },
        env={},
    )
    proxy = await aiohttp_client(create_app(cfg))
    fake.ocr_delay = 0.4
    r = await proxy.post(URL, json=chat("dying-ocr", image_part(data_url("k")), stream=True))
    assert r.status == 200
    raw = await asyncio.wait_for(r.read(), 5)  # a clean end, not a broken connection
    assert "error" in orjson.loads(sse_events(raw)[-1])


async def test_plain_upstream_body_dying_before_relay_is_a_502_not_a_500(
    aiohttp_client, dying_port
):
    cfg = config.from_mapping(
        {"upstreams": [{"name": "u", "base_url": f"http://127.0.0.1:{dying_port}/v1"}]}, env={}
    )
    proxy = await aiohttp_client(create_app(cfg))
    r = await proxy.post(URL, json=chat("gpt-3.5-turbo", "hi"))  # the small-body path
    assert r.status == 502, await r.text()

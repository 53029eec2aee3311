"""Routing, header hygiene, auth, pass-through routes and the merged model list."""

from __future__ import annotations

import hashlib
import re

from aiohttp import web
from yarl import URL

from ocrproxy import config
from ocrproxy.upstream import Router, request_headers, response_headers
from tests.conftest import chat
from tests.fakes import data_url, image_part

CHAT = "/v1/chat/completions"


def up(name: str, *models: str, key: str = "") -> config.Upstream:
    return config.Upstream(base_url=f"http://{name}/v1", name=name, api_key=key, models=models)


def test_first_matching_upstream_wins():
    router = Router([up("ds", "deepseek-*"), up("oa", "gpt-*", "o1*"), up("any", "*")])
    assert router.route("deepseek-chat").name == "ds"
    assert router.route("gpt-4o-mini").name == "oa"
    assert router.route("o1-preview").name == "oa"
    assert router.route("llama3").name == "any"


def test_request_headers_drop_hop_by_hop_and_client_credentials():
    incoming = {
        "Authorization": "Bearer client-key",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "Transfer-Encoding": "chunked",
        "Host": "proxy",
        "Content-Length": "10",
        "X-Forwarded-For": "10.0.0.1",
        "Api-Key": "azure-client-key",
        "OpenAI-Organization": "org-1",
        "User-Agent": "ua",
    }
    out = request_headers(incoming, up("oa", "*", key="sk-up"))
    assert out["Authorization"] == "Bearer sk-up"
    assert out["User-Agent"] == "ua"
    for gone in (
        "OpenAI-Organization",  # with the operator's key: the operator's organisation only
        "Connection",
        "X-Secret-Hop",
        "Keep-Alive",
        "Transfer-Encoding",
        "Host",
        "Content-Length",
        "X-Forwarded-For",
        "Api-Key",
    ):
        assert gone not in out
    relay = request_headers(incoming, up("oa", "*"))
    assert relay["Authorization"] == "Bearer client-key"  # pure relay mode
    assert relay["OpenAI-Organization"] == "org-1"  # with the client's own key


def test_response_headers_keep_upstream_request_id_under_another_name():
    out = response_headers(
        {
            "X-Request-Id": "u1",
            "Connection": "close",
            "X-Other": "v",
            "Content-Length": "5",
            "Transfer-Encoding": "chunked",
        }
    )
    assert dict(out) == {"X-Upstream-Request-Id": "u1", "X-Other": "v"}


async def test_upstream_gets_its_own_key_never_the_clients(make_proxy, fake):
    proxy = await make_proxy(auth={"keys": ["client-key-1"]})
    r = await proxy.post(
        CHAT,
        json=chat("m-ocr", image_part(data_url("a"))),
        headers={"Authorization": "Bearer client-key-1"},
    )
    assert r.status == 200
    for received in fake.received:
        assert received.headers["Authorization"] == "Bearer sk-upstream-secret"


async def test_missing_or_wrong_client_key_is_401_and_nothing_goes_upstream(make_proxy, fake):
    proxy = await make_proxy(auth={"keys": ["client-key-1", "client-key-2"]})
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "client-key-1"},
        {"Authorization": "Basic client-key-1"},
    ):
        r = await proxy.post(CHAT, json=chat("m", "x"), headers=headers)
        assert r.status == 401
        error = (await r.json())["error"]
        assert error["code"] == "invalid_api_key" and set(error) == {
            "message",
            "type",
            "param",
            "code",
        }
        assert "client-key" not in error["message"]
    r = await proxy.get("/v1/models")
    assert r.status == 401
    r = await proxy.post(
        CHAT, json=chat("m", "x"), headers={"Authorization": "Bearer client-key-2"}
    )
    assert r.status == 200
    assert len(fake.received) == 1
    assert (await proxy.get("/healthz")).status == 200  # health needs no key


async def test_relay_mode_forwards_client_authorization(make_proxy, fake):
    proxy = await make_proxy(upstreams=[{"base_url": fake.url}])
    r = await proxy.post(
        CHAT,
        json=chat("m-ocr", image_part(data_url("r"))),
        headers={"Authorization": "Bearer user-own-key"},
    )
    assert r.status == 200
    assert {rec.headers["Authorization"] for rec in fake.received} == {"Bearer user-own-key"}


async def test_ocr_model_is_routed_like_any_model(make_proxy, fake, aiohttp_server):
    from tests.fakes import FakeOpenAI

    vision = FakeOpenAI()
    server = await aiohttp_server(vision.app())
    proxy = await make_proxy(
        upstreams=[
            {"name": "vision", "base_url": str(server.make_url("/v1")), "models": ["vision-*"]},
            {"name": "text", "base_url": fake.url, "api_key": "sk-t"},
        ]
    )
    r = await proxy.post(CHAT, json=chat("m-ocr", image_part(data_url("routed"))))
    assert r.status == 200
    assert vision.ocr_calls == ["routed"] and fake.ocr_calls == []
    assert len(fake.chat_requests) == 1


async def test_passthrough_routes_keep_method_query_body_status_and_headers(make_proxy, fake):
    proxy = await make_proxy(
        server={"passthrough_routes": ["files", "files/*", "embeddings", "things/*"]}
    )
    raw = str(proxy.make_url("/v1/files/file-1/content")) + "?limit=3&after=a%2Fb"
    r = await proxy.session.get(URL(raw, encoded=True))
    assert r.status == 200
    echo = await r.json()
    assert (
        echo["method"] == "GET" and echo["path"] == "/v1/files/file-1/content?limit=3&after=a%2Fb"
    )
    assert r.headers["X-Fake-Header"] == "kept"
    assert r.headers["X-Upstream-Request-Id"] == "upstream-echo"
    # The upstream got its key; echoed back, the key is masked before it reaches the client.
    assert fake.received[-1].headers["Authorization"] == "Bearer sk-upstream-secret"
    assert echo["headers"]["Authorization"] == "Bearer [redacted]"

    r = await proxy.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hi"})
    echo = await r.json()
    assert fake.received[-1].json() == {"model": "text-embedding-3-small", "input": "hi"}

    r = await proxy.put(
        "/v1/things/1", data=b"raw-bytes", headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status == 201
    assert fake.received[-1].body == b"raw-bytes"

    r = await proxy.delete("/v1/files/file-1")
    assert (await r.json())["method"] == "DELETE"


async def test_passthrough_streams_a_large_upload(proxy, fake):
    payload = bytes(range(256)) * 20_000  # 5 MB, multipart-like opaque body

    async def chunks():
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    r = await proxy.post(
        "/v1/audio/transcriptions",
        data=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    echo = await r.json()
    assert echo["length"] == len(payload)
    assert echo["sha256"] == hashlib.sha256(payload).hexdigest()


async def test_get_on_chat_completions_is_passed_through(proxy, fake):
    r = await proxy.get("/v1/chat/completions?limit=2")
    assert (await r.json())["method"] == "GET"


async def test_models_are_merged_and_offered_with_suffix(make_proxy, fake, aiohttp_server):
    from tests.fakes import FakeOpenAI

    other = FakeOpenAI(models_list=["llama3", "gpt-3.5-turbo"])
    server = await aiohttp_server(other.app())
    proxy = await make_proxy(
        upstreams=[
            {"name": "a", "base_url": fake.url, "api_key": "sk-a"},
            {"name": "b", "base_url": str(server.make_url("/v1")), "api_key": "sk-b"},
        ]
    )
    r = await proxy.get("/v1/models")
    assert r.status == 200
    ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == [  # each twin right after its base model
        "gpt-3.5-turbo",
        "gpt-3.5-turbo-ocr",
        "deepseek-chat",
        "deepseek-chat-ocr",
        "llama3",
        "llama3-ocr",
    ]


async def test_models_with_one_upstream_down_still_lists_the_rest(
    make_proxy, fake, unused_tcp_port
):
    proxy = await make_proxy(
        upstreams=[
            {"name": "a", "base_url": fake.url, "api_key": "sk-a"},
            {
                "name": "down",
                "base_url": f"http://127.0.0.1:{unused_tcp_port}/v1",
                "api_key": "sk-b",
            },
        ]
    )
    r = await proxy.get("/v1/models")
    assert r.status == 200
    assert len((await r.json())["data"]) == 4


async def test_unknown_route_is_openai_shaped_404(proxy):
    r = await proxy.get("/nope")
    assert r.status == 404
    assert set((await r.json())["error"]) == {"message", "type", "param", "code"}


async def test_cors_for_browser_clients(make_proxy, fake):
    proxy = await make_proxy(
        server={"cors_origins": ["https://chat.example"]}, auth={"keys": ["ck"]}
    )
    pre = await proxy.options(
        CHAT,
        headers={
            "Origin": "https://chat.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert pre.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    r = await proxy.post(
        CHAT,
        json=chat("m-ocr", "x"),
        headers={"Origin": "https://chat.example", "Authorization": "Bearer ck"},
    )
    assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "X-OCR-Images" in r.headers["Access-Control-Expose-Headers"]
    other = await proxy.options(
        CHAT, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert other.status == 403 and "Access-Control-Allow-Origin" not in other.headers
    r = await proxy.post(CHAT, json=chat("m", "x"), headers={"Origin": "https://evil.example"})
    assert r.status == 401 and "Access-Control-Allow-Origin" not in r.headers
    assert fake.received == [fake.received[0]]  # only the allowed, keyed request went upstream


async def test_no_cors_headers_unless_configured(proxy):
    r = await proxy.post(CHAT, json=chat("m", "x"), headers={"Origin": "https://a.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


async def test_wrong_method_is_openai_shaped_405(proxy):
    r = await proxy.post("/healthz")
    assert r.status == 405
    assert (await r.json())["error"]["code"] == "method_not_allowed"


async def test_every_upstream_request_asks_for_an_uncompressed_answer(proxy, fake):
    # The proxy reads what it relays (errors to redact, usage to extend): no gzip from upstreams,
    # whatever the client accepts.
    gzip_ok = {"Accept-Encoding": "gzip, deflate, br"}
    r = await proxy.post(
        "/v1/chat/completions", json=chat("m-ocr", image_part(data_url("x"))), headers=gzip_ok
    )
    assert r.status == 200
    assert (await proxy.post("/v1/chat/completions", json=chat("m", "hi"))).status == 200
    assert (await proxy.get("/v1/models", headers=gzip_ok)).status == 200
    assert (await proxy.post("/v1/embeddings", json={"model": "m", "input": "a"})).status == 200
    kinds = {(r.method, r.path) for r in fake.received}
    assert len(fake.received) >= 5 and ("GET", "/v1/models") in kinds
    assert {r.headers.get("Accept-Encoding") for r in fake.received} == {"identity"}


async def test_every_kind_of_response_carries_the_request_id_and_cors_headers(
    make_proxy, fake, aiohttp_server
):
    # Responses are sent from several places (returned by a handler, committed early as a
    # keep-alive stream, streamed as they arrive): each must carry the same stamp.
    async def content(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 400_000)  # past the size answered in one write

    big = web.Application()
    big.router.add_get("/v1/files/f/content", content)
    files = await aiohttp_server(big)
    proxy = await make_proxy(
        server={"cors_origins": ["https://chat.example"], "passthrough_routes": ["files/*"]},
        ocr={"keepalive_after_s": 0.05, "keepalive_interval_s": 0.05},
        upstreams=[
            {"name": "files", "base_url": str(files.make_url("/v1")), "models": ["files-*"]},
            {"name": "fake", "base_url": fake.url},
        ],
    )
    fake.ocr_delay = 0.3
    origin = {"Origin": "https://chat.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST"}
    sent = {
        "plain answer": proxy.post(CHAT, json=chat("m", "x"), headers=origin),
        "stream": proxy.post(CHAT, json=chat("m", "x", stream=True), headers=origin),
        "early stream": proxy.post(
            CHAT, json=chat("m-ocr", image_part(data_url("s")), stream=True), headers=origin
        ),
        "large body": proxy.get("/v1/files/f/content", headers=origin),
        "proxy error": proxy.post(CHAT, data=b"{", headers=origin),
        "unknown route": proxy.get("/nowhere", headers=origin),
        "preflight": proxy.options(CHAT, headers=preflight),
    }
    statuses = {}
    for kind, request in sent.items():
        r = await request
        await r.read()
        statuses[kind] = r.status
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers.get("X-Request-Id", "")), kind
        assert r.headers.get("Access-Control-Allow-Origin") == "https://chat.example", kind
    assert statuses == {
        "plain answer": 200,
        "stream": 200,
        "early stream": 200,
        "large body": 200,
        "proxy error": 400,
        "unknown route": 404,
        "preflight": 204,
    }

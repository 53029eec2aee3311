"""The Anthropic Messages routes beside the chat route, against real loopback fakes: one
description cache for both dialects, an OCR model of either dialect, upstreams that speak
Messages (URL, credentials, headers, routing), the environment-only configuration, client
keys on every route, ``count_tokens`` and the Anthropic model page.

The fake Anthropic upstream refuses any image block as DeepSeek does, so a 200 from it proves
that no image reached it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web

from ocrproxy import config
from tests.conftest import anthropic_upstream, chat, spawn_proxy
from tests.fake_anthropic import FakeAnthropic, b64, image_block
from tests.fakes import data_url, image_part, png

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"
VERSION = {"anthropic-version": "2023-06-01"}


def message(model: str, *content: Any, **extra: Any) -> dict[str, Any]:
    """A one-message Messages request whose content is ``content`` blocks (or one string)."""
    if len(content) == 1 and isinstance(content[0], str):
        body: Any = content[0]
    else:
        body = [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]
    return {
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": body}],
        **extra,
    }


def picture(label: str) -> dict[str, Any]:
    return image_block(b64(png(label)))


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def fake_count(body: dict[str, Any]) -> int:
    """What the fake's count_tokens answers for ``body``."""
    size = len(orjson.dumps(body.get("messages"))) + len(orjson.dumps(body.get("system", "")))
    return size // 4


@pytest.mark.parametrize("first", ["chat", "messages"])
async def test_an_image_described_in_one_dialect_is_a_cache_hit_in_the_other(
    make_both, fake, fake_anthropic, first
):
    proxy = await make_both()
    as_chat = (CHAT, chat("deepseek-v4-pro-ocr", "what is it?", image_part(data_url("owl"))))
    as_messages = (MESSAGES, message("deepseek-v4-pro-ocr", "what is it?", picture("owl")))
    one, two = (as_chat, as_messages) if first == "chat" else (as_messages, as_chat)
    r1 = await proxy.post(one[0], json=one[1])
    assert r1.status == 200, await r1.text()
    assert r1.headers["X-OCR-Cache-Hits"] == "0"
    r2 = await proxy.post(two[0], json=two[1])
    assert r2.status == 200, await r2.text()
    assert r2.headers["X-OCR-Cache-Hits"] == "1"
    assert r2.headers["X-OCR-Images"] == "1"
    assert fake.ocr_calls == ["owl"]  # described once, for both dialects
    assert "A picture showing owl." in fake.chat_requests[0].body.decode()
    assert "A picture showing owl." in fake_anthropic.message_requests[0].body.decode()
    usage = (await r2.json())["usage"]["ocr"]
    assert usage["cache_hits"] == 1 and usage["images"] == 1


def the_ocr_call(fake_anthropic: FakeAnthropic) -> Any:
    [call] = [
        r
        for r in fake_anthropic.received
        if r.path == "/v1/messages" and r.json()["model"] == "claude-haiku-4-5"
    ]
    return call


@pytest.mark.parametrize("route", ["chat", "messages"])
async def test_an_ocr_model_behind_an_anthropic_upstream_is_called_through_messages(
    make_both, fake, fake_anthropic, route
):
    proxy = await make_both()
    # The client declares JPEG; the bytes are PNG: the OCR call names what the bytes are.
    if route == "chat":
        url = "data:image/jpeg;base64," + b64(png("fox"))
        req = chat("deepseek-v4-pro", "see", image_part(url), ocr_model="claude-haiku-4-5")
        target = CHAT
    else:
        block = image_block(b64(png("fox")))
        block["source"]["media_type"] = "image/jpeg"
        req = message("deepseek-v4-pro", "see", block, ocr_model="claude-haiku-4-5")
        target = MESSAGES
    r = await proxy.post(target, json=req)
    assert r.status == 200, await r.text()
    assert fake_anthropic.ocr_calls == ["fox"] and fake.ocr_calls == []

    call = the_ocr_call(fake_anthropic)
    headers = lower(call.headers)
    assert headers["x-api-key"] == "sk-ant-upstream-secret"
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    content = call.json()["messages"][0]["content"]
    image = next(block for block in content if block["type"] == "image")
    assert image["source"] == {"type": "base64", "media_type": "image/png", "data": b64(png("fox"))}
    assert any(block["type"] == "text" and block["text"] for block in content)  # the prompt

    answer = await r.json()
    ocr = answer["usage"]["ocr"]
    assert ocr["model"] == "claude-haiku-4-5" and ocr["images"] == 1
    if route == "chat":
        assert "Claude sees fox." in fake.chat_requests[0].body.decode()
        assert (ocr["prompt_tokens"], ocr["completion_tokens"]) == (300, 30)
        assert ocr["total_tokens"] == 330
        assert "input_tokens" not in ocr
    else:
        assert "Claude sees fox." in fake_anthropic.message_requests[0].body.decode()
        assert (ocr["input_tokens"], ocr["output_tokens"]) == (300, 30)
        assert "prompt_tokens" not in ocr


async def test_messages_go_to_v1_messages_below_a_vendor_base_url(make_both, fake_anthropic):
    proxy = await make_both()
    r = await proxy.post(MESSAGES, json=message("deepseek-v4-pro", "hi"), headers=VERSION)
    assert r.status == 200
    assert (await r.json())["content"][0]["text"] == "echo: hi"
    assert [x.path for x in fake_anthropic.received] == ["/v1/messages"]


async def test_a_base_url_ending_in_v1_is_not_doubled(make_both, fake, fake_anthropic):
    openai = {"name": "fake", "base_url": fake.url, "api_key": "sk-upstream-secret"}
    ups = [anthropic_upstream(fake_anthropic, base_url=fake_anthropic.url + "/v1/"), openai]
    proxy = await make_both(upstreams=ups)
    r = await proxy.post(MESSAGES, json=message("deepseek-v4-pro", "hi"))
    assert r.status == 200
    r = await proxy.post(COUNT, json=message("deepseek-v4-pro", "hi"))
    assert r.status == 200
    assert [x.path for x in fake_anthropic.received] == [
        "/v1/messages",
        "/v1/messages/count_tokens",
    ]


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ("", {"x-api-key": "sk-ant-upstream-secret"}),
        ("x-api-key", {"x-api-key": "sk-ant-upstream-secret"}),
        ("bearer", {"authorization": "Bearer sk-ant-upstream-secret"}),
    ],
)
async def test_the_upstream_key_goes_in_the_upstreams_style_never_the_clients(
    make_both, fake, fake_anthropic, auth, expected
):
    openai = {"name": "fake", "base_url": fake.url, "api_key": "sk-upstream-secret"}
    proxy = await make_both(
        upstreams=[anthropic_upstream(fake_anthropic, auth=auth), openai],
        auth={"keys": ["client-key-1"]},
    )
    for client in ({"x-api-key": "client-key-1"}, {"Authorization": "Bearer client-key-1"}):
        r = await proxy.post(
            MESSAGES, json=message("deepseek-v4-pro-ocr", "hi", picture("k")), headers=client
        )
        assert r.status == 200, await r.text()
        r = await proxy.post(COUNT, json=message("deepseek-v4-pro", "hi"), headers=client)
        assert r.status == 200
    assert len(fake_anthropic.received) == 4
    for received in fake_anthropic.received:
        headers = lower(received.headers)
        assert {k: headers.get(k) for k in expected} == expected
        assert {"authorization", "x-api-key"} & headers.keys() == expected.keys()
        assert "client-key-1" not in str(headers)
    for received in fake.received:  # the OCR calls, with the OpenAI upstream's own key
        assert received.headers["Authorization"] == "Bearer sk-upstream-secret"
        assert "client-key-1" not in str(received.headers)


@pytest.mark.parametrize(
    ("auth", "client", "expected"),
    [
        ("", {"x-api-key": "sk-users-own"}, {"x-api-key": "sk-users-own"}),
        ("", {"Authorization": "Bearer sk-users-own"}, {"x-api-key": "sk-users-own"}),
        ("bearer", {"x-api-key": "sk-users-own"}, {"authorization": "Bearer sk-users-own"}),
        (
            "bearer",
            {"Authorization": "Bearer sk-users-own"},
            {"authorization": "Bearer sk-users-own"},
        ),
    ],
)
async def test_relay_mode_relays_the_clients_key_in_the_upstreams_style(
    make_both, fake, fake_anthropic, auth, client, expected
):
    ups = [
        {**anthropic_upstream(fake_anthropic, auth=auth), "api_key": ""},
        {"name": "fake", "base_url": fake.url},
    ]
    proxy = await make_both(upstreams=ups)
    r = await proxy.post(MESSAGES, json=message("deepseek-v4-pro", "hi"), headers=client)
    assert r.status == 200
    r = await proxy.post(
        COUNT + "?beta=true", json=message("deepseek-v4-pro", "hi"), headers=client
    )
    assert r.status == 200
    r = await proxy.get("/v1/models", headers={**client, **VERSION})
    assert r.status == 200
    # With OCR: the text model and the OCR model (behind the Anthropic upstream) both.
    body = message("deepseek-v4-pro-ocr", "hi", picture("r"), ocr_model="claude-haiku-4-5")
    r = await proxy.post(MESSAGES, json=body, headers=client)
    assert r.status == 200, await r.text()
    assert fake_anthropic.ocr_calls == ["r"]
    assert len(fake_anthropic.received) == 5
    for received in fake_anthropic.received:
        headers = lower(received.headers)
        assert {"authorization", "x-api-key"} & headers.keys() == expected.keys()
        assert {k: headers[k] for k in expected} == expected
    # The OCR model behind the OpenAI upstream (no key of its own) is called without any
    # credentials: the client's key is for the Anthropic upstream, and must not reach another.
    r = await proxy.post(
        MESSAGES, json=message("deepseek-v4-pro-ocr", "hi", picture("o")), headers=client
    )
    assert r.status == 200, await r.text()
    assert fake.ocr_calls == ["o"]
    assert {"authorization", "x-api-key"} & lower(fake.received[-1].headers).keys() == set()
    assert lower(fake_anthropic.received[-1].headers).items() >= expected.items()
    # An OpenAI upstream in relay mode gets an x-api-key client's key as a Bearer token.
    r = await proxy.post(CHAT, json=chat("gpt-4.1", "hi"), headers=client)
    assert r.status == 200
    assert fake.received[-1].headers["Authorization"] == "Bearer sk-users-own"
    assert "x-api-key" not in lower(fake.received[-1].headers)


async def test_anthropic_headers_and_query_strings_go_upstream(make_both, fake_anthropic):
    proxy = await make_both(ocr={"fallback_on_rejection": False})  # see test_fallback.py
    headers = {**VERSION, "anthropic-beta": "interleaved-thinking-2025-05-14,tools-2024-04-04"}
    for target, model in (
        (MESSAGES + "?beta=true", "deepseek-v4-pro"),
        (MESSAGES + "?beta=true&x=1", "deepseek-v4-pro-ocr"),
        (COUNT + "?beta=true", "deepseek-v4-pro"),
        (COUNT + "?beta=true", "deepseek-v4-pro-ocr"),
    ):
        r = await proxy.post(target, json=message(model, "hi", picture("q")), headers=headers)
        if model.endswith("-ocr"):
            assert r.status == 200, await r.text()
        else:  # forwarded as sent: the image reached the text-only upstream
            assert r.status == 400
    assert [x.path for x in fake_anthropic.received] == [
        "/v1/messages?beta=true",
        "/v1/messages?beta=true&x=1",
        "/v1/messages/count_tokens?beta=true",
        "/v1/messages/count_tokens?beta=true",
    ]
    for received in fake_anthropic.received:
        got = lower(received.headers)
        assert got["anthropic-version"] == "2023-06-01"
        assert got["anthropic-beta"] == headers["anthropic-beta"]


async def test_each_route_goes_only_to_upstreams_of_its_api(make_both, fake, fake_anthropic):
    openai = {
        "name": "fake",
        "base_url": fake.url,
        "api_key": "k",
        "models": ["gpt-*", "deepseek-*"],
    }
    proxy = await make_both(upstreams=[anthropic_upstream(fake_anthropic), openai])
    # deepseek-* matches both; each route takes the upstream of its own API.
    r = await proxy.post(MESSAGES, json=message("deepseek-v4-pro", "m"))
    assert r.status == 200 and (await r.json())["type"] == "message"
    r = await proxy.post(CHAT, json=chat("deepseek-v4-pro", "c"))
    assert r.status == 200 and (await r.json())["object"] == "chat.completion"
    assert len(fake_anthropic.received) == 1 and len(fake.received) == 1
    assert fake.received[0].path == CHAT and fake_anthropic.received[0].path == MESSAGES
    # A model only the other API serves is not translated: a 404 in the route's shape.
    r = await proxy.post(MESSAGES, json=message("gpt-4.1", "m"))
    assert r.status == 404
    error = await r.json()
    assert error["type"] == "error" and error["error"]["type"] == "not_found_error"
    assert "gpt-4.1" in error["error"]["message"]
    r = await proxy.post(CHAT, json=chat("claude-haiku-4-5", "c"))
    assert r.status == 404
    assert (await r.json())["error"]["code"] == "model_not_found"
    r = await proxy.post(COUNT, json=message("gpt-4.1", "m"))
    assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
    assert len(fake_anthropic.received) == 1 and len(fake.received) == 1


async def test_messages_without_an_anthropic_upstream_say_so(make_proxy, fake):
    proxy = await make_proxy()
    for target in (MESSAGES, COUNT):
        r = await proxy.post(target, json=message("deepseek-v4-pro", "hi"))
        assert r.status == 404
        error = await r.json()
        assert error["error"]["type"] == "not_found_error"
        assert 'api = "anthropic"' in error["error"]["message"]
    assert fake.received == []


def test_anthropic_environment_adds_an_anthropic_upstream():
    env = {
        "OPENAI_BASE_URL": "http://127.0.0.1:1/v1",
        "OPENAI_API_KEY": "sk-openai",
        "ANTHROPIC_BASE_URL": "https://api.deepseek.com/anthropic",
        "ANTHROPIC_API_KEY": "sk-ant",
    }
    cfg = config.from_mapping({}, env=env)
    openai, anthropic = cfg.upstreams
    assert (openai.api, openai.base_url, openai.api_key) == (
        "openai",
        env["OPENAI_BASE_URL"],
        "sk-openai",
    )
    assert anthropic.api == "anthropic" and anthropic.name == "anthropic"
    assert anthropic.base_url == "https://api.deepseek.com/anthropic"
    assert (anthropic.api_key, anthropic.auth) == ("sk-ant", "")

    token = config.from_mapping(
        {}, env={"ANTHROPIC_BASE_URL": "https://x.example/anthropic", "ANTHROPIC_AUTH_TOKEN": "tok"}
    )
    assert token.upstreams[1].api_key == "tok" and token.upstreams[1].auth == "bearer"
    both = config.from_mapping(
        {},
        env={
            "ANTHROPIC_BASE_URL": "https://x.example",
            "ANTHROPIC_API_KEY": "k",
            "ANTHROPIC_AUTH_TOKEN": "t",
        },
    )
    assert (both.upstreams[1].api_key, both.upstreams[1].auth) == ("k", "")

    for env in ({"ANTHROPIC_API_KEY": "sk-ant"}, {"ANTHROPIC_AUTH_TOKEN": "t"}, {}):
        cfg = config.from_mapping({}, env=env)
        assert [up.api for up in cfg.upstreams] == ["openai"]


@pytest.mark.parametrize(
    ("variable", "sent"),
    [
        ("ANTHROPIC_API_KEY", ("x-api-key", "sk-env-anthropic")),
        ("ANTHROPIC_AUTH_TOKEN", ("authorization", "Bearer sk-env-anthropic")),
    ],
)
async def test_a_real_process_configured_by_environment_answers_messages(
    tmp_path, fake, fake_anthropic, variable, sent
):
    env = {
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_KEY": "sk-env-openai",
        "ANTHROPIC_BASE_URL": fake_anthropic.url,
        "ANTHROPIC_API_KEY": "",  # (empty: unset, whatever the test's own environment holds)
        "ANTHROPIC_AUTH_TOKEN": "",
        variable: "sk-env-anthropic",
    }
    async with spawn_proxy(tmp_path, "", env) as (_, base, session, log_path):
        body = message("deepseek-v4-pro-ocr", "what is on it?", picture("env"))
        async with session.post(
            base + MESSAGES + "?beta=true", json=body, headers={**VERSION, "x-api-key": "anything"}
        ) as r:
            answer = await r.json()
            assert r.status == 200, answer
            assert r.headers["X-OCR-Model"] == "gpt-4o-mini"
        async with session.post(
            base + MESSAGES, json=message("deepseek-v4-pro", "plain"), headers=VERSION
        ) as r:
            assert r.status == 200
            assert (await r.json())["content"][0]["text"] == "echo: plain"
    assert answer["type"] == "message"
    assert answer["usage"]["ocr"]["images"] == 1
    assert fake.ocr_calls == ["env"]
    assert fake.received[0].headers["Authorization"] == "Bearer sk-env-openai"
    [first, second] = [r for r in fake_anthropic.received if r.method == "POST"]  # not its list
    assert first.path == "/v1/messages?beta=true"
    for received in (first, second):
        headers = lower(received.headers)
        assert headers[sent[0]] == sent[1]
        assert {"authorization", "x-api-key"} & headers.keys() == {sent[0]}
    assert "A picture showing env." in first.body.decode()
    assert first.json()["model"] == "deepseek-v4-pro"
    assert second.json()["messages"][0]["content"] == "plain"
    assert "sk-env" not in log_path.read_text()


def auth_routes() -> list[tuple[str, str, Any, dict[str, str]]]:
    """(method, path, JSON body, extra headers) of one request to each kind of route."""
    return [
        ("POST", CHAT, chat("gpt-4.1", "hi"), {}),
        ("POST", MESSAGES, message("deepseek-v4-pro", "hi"), VERSION),
        ("POST", COUNT, message("deepseek-v4-pro", "hi"), VERSION),
        ("GET", "/v1/models", None, {}),
        ("GET", "/v1/models", None, VERSION),
        ("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}, {}),
    ]


async def test_a_client_key_is_accepted_in_either_header_on_every_route(
    make_both, fake, fake_anthropic
):
    proxy = await make_both(auth={"keys": ["client-key-1", "client-key-2"]})
    for method, target, body, extra in auth_routes():
        for key in ({"x-api-key": "client-key-2"}, {"Authorization": "Bearer client-key-1"}):
            r = await proxy.request(method, target, json=body, headers={**extra, **key})
            assert r.status == 200, (target, key, await r.text())
    assert len(fake.received) + len(fake_anthropic.received) == 2 * len(auth_routes())
    for received in fake.received + fake_anthropic.received:
        assert "client-key" not in str(received.headers)


async def test_a_wrong_key_in_either_header_is_a_401_in_the_routes_shape(
    make_both, fake, fake_anthropic
):
    proxy = await make_both(auth={"keys": ["client-key-1"]})
    for method, target, body, extra in auth_routes():
        for key in (
            {"x-api-key": "wrong"},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer "},
            {},
        ):
            r = await proxy.request(method, target, json=body, headers={**extra, **key})
            assert r.status == 401, (target, key)
            error = await r.json()
            # An Anthropic client of the shared model routes is known by anthropic-version.
            if target.startswith(MESSAGES) or "anthropic-version" in extra:
                assert error["type"] == "error" and set(error) == {"type", "error"}
                assert error["error"]["type"] == "authentication_error"
            else:
                assert error["error"]["code"] == "invalid_api_key"
            assert "client-key" not in str(error)
    assert fake.received == [] and fake_anthropic.received == []


async def test_a_non_ascii_key_is_a_400(make_both, fake, fake_anthropic):
    proxy = await make_both(auth={"keys": ["client-key-1"]})
    for target, body in (
        (MESSAGES, message("deepseek-v4-pro", "hi")),
        (CHAT, chat("gpt-4.1", "hi")),
    ):
        r = await proxy.post(target, json=body, headers={"x-api-key": "clé-1"})
        assert r.status == 400
        error = await r.json()
        assert "x-api-key" in error["error"]["message"]
        if target == MESSAGES:
            assert error["error"]["type"] == "invalid_request_error"
    assert fake.received == [] and fake_anthropic.received == []


async def test_count_tokens_uses_the_cached_description_and_never_calls_the_ocr_model(
    make_both, fake, fake_anthropic
):
    proxy = await make_both(ocr={"text_only_models": ["deepseek-*"]})
    r = await proxy.post(MESSAGES, json=message("deepseek-v4-pro", "first", picture("seen")))
    assert r.status == 200
    assert fake.ocr_calls == ["seen"]

    body = message("deepseek-v4-pro", "count me", picture("seen"), picture("unseen"))
    r = await proxy.post(COUNT + "?beta=true", json=body, headers=VERSION)
    assert r.status == 200, await r.text()  # the fake refuses images: none went upstream
    assert fake.ocr_calls == ["seen"]  # nothing new described, cached or not
    sent = fake_anthropic.received[-1]
    assert sent.path == "/v1/messages/count_tokens?beta=true"
    assert await r.json() == {"input_tokens": fake_count(sent.json())}
    [first, second] = [b["text"] for b in sent.json()["messages"][0]["content"][1:]]
    assert "A picture showing seen." in first
    assert "A picture showing" not in second
    assert "(not described yet) " * 50 in second  # a placeholder of typical size
    assert len(second) > 900
    assert sent.json()["model"] == "deepseek-v4-pro"


async def test_count_tokens_with_the_suffix_strips_it_and_ocr_model(
    make_both, fake, fake_anthropic
):
    proxy = await make_both()
    body = message("deepseek-v4-pro-ocr", "n", picture("p"), ocr_model="gpt-4o-mini")
    r = await proxy.post(COUNT, json=body, headers={"X-OCR-Model": "vision-2"})
    assert r.status == 200, await r.text()
    sent = fake_anthropic.received[-1]
    assert sent.json()["model"] == "deepseek-v4-pro" and "ocr_model" not in sent.json()
    assert "x-ocr-model" not in lower(sent.headers)
    assert fake.received == []  # no OCR call at all


async def test_count_tokens_without_ocr_is_forwarded_byte_for_byte(make_both, fake_anthropic):
    proxy = await make_both()
    body = b'{ "model":"deepseek-v4-pro",\n "messages" : [{"role":"user","content":"hi"}], "system":"s" }'
    r = await proxy.post(COUNT, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200
    assert fake_anthropic.received[-1].body == body
    assert await r.json() == {"input_tokens": fake_count(orjson.loads(body))}


async def test_fifty_concurrent_counts_all_succeed_without_an_ocr_call(
    make_both, fake, fake_anthropic
):
    proxy = await make_both(ocr={"text_only_models": ["deepseek-*"]})

    async def count(i: int) -> tuple[int, Any]:
        body = message("deepseek-v4-pro", f"turn {i}", picture(f"shot-{i % 7}"))
        r = await proxy.post(COUNT + "?beta=true", json=body, headers=VERSION)
        return r.status, await r.json()

    results = await asyncio.gather(*(count(i) for i in range(50)))
    assert [status for status, _ in results] == [200] * 50
    assert all(answer["input_tokens"] > 250 for _, answer in results)
    assert fake.ocr_calls == [] and fake_anthropic.ocr_calls == []
    assert len(fake_anthropic.received) == 50


async def test_count_tokens_never_fetches_a_remote_image(
    make_both, fake, fake_anthropic, aiohttp_server
):
    fetched: list[str] = []

    async def serve_png(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(body=png("remote"), content_type="image/png")

    app = web.Application()
    app.router.add_get("/shot.png", serve_png)
    server = await aiohttp_server(app)
    url = str(server.make_url("/shot.png"))
    proxy = await make_both(
        ocr={"allow_private_hosts": ["127.0.0.1/32"], "allowed_ports": [server.port]}
    )
    body = message("deepseek-v4-pro-ocr", "n", image_block(url=url))
    r = await proxy.post(COUNT, json=body)
    assert r.status == 200, await r.text()
    assert fetched == [] and fake.ocr_calls == []
    assert "(not described yet)" in fake_anthropic.received[-1].body.decode()

    r = await proxy.post(MESSAGES, json=body)  # the real request fetches and describes it
    assert r.status == 200, await r.text()
    assert fetched == ["/shot.png"] and fake.ocr_calls == ["remote"]
    assert "A picture showing remote." in fake_anthropic.received[-1].body.decode()

    r = await proxy.post(COUNT, json=body)
    assert r.status == 200
    assert fetched == ["/shot.png"] and fake.ocr_calls == ["remote"]
    # A remote image is known by its bytes, which only a fetch would give: still a placeholder.
    assert "(not described yet)" in fake_anthropic.received[-1].body.decode()


async def test_an_anthropic_client_gets_anthropics_page_from_anthropic_upstreams_only(
    make_both, fake, fake_anthropic, aiohttp_server
):
    other = FakeAnthropic(models_list=["glm-4.6", "deepseek-v4-pro"])
    server = await aiohttp_server(other.app())
    other.url = str(server.make_url("")).rstrip("/")
    openai = {"name": "fake", "base_url": fake.url, "api_key": "sk-upstream-secret"}
    second = {**anthropic_upstream(other), "name": "glm", "models": ["glm-*"]}
    proxy = await make_both(upstreams=[anthropic_upstream(fake_anthropic), openai, second])

    r = await proxy.get("/v1/models", headers=VERSION)
    assert r.status == 200
    page = await r.json()
    ids = [entry["id"] for entry in page["data"]]
    assert ids == [  # each twin right after its base model
        "deepseek-v4-pro",
        "deepseek-v4-pro-ocr",
        "claude-haiku-4-5",
        "claude-haiku-4-5-ocr",
        "glm-4.6",
        "glm-4.6-ocr",
    ]
    for entry in page["data"]:
        assert set(entry) == {"type", "id", "display_name", "created_at"}
        assert entry["type"] == "model"
    twin = page["data"][1]
    assert twin["display_name"] == "Deepseek V4 Pro (OCR)"
    assert twin["created_at"] == "2026-01-01T00:00:00Z"
    assert page["has_more"] is False
    assert (page["first_id"], page["last_id"]) == ("deepseek-v4-pro", "glm-4.6-ocr")
    assert "object" not in page
    assert fake.received == []  # the OpenAI upstream was not asked
    for asked in (fake_anthropic, other):
        [request] = asked.received
        assert request.path == "/v1/models?limit=1000"  # its largest page: the whole list
        assert lower(request.headers)["anthropic-version"] == "2023-06-01"

    r = await proxy.get("/v1/models")
    assert r.status == 200
    listing = await r.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [
        "gpt-3.5-turbo",
        "gpt-3.5-turbo-ocr",
        "deepseek-chat",
        "deepseek-chat-ocr",
    ]
    assert all(m["object"] == "model" for m in listing["data"])
    assert len(fake_anthropic.received) == 1 and len(other.received) == 1  # not asked again
    assert [x.path for x in fake.received] == ["/v1/models"]


async def test_an_anthropic_model_list_longer_than_a_default_page_is_listed_whole(
    make_both, fake, fake_anthropic, aiohttp_server
):
    # Anthropic's GET /v1/models answers 20 models unless asked for more (`limit`, at most 1000).
    ids = [f"claude-model-{i:02d}" for i in range(25)]
    asked: list[str] = []

    async def models(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        limit = min(int(request.query.get("limit", "20")), 1000)
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2026-01-01T00:00:00Z"}
            for m in ids[:limit]
        ]
        page = {"data": data, "has_more": limit < len(ids)}
        return web.json_response({**page, "first_id": ids[0], "last_id": data[-1]["id"]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    server = await aiohttp_server(app)
    listing = {**anthropic_upstream(fake_anthropic), "base_url": str(server.make_url(""))}
    proxy = await make_both(upstreams=[listing])
    r = await proxy.get("/v1/models", headers=VERSION)
    assert r.status == 200
    page = await r.json()
    assert [m["id"] for m in page["data"]] == [i for m in ids for i in (m, m + "-ocr")]
    assert page["has_more"] is False
    assert len(asked) == 1


async def test_an_anthropic_client_gets_anthropic_shaped_model_errors_and_lookups(
    make_proxy: Any, make_both: Any, fake_anthropic: Any
) -> None:
    """The model routes are shared by both APIs: a client sending ``anthropic-version`` gets
    Anthropic's error shape there, and a single-model lookup goes to an Anthropic upstream."""
    proxy = await make_proxy()  # no Anthropic upstream
    r = await proxy.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert r.status == 404
    body = await r.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "Anthropic Messages API" in body["error"]["message"]
    r = await proxy.get("/v1/models")  # an OpenAI client: OpenAI's shape, from OpenAI upstreams
    assert r.status == 200 and (await r.json())["object"] == "list"
    both = await make_both()
    r = await both.get("/v1/models/deepseek-v4-pro", headers={"anthropic-version": "2023-06-01"})
    assert (
        fake_anthropic.received and fake_anthropic.received[-1].path == "/v1/models/deepseek-v4-pro"
    )


async def test_relay_mode_sends_a_clients_key_only_to_the_upstream_its_request_is_for(
    make_both, fake, fake_anthropic
):
    """Two upstreams without keys (pure relay): a Claude Code user's key for the Anthropic
    upstream must never go to the OpenAI upstream that serves the OCR model, and the other way
    round; the OCR model of the request's own upstream still gets it."""
    ups = [
        {**anthropic_upstream(fake_anthropic), "api_key": ""},
        {"name": "fake", "base_url": fake.url},
    ]
    proxy = await make_both(upstreams=ups)
    vendor_key = {"x-api-key": "sk-deepseek-CLIENT-KEY"}
    body = message("deepseek-v4-pro-ocr", "hi", picture("v"))  # OCR model vision-1: OpenAI's
    r = await proxy.post(MESSAGES, json=body, headers=vendor_key)
    assert r.status == 200, await r.text()
    chat_body = chat("gpt-4.1-ocr", image_part(data_url("c")), ocr_model="claude-haiku-4-5")
    r = await proxy.post(CHAT, json=chat_body, headers={"Authorization": "Bearer sk-openai-KEY"})
    assert r.status == 200, await r.text()
    assert fake.ocr_calls == ["v"] and fake_anthropic.ocr_calls == ["c"]
    ocr_at_openai = [q for q in fake.received if q.json().get("model") == "vision-1"]
    ocr_at_anthropic = [q for q in fake_anthropic.received if "claude" in q.json()["model"]]
    for received in ocr_at_openai + ocr_at_anthropic:  # each OCR call: no credentials at all
        assert {"authorization", "x-api-key"} & lower(received.headers).keys() == set()
    fake_anthropic.received.clear()
    # The OCR model behind the request's own upstream: the client's key goes there, once.
    body = message("deepseek-v4-pro-ocr", "hi", picture("w"), ocr_model="claude-haiku-4-5")
    r = await proxy.post(MESSAGES, json=body, headers=vendor_key)
    assert r.status == 200, await r.text()
    assert fake_anthropic.ocr_calls == ["c", "w"]
    for received in fake_anthropic.received:
        assert lower(received.headers)["x-api-key"] == "sk-deepseek-CLIENT-KEY"


async def test_a_proxy_key_in_x_api_key_counts_beside_another_bearer_token(make_both):
    """The anthropic SDK sends both headers when given an api_key and an auth token."""
    proxy = await make_both(auth={"keys": ["proxy-key"]})
    both = {"x-api-key": "proxy-key", "Authorization": "Bearer sk-something-else"}
    r = await proxy.post(MESSAGES, json=message("deepseek-v4-pro", "hi"), headers=both)
    assert r.status == 200, await r.text()
    swapped = {"x-api-key": "sk-something-else", "Authorization": "Bearer proxy-key"}
    r = await proxy.post(MESSAGES, json=message("deepseek-v4-pro", "hi"), headers=swapped)
    assert r.status == 200
    neither = {"x-api-key": "nope", "Authorization": "Bearer nope"}
    r = await proxy.post(MESSAGES, json=message("deepseek-v4-pro", "hi"), headers=neither)
    assert r.status == 401

"""When OCR runs, the same rules on both dialects' routes: the suffix, a body ``ocr_model``, the
``X-OCR-Model`` header and ``[ocr] text_only_models``; otherwise the body goes byte for byte.

Every test runs on ``/v1/chat/completions`` (to the fake OpenAI upstream) and on
``/v1/messages`` (to the fake Anthropic upstream, which refuses any image block as DeepSeek
does), through a proxy that has both upstreams (``make_both``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fake_anthropic import b64, image_block
from tests.fakes import data_url, image_part, is_ocr_model, png

ROUTES = ["chat", "messages"]


def request(route: str, model: str, label: str = "cat", **extra: Any) -> dict[str, Any]:
    """A one-message request of the route's dialect: a text, then the image ``label``."""
    if route == "chat":
        content: list[Any] = [{"type": "text", "text": "look"}, image_part(data_url(label))]
        return {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    content = [{"type": "text", "text": "look"}, image_block(b64(png(label)))]
    return {
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def path(route: str) -> str:
    return "/v1/chat/completions" if route == "chat" else "/v1/messages"


def upstream_requests(route: str, fake: Any, fake_anthropic: Any) -> list[Any]:
    """What the route's text model received (OCR calls left out)."""
    return fake.chat_requests if route == "chat" else fake_anthropic.message_requests


def text_sent(route: str, body: dict[str, Any]) -> str:
    """The user message's text as the upstream got it; asserts no image is left."""
    content = body["messages"][0]["content"]
    if isinstance(content, str):
        return content
    kinds = {part["type"] for part in content}
    assert kinds == {"text"}, kinds
    return "\n".join(part["text"] for part in content)


def ocr_models_called(fake: Any, fake_anthropic: Any) -> list[str]:
    """The model of every OCR call either fake received, in order per fake."""
    openai = [
        r.json()["model"]
        for r in fake.received
        if r.path == "/v1/chat/completions" and is_ocr_model(r.json()["model"])
    ]
    anthropic = [
        r.json()["model"]
        for r in fake_anthropic.received
        if r.path == "/v1/messages" and r.json()["model"].startswith("claude-haiku")
    ]
    return openai + anthropic


def lower_keys(headers: dict[str, str]) -> set[str]:
    return {name.lower() for name in headers}


@pytest.mark.parametrize("route", ROUTES)
async def test_suffix_is_stripped_and_images_described(make_both, fake, fake_anthropic, route):
    r = await (await make_both()).post(path(route), json=request(route, "deepseek-v4-pro-ocr"))
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Model"] == "vision-1"
    assert r.headers["X-OCR-Images"] == "1"
    [sent] = upstream_requests(route, fake, fake_anthropic)
    body = sent.json()
    assert body["model"] == "deepseek-v4-pro"
    assert "A picture showing cat." in text_sent(route, body)
    assert fake.ocr_calls == ["cat"] and fake_anthropic.ocr_calls == []


@pytest.mark.parametrize("route", ROUTES)
async def test_body_ocr_model_runs_ocr_and_is_stripped(make_both, fake, fake_anthropic, route):
    req = request(route, "deepseek-v4-pro", ocr_model="gpt-4o-mini")
    r = await (await make_both()).post(path(route), json=req)
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Model"] == "gpt-4o-mini"
    [sent] = upstream_requests(route, fake, fake_anthropic)
    body = sent.json()
    assert "ocr_model" not in body  # Anthropic rejects unknown fields
    assert body["model"] == "deepseek-v4-pro"
    assert "A picture showing cat." in text_sent(route, body)
    assert ocr_models_called(fake, fake_anthropic) == ["gpt-4o-mini"]


@pytest.mark.parametrize("route", ROUTES)
async def test_x_ocr_model_header_runs_ocr_with_that_model_and_is_not_forwarded(
    make_both, fake, fake_anthropic, route
):
    proxy = await make_both()
    r = await proxy.post(
        path(route),
        json=request(route, "deepseek-v4-pro"),
        headers={"X-OCR-Model": "gpt-4o-mini"},
    )
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Model"] == "gpt-4o-mini"
    [sent] = upstream_requests(route, fake, fake_anthropic)
    assert "x-ocr-model" not in lower_keys(sent.headers)
    assert sent.json()["model"] == "deepseek-v4-pro"
    assert "A picture showing cat." in text_sent(route, sent.json())
    assert ocr_models_called(fake, fake_anthropic) == ["gpt-4o-mini"]
    for call in fake.received:  # nor is it sent with the OCR call
        assert "x-ocr-model" not in lower_keys(call.headers)


@pytest.mark.parametrize("route", ROUTES)
async def test_x_ocr_model_header_without_images_is_not_forwarded(
    make_both, fake, fake_anthropic, route
):
    req = request(route, "deepseek-v4-pro")
    req["messages"][0]["content"] = "no picture here"
    r = await (await make_both()).post(path(route), json=req, headers={"X-OCR-Model": "vision-2"})
    assert r.status == 200, await r.text()
    [sent] = upstream_requests(route, fake, fake_anthropic)
    assert "x-ocr-model" not in lower_keys(sent.headers)
    assert sent.json()["messages"][0]["content"] == "no picture here"
    assert fake.ocr_calls == []


@pytest.mark.parametrize("route", ROUTES)
async def test_text_only_models_describe_images_without_a_suffix(
    make_both, fake, fake_anthropic, route
):
    proxy = await make_both(ocr={"text_only_models": ["deepseek-*"]})
    r = await proxy.post(path(route), json=request(route, "deepseek-v4-pro"))
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Model"] == "vision-1"
    [sent] = upstream_requests(route, fake, fake_anthropic)
    assert sent.json()["model"] == "deepseek-v4-pro"  # nothing stripped from a plain name
    assert "A picture showing cat." in text_sent(route, sent.json())
    assert fake.ocr_calls == ["cat"]


@pytest.mark.parametrize("route", ROUTES)
async def test_a_model_outside_text_only_models_is_forwarded_byte_for_byte(
    make_both, fake, fake_anthropic, route
):
    # (with the fallback off: tests/test_fallback.py is about what it does with the refusal)
    proxy = await make_both(
        ocr={"text_only_models": ["deepseek-*"], "fallback_on_rejection": False}
    )
    model = "gpt-4.1" if route == "chat" else "claude-sonnet-4-5"
    # Odd spacing and key order, a float written as the client wrote it: none of it touched.
    body = json.dumps(request(route, model, temperature=0.50), indent=3).encode()
    body = body.replace(b'"temperature": 0.5', b'"temperature": 0.50')
    assert b"0.50" in body
    r = await proxy.post(path(route), data=body, headers={"Content-Type": "application/json"})
    [sent] = upstream_requests(route, fake, fake_anthropic)
    assert sent.body == body
    assert fake.ocr_calls == [] and "X-OCR-Model" not in r.headers
    if route == "chat":
        assert r.status == 200
    else:  # the image went on as it was, and the text-only upstream refused it
        assert r.status == 400
        assert "unknown variant `image`" in (await r.json())["error"]["message"]


@pytest.mark.parametrize("route", ROUTES)
async def test_body_ocr_model_beats_the_header(make_both, fake, fake_anthropic, route):
    proxy = await make_both()
    r = await proxy.post(
        path(route),
        json=request(route, "deepseek-v4-pro", ocr_model="gpt-4o-mini"),
        headers={"X-OCR-Model": "claude-haiku-4-5"},  # would go to the Anthropic upstream
    )
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Model"] == "gpt-4o-mini"
    assert ocr_models_called(fake, fake_anthropic) == ["gpt-4o-mini"]
    assert fake_anthropic.ocr_calls == [] and fake.ocr_calls == ["cat"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("value", ["", "   ", "x" * 300, "a\tb"])
async def test_an_empty_or_ill_formed_header_is_a_400_in_the_routes_shape(
    make_both, fake, fake_anthropic, route, value
):
    proxy = await make_both()
    r = await proxy.post(
        path(route), json=request(route, "deepseek-v4-pro"), headers={"X-OCR-Model": value}
    )
    assert r.status == 400
    error = await r.json()
    if route == "chat":
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["param"] == "X-OCR-Model"
        assert "X-OCR-Model" in error["error"]["message"]
    else:
        assert error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
        assert "X-OCR-Model" in error["error"]["message"]
        assert set(error) == {"type", "error"}
    assert fake.received == [] and fake_anthropic.received == []

"""A request without ``-ocr`` whose upstream turns its images away is described and sent again.

Against a fake text-only upstream that refuses images in each vendor's words
(``tests/fake_rejecting.py``) and the fake OpenAI upstream as the OCR model (``vision-1``).
"""

from __future__ import annotations

import logging
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ocrproxy import catalog, config, fallback, logs, notes
from ocrproxy.app import create_app
from tests.conftest import ProxyFactory, chat, make_config
from tests.fake_anthropic import b64, image_block
from tests.fake_rejecting import DEEPSEEK, GLM, FakeRejecting
from tests.fakes import FakeOpenAI, data_url, image_part, png
from tests.test_metrics import scrape

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
RESPONSES = "/v1/responses"
HINT = " (ocrproxy: this model cannot read images; use `{model}-ocr` to have them described first)"
MODELS = ["deepseek-*", "or-*", "glm-*", "generic-*", "picky-*", "plain-*", "always-*"]


@pytest.fixture
async def rej(aiohttp_server: Any) -> FakeRejecting:
    state = FakeRejecting()
    server: TestServer = await aiohttp_server(state.app())
    state.url = str(server.make_url("")).rstrip("/")
    return state


@pytest.fixture
def make_proxy(aiohttp_client: Any, fake: FakeOpenAI, rej: FakeRejecting) -> ProxyFactory:
    """The rejecting upstream for both APIs (the same server), then the fake OpenAI one."""

    async def factory(
        fake_models: tuple[str, ...] = ("*",), check: bool = False, **sections: dict[str, Any]
    ) -> TestClient[Any, Any]:
        upstreams = [
            {"name": "rej", "base_url": rej.url + "/v1", "api_key": "sk-rej", "models": MODELS}
            | {"check_models": check},
            {"name": "rej-ant", "base_url": rej.url, "api_key": "sk-ant", "api": "anthropic"}
            | {"models": MODELS},
            {"name": "fake", "base_url": fake.url, "api_key": "sk-ocr-secret"}
            | {"models": list(fake_models)},
        ]
        cfg = make_config(fake, upstreams=upstreams, **sections)  # type: ignore[arg-type]
        client: TestClient[Any, Any] = await aiohttp_client(create_app(cfg))
        return client

    return factory


def with_image(model: str, label: str, **extra: Any) -> dict[str, Any]:
    return chat(model, "what is this?", image_part(data_url(label)), **extra)


def message(model: str, label: str, **extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": "what is this?"}, image_block(b64(png(label)))]
    return {
        "model": model,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": content}],
    } | extra


def responses_body(model: str, label: str) -> dict[str, Any]:
    content = [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": data_url(label)},
    ]
    return {"model": model, "input": [{"role": "user", "content": content}]}


# The table


@pytest.mark.parametrize(
    "status, body",
    [
        (400, orjson.dumps({"error": {"message": DEEPSEEK.format(kind="image_url")}})),
        (400, orjson.dumps({"type": "error", "error": {"message": DEEPSEEK.format(kind="image")}})),
        (400, DEEPSEEK.format(kind="input_image").encode()),
        (404, b'{"error":{"message":"No endpoints found that support image input","code":404}}'),
        (400, orjson.dumps(GLM)),
        (400, b'{"error": {"code": 1210, "message": "bad"}}'),
        (400, b'{"error":{"message":"image input is not supported - hint: provide the mmproj"}}'),
        (400, b'{"error":{"message":"Images are not supported by this model"}}'),
        (422, b'{"detail":"Model does not support images. Please use a model that does."}'),
        (400, b'{"error":{"message":"This model doesn\'t support vision"}}'),
        (400, b'{"error":{"message":"vision is not supported for this model"}}'),
        (415, b'{"error":{"message":"model does not support image input"}}'),
        (
            400,
            b'{"error":{"message":"Invalid content type. image_url is only supported by certain models."}}',
        ),
        (400, b'{"error":{"message":"At most 0 image(s) may be provided in one request."}}'),
        (400, b'{"object":"error","message":"gpt2 is not a multimodal model"}'),
    ],
)
def test_each_vendor_wording_is_a_rejection(status: int, body: bytes) -> None:
    assert fallback.rejects_images(status, body)


@pytest.mark.parametrize(
    "status, body",
    [
        (400, b'{"error":{"message":"Invalid image: could not be decoded"}}'),
        (400, b'{"error":{"message":"image too large: 25 MB, at most 20 MB"}}'),
        (400, b'{"error":{"message":"Image format not supported: image/bmp"}}'),
        (400, b'{"error":{"message":"This endpoint does not support image/bmp"}}'),
        (400, b'{"error":{"message":"The model does not support image format tiff"}}'),
        (400, b'{"error":{"message":"Unsupported image type"}}'),
        (400, b'{"error":{"code":"1211","message":"prompt of 1210 tokens is too long"}}'),
        (400, b'{"error":{"code":"12100","message":"x"}}'),
        (400, b'{"error":{"message":"unknown variant `tool`, expected `text`"}}'),
        (500, b'{"error":{"message":"unknown variant `image_url`"}}'),  # not a refusal status
        (429, b'{"error":{"message":"does not support image input"}}'),
        (400, b'{"m":"unknown variant `image_url`","pad":"' + b"x" * fallback.MAX_BODY + b'"}'),
        # The client's own text echoed back in quotes is not the vendor's word.
        (
            400,
            b'{"error":{"message":"Invalid value: \'does not support images\'. Supported values'
            b" are: 'low', 'high', and 'auto'.\",\"code\":\"invalid_value\"}}",
        ),
        (400, b'{"error":{"message":"bad field \\"images are not supported\\" in tool"}}'),
        (400, b'{"error":{"type":"x","param":"unknown variant `image_url`"}}'),  # not the message
    ],
)
def test_complaints_about_one_image_are_not_rejections(status: int, body: bytes) -> None:
    assert not fallback.rejects_images(status, body)


def test_the_hint_edits_only_the_error_message() -> None:
    openai_shape = b'{"error": {"message": "no", "type": "invalid_request_error", "code": null}}'
    edited = notes.with_message_note(openai_shape, " (hint)")
    assert edited is not None
    assert orjson.loads(edited) == {
        "error": {"message": "no (hint)", "type": "invalid_request_error", "code": None}
    }
    anthropic_shape = b'{"type":"error","error":{"type":"invalid_request_error","message":"no"}}'
    edited = notes.with_message_note(anthropic_shape, " (hint)")
    assert (
        edited == b'{"type":"error","error":{"type":"invalid_request_error","message":"no (hint)"}}'
    )
    for other in (b"images are not supported", b'{"error": "no"}', b"[1]", b'{"detail": "x"}'):
        assert notes.with_message_note(other, " (hint)") is None


def test_the_learned_store_expires_and_is_bounded() -> None:
    now = [100.0]
    store = fallback.Learned(10.0, cap=2, clock=lambda: now[0])
    assert not store.knows("up", "m")
    store.learn("up", "m")
    assert store.knows("up", "m") and not store.knows("other", "m")
    now[0] = 109.9
    assert store.knows("up", "m")
    now[0] = 110.0
    assert not store.knows("up", "m") and len(store) == 0  # expired entries are dropped
    for model in ("a", "b", "c"):
        store.learn("up", model)
    assert len(store) == 2 and not store.knows("up", "a")  # the oldest went first
    never = fallback.Learned(0.0)
    never.learn("up", "m")
    assert not never.knows("up", "m")


# Chat Completions, each vendor


@pytest.mark.parametrize("model", ["deepseek-chat", "or-llama", "glm-4.5", "generic-7b"])
async def test_a_rejected_chat_request_is_described_and_sent_again(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting, model: str
) -> None:
    proxy = await make_proxy()
    r = await proxy.post(CHAT, json=with_image(model, "cat"))
    answer = await r.json()
    assert r.status == 200, answer
    assert r.headers["X-OCR-Fallback"] == "rejected-images"
    assert r.headers["X-OCR-Model"] == "vision-1" and r.headers["X-OCR-Images"] == "1"
    assert answer["usage"]["ocr"]["images"] == 1 and answer["usage"]["ocr"]["model"] == "vision-1"
    assert fake.ocr_calls == ["cat"]
    assert rej.images_seen() == ["image_url", None]  # the second call carried no image
    second = rej.received[1]
    assert "A picture showing cat." in second.body.decode()
    assert second.json()["model"] == model
    assert second.headers["Authorization"] == "Bearer sk-rej"  # as `_send` sends it
    assert "unknown variant" not in answer["choices"][0]["message"]["content"]
    assert b"unknown variant" not in await r.read() and b"1210" not in await r.read()


async def test_the_live_page_shows_the_refusal_before_the_ocr(make_proxy: ProxyFactory) -> None:
    admin = "ui-admin-key-0123456789"
    proxy = await make_proxy(ui={"enabled": True, "admin_key": admin})
    r = await proxy.post(
        CHAT, json=with_image("deepseek-chat", "cat"), headers={"X-Request-Id": "fb"}
    )
    assert r.status == 200 and r.headers["X-OCR-Fallback"] == "rejected-images"
    page = await proxy.get("/ui/requests/fb", headers={"Authorization": f"Bearer {admin}"})
    found = await page.json()
    steps = found["steps"]
    assert [s["kind"] for s in steps] == [
        "refused",
        "scan",
        "cache",
        "ocr_attempt",
        "ocr",
        "image",
        "upstream",
        "end",
    ]
    assert (steps[0]["upstream"], steps[0]["status"]) == ("rej", 400)
    assert (steps[-2]["upstream"], steps[-2]["status"]) == ("rej", 200)  # the resend's answer
    assert [s["at_ms"] for s in steps] == sorted(s["at_ms"] for s in steps)
    assert found["row"]["fallback"] == "rejected-images"


async def test_the_model_is_learned_then_forgotten(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    proxy = await make_proxy(ocr={"learned_ttl_s": 60.0})
    now = [1000.0]
    proxy.server.app[fallback.STORE].clock = lambda: now[0]
    r = await proxy.post(CHAT, json=with_image("deepseek-chat", "one"))
    assert r.status == 200 and r.headers["X-OCR-Fallback"] == "rejected-images"
    rej.received.clear()

    r = await proxy.post(CHAT, json=with_image("deepseek-chat", "two"))
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Fallback"] == "learned"
    assert (await r.json())["usage"]["ocr"]["images"] == 1
    assert rej.images_seen() == [None]  # one call, already text only
    assert fake.ocr_calls == ["one", "two"]
    # Another model of the same upstream is not learned.
    r = await proxy.post(CHAT, json=with_image("deepseek-reasoner", "three"))
    assert r.headers["X-OCR-Fallback"] == "rejected-images"

    rej.received.clear()
    now[0] += 60.0  # the TTL is over: the image goes upstream again, and is refused again
    r = await proxy.post(CHAT, json=with_image("deepseek-chat", "four"))
    assert r.status == 200 and r.headers["X-OCR-Fallback"] == "rejected-images"
    assert rej.images_seen() == ["image_url", None]


async def test_the_access_log_and_metrics_say_so(
    make_proxy: ProxyFactory,
    rej: FakeRejecting,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logs, "_handler", None)  # access lines as records, for caplog
    proxy = await make_proxy()
    with caplog.at_level(logging.INFO, logger="ocrproxy"):
        assert (await proxy.post(CHAT, json=with_image("deepseek-chat", "a"))).status == 200
        assert (await proxy.post(CHAT, json=with_image("deepseek-chat", "b"))).status == 200
        assert (await proxy.post(CHAT, json=chat("deepseek-chat", "text only"))).status == 200
    lines = [r.fields for r in caplog.records if r.name == "ocrproxy.access"]  # type: ignore[attr-defined]
    # A learned model's request without images is forwarded as ever: no fallback to tell.
    assert [line["fallback"] for line in lines] == ["rejected-images", "learned", None]
    assert lines[0]["upstream_status"] == 200 and lines[0]["images"] == 1
    assert any(r.name == "ocrproxy.fallback" for r in caplog.records)
    m = await scrape(proxy)
    assert m['ocrproxy_fallbacks_total{reason="rejected_images"}'] == 1
    assert m['ocrproxy_fallbacks_total{reason="learned"}'] == 1


async def test_through_the_openai_sdk(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    proxy = await make_proxy()
    sdk = openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key="sk-x", max_retries=0)
    try:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "read this"},
                        {"type": "image_url", "image_url": {"url": data_url("sdk")}},
                    ],
                }
            ],
        )
        completion = raw.parse()
        assert raw.headers["X-OCR-Fallback"] == "rejected-images"
        assert completion.usage is not None
        assert completion.usage.model_extra is not None
        assert completion.usage.model_extra["ocr"]["images"] == 1
        assert completion.choices[0].message.content is not None
        assert completion.choices[0].message.content.startswith("echo: ")

        stream = await sdk.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": [image_part(data_url("sdk2"))]}],  # type: ignore[list-item]
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await sdk.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "A picture showing sdk2." in text
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra is not None
    assert usage.model_extra["ocr"]["images"] == 1
    assert fake.ocr_calls == ["sdk", "sdk2"]
    assert rej.images_seen() == ["image_url", None, None]  # the stream went straight to OCR


async def test_a_streaming_request_falls_back_too(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    proxy = await make_proxy()
    body = with_image("glm-4.5", "streamed", stream=True, stream_options={"include_usage": True})
    r = await proxy.post(CHAT, json=body)
    text = await r.text()
    assert r.status == 200, text
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["X-OCR-Fallback"] == "rejected-images"
    assert "A picture showing streamed." in text and '"ocr":{' in text
    assert text.rstrip().endswith("data: [DONE]") and "1210" not in text
    assert rej.images_seen() == ["image_url", None]


# Messages and Responses


async def test_messages_through_the_anthropic_sdk(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    proxy = await make_proxy()
    sdk = anthropic.AsyncAnthropic(
        base_url=str(proxy.make_url("")).rstrip("/"), api_key="sk-x", max_retries=0
    )
    try:
        raw = await sdk.messages.with_raw_response.create(**message("deepseek-v4-pro", "ant"))
        answer = await raw.parse()
    finally:
        await sdk.close()
    assert raw.headers["X-OCR-Fallback"] == "rejected-images"
    assert answer.usage.model_extra is not None and answer.usage.model_extra["ocr"]["images"] == 1
    assert answer.content[0].type == "text" and "A picture showing ant." in answer.content[0].text
    assert rej.images_seen() == ["image", None]
    assert [r.path for r in rej.received] == [MESSAGES, MESSAGES]
    assert rej.received[1].headers["x-api-key"] == "sk-ant"
    assert fake.ocr_calls == ["ant"]


async def test_a_rejected_count_is_counted_without_the_image(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    """The count route falls back too: as ``-ocr`` counts, with no OCR call."""
    proxy = await make_proxy()
    r = await proxy.post(MESSAGES + "/count_tokens", json=message("deepseek-v4-pro", "c"))
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Fallback"] == "rejected-images"
    assert (await r.json())["input_tokens"] > 0
    assert rej.images_seen() == ["image", None]
    assert fake.ocr_calls == []


async def test_responses_fall_back(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    proxy = await make_proxy()
    r = await proxy.post(RESPONSES, json=responses_body("deepseek-chat", "resp"))
    answer = await r.json()
    assert r.status == 200, answer
    assert r.headers["X-OCR-Fallback"] == "rejected-images"
    assert answer["usage"]["ocr"]["images"] == 1
    assert "A picture showing resp." in answer["output"][0]["content"][0]["text"]
    assert rej.images_seen() == ["input_image", None]


# When there is no fallback


async def test_with_the_fallback_off_the_message_gains_a_hint(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    proxy = await make_proxy(ocr={"fallback_on_rejection": False})
    for _ in range(2):  # nothing is learned either
        r = await proxy.post(CHAT, json=with_image("deepseek-chat", "x"))
        assert r.status == 400 and "X-OCR-Fallback" not in r.headers
        assert int(r.headers["Content-Length"]) == len(await r.read())
        assert await r.json() == {
            "error": {
                "message": DEEPSEEK.format(kind="image_url") + HINT.format(model="deepseek-chat"),
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_request_error",
            }
        }
    r = await proxy.post(MESSAGES, json=message("deepseek-v4-pro", "y"))
    assert r.status == 400
    assert await r.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": DEEPSEEK.format(kind="image") + HINT.format(model="deepseek-v4-pro"),
        },
    }
    r = await proxy.post(CHAT, json=with_image("plain-7b", "z"))  # not JSON: as it came
    assert r.status == 400 and await r.text() == "images are not supported by this model"
    assert rej.images_seen() == ["image_url", "image_url", "image", "image_url"]
    assert fake.ocr_calls == []


async def test_without_images_or_with_another_complaint_the_error_is_relayed_as_it_came(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    proxy = await make_proxy()
    # GLM's 1210 is its answer to any bad parameter: without an image it is about something else.
    r = await proxy.post(CHAT, json=chat("glm-4.5", "hi", bad=True))
    assert r.status == 400 and await r.read() == orjson.dumps(GLM)
    # A complaint about the image itself is not a rejection of images.
    r = await proxy.post(CHAT, json=with_image("picky-vl", "broken"))
    assert r.status == 400
    assert await r.read() == b'{"error":{"message":"Invalid image: could not be decoded"}}'
    assert "X-OCR-Fallback" not in r.headers
    assert len(rej.received) == 2 and fake.ocr_calls == []
    assert not proxy.server.app[fallback.STORE].knows("rej", "glm-4.5")


async def test_a_second_refusal_is_relayed_and_never_retried(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    proxy = await make_proxy()
    r = await proxy.post(CHAT, json=with_image("always-no", "loop"))
    assert r.status == 400
    assert r.headers["X-OCR-Fallback"] == "rejected-images"
    assert (await r.json())["error"]["message"] == DEEPSEEK.format(kind="image_url")  # no hint
    assert rej.images_seen() == ["image_url", None]  # exactly two calls
    assert fake.ocr_calls == ["loop"]


async def test_without_a_usable_ocr_model_the_rejection_keeps_its_hint(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    """An OCR model no upstream serves: the client sees the upstream's refusal, with the hint,
    not an error about a model it never named."""
    proxy = await make_proxy(fake_models=("vision-*",), ocr={"model": "nowhere-ocr-model"})
    r = await proxy.post(CHAT, json=with_image("deepseek-chat", "x"))
    assert r.status == 400 and "X-OCR-Fallback" not in r.headers
    said = (await r.json())["error"]["message"]
    assert said == DEEPSEEK.format(kind="image_url") + HINT.format(model="deepseek-chat")
    assert len(rej.received) == 1 and fake.ocr_calls == []


async def test_text_requests_pay_nothing(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    """A request the upstream accepts is forwarded byte for byte, as before."""
    proxy = await make_proxy()
    body = b'{"model":"deepseek-chat", "messages":[{"role":"user","content":"hi"}] }'
    r = await proxy.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200 and "X-OCR-Fallback" not in r.headers and "X-OCR-Model" not in r.headers
    assert rej.received[0].body == body


async def test_a_learned_models_text_requests_are_forwarded_as_they_are(
    make_proxy: ProxyFactory, rej: FakeRejecting
) -> None:
    proxy = await make_proxy()
    assert (await proxy.post(CHAT, json=with_image("deepseek-chat", "a"))).status == 200
    rej.received.clear()
    body = b'{"model":"deepseek-chat", "messages":[{"role":"user","content":"hi"}] }'
    r = await proxy.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200 and "X-OCR-Fallback" not in r.headers and "X-OCR-Model" not in r.headers
    assert [x.body for x in rej.received] == [body]  # byte for byte, one call


async def test_a_failed_resend_teaches_nothing(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    """The resend was refused too (the refusal was about something else): the model is not
    learned, so the next request goes upstream as it came."""
    proxy = await make_proxy()
    for label in ("one", "two"):
        r = await proxy.post(CHAT, json=with_image("always-no", label))
        assert r.status == 400 and r.headers["X-OCR-Fallback"] == "rejected-images"
    assert rej.images_seen() == ["image_url", None, "image_url", None]


async def test_an_echoed_refusal_teaches_nothing(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    """A client cannot make a model that sees be learned as text-only by sending text that
    reads like a refusal and having the upstream quote it back."""
    proxy = await make_proxy()
    r = await proxy.post(CHAT, json=with_image("picky-echo", "x"))  # "Invalid image" complaint
    assert r.status == 400 and "X-OCR-Fallback" not in r.headers
    said = b"Invalid value: 'does not support images'. Supported values are: 'low', 'high'."
    assert not fallback.rejects_images(400, orjson.dumps({"error": {"message": said.decode()}}))


async def test_a_model_its_upstream_takes_but_does_not_list_falls_back_unchecked(
    make_proxy: ProxyFactory, fake: FakeOpenAI, rej: FakeRejecting
) -> None:
    """With the model check on: the upstream has just taken the model's name (it refused only
    the images), so neither the resend nor a learned request is refused as unlisted."""
    proxy = await make_proxy(check=True)
    model = "deepseek-deployment-7"  # taken, not in the fake's list
    r = await proxy.post(CHAT, json=with_image(model, "one"))
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Fallback"] == "rejected-images"
    r = await proxy.post(CHAT, json=with_image(model, "two"))
    assert r.status == 200 and r.headers["X-OCR-Fallback"] == "learned"
    r = await proxy.post(CHAT, json=chat(model, "text only"))
    assert r.status == 200 and "X-OCR-Fallback" not in r.headers
    r = await proxy.post(CHAT, json=with_image("deepseek-nope-ocr", "three"))  # a switch: checked
    assert r.status == 404


def test_the_store_is_scoped_by_upstream_and_in_relay_mode_by_credential() -> None:
    cfg = make_config(FakeOpenAI(url="http://127.0.0.1:9/v1"))
    with_key = cfg.upstreams[0]
    keyless = config.from_mapping(
        {"upstreams": [{"name": "open", "base_url": "http://127.0.0.1:9/v1"}]}, env={}
    ).upstreams[0]
    alice, bob = {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-bob"}
    store = fallback.Learned(60.0)
    store.learn(catalog.scope_of(keyless, alice, relay_auth=True), "m")
    assert store.knows(catalog.scope_of(keyless, alice, relay_auth=True), "m")
    assert not store.knows(catalog.scope_of(keyless, bob, relay_auth=True), "m")
    # The upstream's own key: one view for every client.
    assert catalog.scope_of(with_key, alice, relay_auth=True) == catalog.scope_of(
        with_key, bob, relay_auth=True
    )
    assert catalog.scope_of(with_key, alice, relay_auth=True) != catalog.scope_of(
        keyless, alice, relay_auth=True
    )

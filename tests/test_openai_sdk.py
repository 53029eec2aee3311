"""The official openai SDK as a real client of the proxy, plain and streamed."""

from __future__ import annotations

import openai
import pytest

from tests.fakes import data_url


@pytest.fixture
async def sdk(proxy):
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="sk-client", max_retries=0
    )
    yield client
    await client.close()


def user(*parts):
    return {"role": "user", "content": list(parts)}


IMG = {"type": "image_url", "image_url": {"url": data_url("receipt")}}


async def test_plain_completion_with_ocr_usage(sdk, fake):
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-3.5-turbo-ocr",
        messages=[user({"type": "text", "text": "total?"}, IMG)],
        temperature=0.2,
    )
    completion = raw.parse()
    assert "A picture showing receipt." in completion.choices[0].message.content
    assert completion.usage.prompt_tokens == 11
    assert completion.usage.model_extra["ocr"]["images"] == 1
    assert raw.headers["x-ocr-model"] == "vision-1"
    assert fake.chat_requests[-1].json()["temperature"] == 0.2


async def test_ocr_model_via_extra_body(sdk, fake):
    completion = await sdk.chat.completions.create(
        model="deepseek-chat", messages=[user(IMG)], extra_body={"ocr_model": "vision-mini"}
    )
    assert "described by vision-mini" in completion.choices[0].message.content
    assert "ocr_model" not in fake.chat_requests[-1].json()


async def test_streamed_completion_with_usage(sdk, fake):
    stream = await sdk.chat.completions.create(
        model="gpt-3.5-turbo-ocr",
        messages=[user(IMG)],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "t0 t1 t2 t3 t4 "
    assert usage is not None and usage.model_extra["ocr"]["total_tokens"] == 120


async def test_multi_turn_conversation_hits_the_cache(sdk, fake):
    history = [user({"type": "text", "text": "what is this?"}, IMG)]
    first = await sdk.chat.completions.create(model="gpt-3.5-turbo-ocr", messages=history)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        user({"type": "text", "text": "and the date?"}),
    ]
    second = await sdk.chat.completions.create(model="gpt-3.5-turbo-ocr", messages=history)
    assert fake.ocr_calls == ["receipt"]
    assert second.usage.model_extra["ocr"]["cache_hits"] == 1


async def test_errors_reach_the_sdk_as_api_errors(sdk):
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(
            model="m-ocr",
            messages=[
                user({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}})
            ],
        )
    assert "messages[0].content[0]" in info.value.message
    with pytest.raises(openai.InternalServerError):
        await sdk.chat.completions.create(model="fail-500", messages=[user(IMG)])

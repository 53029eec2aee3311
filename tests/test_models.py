"""The model list (``models.py``): each chat model's ``-ocr`` twin right after it, no twins for
models that take no chat messages, and the operator's ``list_twins``/``hide_twins`` and
``text_only_models``; read through the official ``openai`` SDK, as model pickers do."""

from __future__ import annotations

from typing import Any

import openai

from tests.fakes import FakeOpenAI

LISTED = [
    "gpt-4.1",
    "text-embedding-3-small",
    "tts-1",
    "gpt-4o-mini-tts",
    "whisper-1",
    "gpt-4o-transcribe",
    "dall-e-3",
    "gpt-image-1",
    "omni-moderation-latest",
    "bge-reranker-v2",
    "deepseek-chat",
    "Qwen3-Embedding-8B",
]


async def _ids(proxy: Any) -> list[str]:
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="client", max_retries=0
    )
    try:
        page = await client.models.list()
        return [model.id async for model in page]
    finally:
        await client.close()


async def test_twins_follow_their_base_and_only_chat_models_get_one(
    make_proxy: Any, fake: FakeOpenAI
) -> None:
    fake.models_list = LISTED
    ids = await _ids(await make_proxy())
    assert ids == [
        "gpt-4.1",
        "gpt-4.1-ocr",
        "text-embedding-3-small",
        "tts-1",
        "gpt-4o-mini-tts",
        "whisper-1",
        "gpt-4o-transcribe",
        "dall-e-3",
        "gpt-image-1",
        "omni-moderation-latest",
        "bge-reranker-v2",
        "deepseek-chat",
        "deepseek-chat-ocr",
        "Qwen3-Embedding-8B",
    ]


async def test_text_only_models_get_no_twin_and_the_operator_chooses(
    make_proxy: Any, fake: FakeOpenAI
) -> None:
    fake.models_list = LISTED
    proxy = await make_proxy(ocr={"text_only_models": ["deepseek-*"], "hide_twins": ["gpt-4.1"]})
    ids = await _ids(proxy)
    assert [i for i in ids if i.endswith("-ocr")] == []  # deepseek: already OCR'd; gpt-4.1 hidden
    proxy = await make_proxy(ocr={"list_twins": ["*image*", "deepseek-*"]})
    twins = [i for i in await _ids(proxy) if i.endswith("-ocr")]
    assert twins == ["gpt-image-1-ocr", "deepseek-chat-ocr"]  # list_twins replaces the default


async def test_an_upstreams_own_ocr_entry_sits_after_its_base_and_is_not_doubled(
    make_proxy: Any, fake: FakeOpenAI
) -> None:
    fake.models_list = ["m-ocr", "x", "m", "solo-ocr"]
    ids = await _ids(await make_proxy())
    assert ids == ["x", "x-ocr", "m", "m-ocr", "solo-ocr"]

"""``[ocr] progress = "reasoning"``: notes in ``delta.reasoning_content`` while a chat stream's
images are read, on the wire and through real clients (openai-python, the OpenAI Node SDK)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient

from ocrproxy import config
from tests.conftest import ProxyFactory, chat, require_local_engine
from tests.fake_anthropic import b64, image_block
from tests.fakes import FakeOpenAI, data_url, image_part, png

URL = "/v1/chat/completions"
ON = {"progress": "reasoning", "keepalive_interval_s": 0.05}
DONE = re.compile(r"^ done in \d+\.\d s(?: \((.*)\))?\.\n\n$")
NODE_DIR = Path(__file__).parent / "node"


def data_events(body: bytes) -> list[Any]:
    """The JSON of every ``data:`` event, in order (``[DONE]`` left out)."""
    out = []
    for event in body.split(b"\n\n"):
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            out.append(orjson.loads(event[6:]))
    return out


def user_item(*content: Any) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": list(content)}


def reasoning(chunk: Any) -> str | None:
    choices = chunk.get("choices") or [{}]
    value: str | None = choices[0].get("delta", {}).get("reasoning_content")
    return value


async def stream(proxy: TestClient[Any, Any], *parts: Any, **extra: Any) -> tuple[Any, bytes]:
    r = await proxy.post(URL, json=chat("m-ocr", "What is it?", *parts, stream=True, **extra))
    assert r.status == 200
    return r, await r.read()


def test_the_setting_is_off_by_default_and_checked() -> None:
    assert config.Ocr().progress == "off"
    assert config.from_mapping({"ocr": {"progress": "reasoning"}}, env={}).ocr.progress == (
        "reasoning"
    )
    with pytest.raises(config.ConfigError) as info:
        config.from_mapping({"ocr": {"progress": "thinking"}}, env={})
    assert "$.ocr.progress" in str(info.value)


async def test_notes_come_first_with_the_chunk_shape_and_keepalives_between(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(ocr=ON)
    fake.ocr_delay = 0.3  # six keep-alive intervals at least
    r, body = await stream(proxy, image_part(data_url("a")), image_part(data_url("b")))
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["X-OCR-Images"] == "2"

    opening = (
        b'data: {"id":"chatcmpl-ocr-' + r.headers["X-Request-Id"].encode() + b'",'
        b'"object":"chat.completion.chunk","created":'
    )
    assert body.startswith(opening)  # committed at once, the first note as its first bytes
    first, second, *upstream = data_events(body)
    assert first["id"] == second["id"] == "chatcmpl-ocr-" + r.headers["X-Request-Id"]
    assert first["model"] == second["model"] == "m-ocr"  # the model the client asked for
    assert isinstance(first["created"], int) and first["created"] == second["created"]
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "reasoning_content": "Reading 2 images with vision-1…"},
            "finish_reason": None,
        }
    ]
    assert list(second["choices"][0]["delta"]) == ["reasoning_content"]
    assert second["choices"][0]["finish_reason"] is None
    done = DONE.match(reasoning(second) or "")
    assert done is not None and done.group(1) is None  # nothing from cache, nothing failed
    assert [c["id"] for c in upstream] == ["chatcmpl-fake"] * 5
    assert all(reasoning(c) is None for c in upstream)

    head, _, rest = body.partition(b"\n\n")
    between, _, tail = rest.partition(b"\n\ndata: ")
    assert set(between.split(b"\n\n")) == {b": keep-alive"}  # keep-alives between the notes
    assert tail.index(b": ocr images=2 cache_hits=0") < tail.index(b'"id":"chatcmpl-fake"')
    assert body.endswith(b"data: [DONE]\n\n")
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    assert "showing a." in content and "showing b." in content and "Reading" not in content


async def test_one_from_cache_and_one_read(make_proxy: ProxyFactory, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(ocr=ON)
    warm = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("known"))))
    assert warm.status == 200
    fake.ocr_delay = 0.1
    _, body = await stream(proxy, image_part(data_url("known")), image_part(data_url("new")))
    notes = [reasoning(c) for c in data_events(body)[:2]]
    assert notes[0] == "Reading 2 images with vision-1…"
    done = DONE.match(notes[1] or "")
    assert done is not None and done.group(1) == "1 from cache"
    assert fake.ocr_calls == ["known", "new"]


async def test_one_image_that_could_not_be_read(make_proxy: ProxyFactory, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(ocr=ON)
    fake.ocr_fail = {"broken"}
    _, body = await stream(proxy, image_part(data_url("broken")))
    notes = [reasoning(c) for c in data_events(body)[:2]]
    assert notes[0] == "Reading 1 image with vision-1…"  # singular
    done = DONE.match(notes[1] or "")
    assert done is not None and done.group(1) == "1 could not be read"
    assert "could not be analysed" in fake.chat_requests[-1].json()["messages"][0]["content"]


async def test_off_by_default_the_stream_is_the_upstreams(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy()
    fake.ocr_delay = 0.2  # shorter than keepalive_after_s (3 s): no early commit
    r, body = await stream(proxy, image_part(data_url("quiet")))
    assert b"reasoning_content" not in body
    assert body.startswith(b'data: {"id":"chatcmpl-fake"')
    assert r.headers["X-OCR-Cache-Hits"] == "0"  # the full headers: committed after the OCR step


async def test_nothing_to_read_when_every_image_is_in_memory(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(ocr=ON)
    assert (await proxy.post(URL, json=chat("m-ocr", image_part(data_url("seen"))))).status == 200
    r, body = await stream(proxy, image_part(data_url("seen")))
    assert b"reasoning_content" not in body and b": keep-alive" not in body
    assert body.startswith(b'data: {"id":"chatcmpl-fake"')
    assert r.headers["X-OCR-Cache-Hits"] == "1"
    assert fake.ocr_calls == ["seen"]


async def test_a_plain_request_gets_no_notes(make_proxy: ProxyFactory, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(ocr=ON)
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("plain"))))
    assert r.status == 200 and r.content_type == "application/json"
    answer = await r.json()
    assert "reasoning_content" not in answer["choices"][0]["message"]
    assert answer["usage"]["ocr"]["images"] == 1


async def test_usage_is_the_upstreams_plus_ocr(make_proxy: ProxyFactory, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(ocr=ON)
    _, body = await stream(
        proxy, image_part(data_url("paid")), stream_options={"include_usage": True}
    )
    chunks = data_events(body)
    assert [reasoning(c) is not None for c in chunks[:3]] == [True, True, False]
    assert all("usage" not in c for c in chunks[:2])
    (usage,) = [c["usage"] for c in chunks if c.get("usage")]
    ocr = usage.pop("ocr")
    assert usage == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 99}
    assert ocr["images"] == 1 and ocr["prompt_tokens"] == 100 and ocr["completion_tokens"] == 20


async def test_an_ocr_failure_after_the_commit_is_the_error_event(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(ocr={**ON, "on_error": "fail"})
    fake.ocr_fail = {"x"}
    _, body = await stream(proxy, image_part(data_url("x")))
    opening, error = data_events(body)
    assert reasoning(opening) == "Reading 1 image with vision-1…"
    assert error["error"]["code"] == "ocr_failed"
    assert fake.chat_requests == []


async def test_an_upstream_error_after_the_commit_comes_after_the_notes(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(ocr=ON)
    r = await proxy.post(URL, json=chat("fail-400-ocr", image_part(data_url("e")), stream=True))
    assert r.status == 200  # the trade-off: committed before the upstream answered
    opening, done, error = data_events(await r.read())
    assert reasoning(opening) is not None and DONE.match(reasoning(done) or "")
    assert error["error"]["message"] == "bad thing"


async def test_the_local_engine_is_named_as_such(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    require_local_engine()
    from PIL import Image

    from ocrproxy import local
    from tests.test_local import data_url as png_url
    from tests.test_local import encode

    proxy = await make_proxy(ocr={**ON, "model": "local"})
    blank = png_url(encode(Image.new("RGB", (200, 100), (250, 250, 250))))
    _, body = await stream(proxy, image_part(blank))
    name = local.Engine(config.OcrLocal()).name
    note = reasoning(data_events(body)[0])
    assert note == f"Reading 1 image with the local OCR engine ({name})…"
    assert name.startswith("Tesseract ")


async def test_messages_streams_are_unchanged(make_both: ProxyFactory, fake: FakeOpenAI) -> None:
    """No made-up thinking block (it would need a signature): the same bytes as with progress
    off, and no early commit."""
    bodies = []
    for settings in ({}, ON):
        proxy = await make_both(ocr=settings)
        request = {
            "model": "deepseek-chat-ocr",
            "max_tokens": 64,
            "stream": True,
            "messages": [{"role": "user", "content": [image_block(b64(png("same")))]}],
        }
        r = await proxy.post("/v1/messages", json=request)
        assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == "0"
        bodies.append(await r.read())
    assert bodies[0] == bodies[1]
    assert b"thinking" not in bodies[1] and b"Reading 1 image" not in bodies[1]


async def test_responses_streams_are_unchanged(
    make_responses: ProxyFactory, fake: FakeOpenAI
) -> None:
    bodies = []
    for settings in ({}, ON):
        proxy = await make_responses(ocr=settings)
        image = {"type": "input_image", "image_url": data_url("same")}
        request = {"model": "glm-5.2-ocr", "stream": True, "input": [user_item(image)]}
        r = await proxy.post("/v1/responses", json=request)
        assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == "0"
        bodies.append(await r.read())
    assert bodies[0] == bodies[1]
    assert b"Reading 1 image" not in bodies[1] and b"keep-alive" not in bodies[1]


async def test_the_openai_python_sdk_reads_the_notes_first(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(ocr=ON)
    fake.ocr_delay = 0.2
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="sk-client", max_retries=0
    )
    try:
        answer = await client.chat.completions.create(
            model="gpt-3.5-turbo-ocr",
            stream=True,
            stream_options={"include_usage": True},
            messages=[
                {"role": "user", "content": [image_part(data_url("sdk"))]},  # type: ignore[misc]
            ],
        )
        kinds: list[tuple[str, str]] = []
        usage = None
        async for chunk in answer:
            if chunk.usage is not None:
                usage = chunk.usage
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            thought = (delta.model_extra or {}).get("reasoning_content")
            if thought:
                kinds.append(("reasoning", thought))
            if delta.content:
                kinds.append(("content", delta.content))
    finally:
        await client.close()
    assert [kind for kind, _ in kinds] == ["reasoning"] * 2 + ["content"] * 5
    assert kinds[0][1] == "Reading 1 image with vision-1…"
    assert DONE.match(kinds[1][1])
    assert "".join(text for kind, text in kinds if kind == "content") == "t0 t1 t2 t3 t4 "
    assert usage is not None and usage.prompt_tokens == 11 and usage.total_tokens == 99
    assert (usage.model_extra or {})["ocr"]["images"] == 1


async def test_the_openai_node_sdk_reads_the_notes_first(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("`node` is not installed (Node 20+ runs the OpenAI Node SDK test)")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.skip("tests/node/node_modules is missing: run `npm ci --prefix tests/node`")
    proxy = await make_proxy(ocr=ON)
    fake.ocr_delay = 0.2
    process = await asyncio.create_subprocess_exec(
        node,
        str(NODE_DIR / "progress_stream.mjs"),
        "gpt-3.5-turbo-ocr",
        data_url("node"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "OCRPROXY_URL": str(proxy.make_url("/v1")),
            "OCRPROXY_KEY": "sk-client",
        },
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    lines = [orjson.loads(line) for line in out.splitlines()]
    deltas = [line["delta"] for line in lines if line["delta"] is not None]
    assert deltas[0] == {"role": "assistant", "reasoning_content": "Reading 1 image with vision-1…"}
    assert list(deltas[1]) == ["reasoning_content"] and DONE.match(deltas[1]["reasoning_content"])
    assert lines[0]["id"].startswith("chatcmpl-ocr-") and lines[0]["model"] == "gpt-3.5-turbo-ocr"
    assert "".join(d.get("content") or "" for d in deltas[2:]) == "t0 t1 t2 t3 t4 "
    assert all("reasoning_content" not in d for d in deltas[2:])
    assert lines[2]["id"] == "chatcmpl-fake"
    usage = lines[-1]["usage"]
    assert usage["prompt_tokens"] == 11 and usage["ocr"]["images"] == 1

"""``POST /v1/messages`` end to end: the official anthropic SDK (and raw aiohttp where bytes on
the wire matter) against the proxy, whose Anthropic upstream is a text-only fake that refuses
images exactly as DeepSeek does. Each test checks what the upstream was sent and what the
client got."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import anthropic
import orjson
import pytest

from tests.conftest import anthropic_upstream
from tests.fake_anthropic import DEEPSEEK_REFUSAL, b64, image_block
from tests.fakes import png

OCR_USAGE_KEYS = {"model", "images", "cache_hits", "failures", "input_tokens", "output_tokens"}


def base_url(proxy: Any) -> str:
    return str(proxy.make_url("")).rstrip("/")


def sdk(proxy: Any, max_retries: int = 0, api_key: str = "sk-client") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=base_url(proxy), api_key=api_key, max_retries=max_retries
    )


def img(label: str, **extra: Any) -> dict[str, Any]:
    return image_block(b64(png(label)), **extra)


def user(*blocks: Any) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "text", "text": b} if isinstance(b, str) else b for b in blocks],
    }


def sse_events(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, decoded data) of each SSE event; comment-only events are left out."""
    out: list[tuple[str | None, Any]] = []
    for frame in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = None, []
        for line in frame.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
        if name is not None or data:
            out.append((name, orjson.loads(b"\n".join(data)) if data else None))
    return out


def assert_described(text: str, label: str, model: str = "vision-1") -> None:
    """``text`` is the proxy's reference block for the image ``label``."""
    assert text.startswith("[Image ")
    assert f"(described by {model};" in text
    assert f"\nA picture showing {label}.\n" in text
    assert "[End of image " in text


def raw_value(body: bytes, start: bytes) -> bytes:
    """The JSON value of ``body`` that begins at the first ``start`` (an object), as bytes."""
    at = body.index(start)
    depth, in_string, escaped = 0, False, False
    for i in range(at, len(body)):
        c = body[i : i + 1]
        if in_string:
            if escaped:
                escaped = False
            elif c == b"\\":
                escaped = True
            elif c == b'"':
                in_string = False
        elif c == b'"':
            in_string = True
        elif c in b"{[":
            depth += 1
        elif c in b"}]":
            depth -= 1
            if depth == 0:
                return body[at : i + 1]
    raise AssertionError("unterminated JSON value")


# 1. plain, an image as a top-level block


async def test_sdk_plain_top_level_image_is_described_in_place(make_both, fake, fake_anthropic):
    proxy = await make_both()
    async with sdk(proxy) as client:
        raw = await client.messages.with_raw_response.create(
            model="deepseek-v4-pro-ocr",
            max_tokens=64,
            messages=[user("what does it say?", img("receipt"), "thanks")],
        )
        message = await raw.parse()
    assert raw.status_code == 200
    assert raw.headers["x-ocr-model"] == "vision-1"
    assert raw.headers["x-ocr-images"] == "1"
    assert raw.headers["x-ocr-cache-hits"] == "0"

    (sent,) = fake_anthropic.message_requests
    body = sent.json()
    assert body["model"] == "deepseek-v4-pro"
    assert b'"image"' not in sent.body
    content = body["messages"][0]["content"]
    assert [b["type"] for b in content] == ["text", "text", "text"]
    assert content[0] == {"type": "text", "text": "what does it say?"}
    assert content[2] == {"type": "text", "text": "thanks"}
    assert set(content[1]) == {"type", "text"}
    assert_described(content[1]["text"], "receipt")
    assert fake.ocr_calls == ["receipt"]

    assert message.content[0].text == "echo: " + "\n".join(b["text"] for b in content)
    assert message.usage.input_tokens == 42
    ocr = message.usage.model_extra["ocr"]
    assert set(ocr) == OCR_USAGE_KEYS
    assert ocr == {
        "model": "vision-1",
        "images": 1,
        "cache_hits": 0,
        "failures": 0,
        "input_tokens": 100,
        "output_tokens": 20,
    }


# 2. streaming, an image inside a tool_result


def tool_result_history(label: str) -> list[dict[str, Any]]:
    return [
        user("read shot.png"),
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "Read",
                    "input": {"file_path": "shot.png"},
                }
            ],
        },
        user(
            {
                "type": "tool_result",
                "tool_use_id": "toolu_01",
                "is_error": False,
                "content": [{"type": "text", "text": "the file:"}, img(label)],
            }
        ),
    ]


async def test_sdk_stream_tool_result_image_becomes_one_string(make_both, fake, fake_anthropic):
    proxy = await make_both()
    events = []
    async with sdk(proxy) as client:
        async with client.messages.stream(
            model="deepseek-v4-pro-ocr", max_tokens=64, messages=tool_result_history("diagram")
        ) as stream:
            async for event in stream:
                events.append(event)
            final = await stream.get_final_message()

    (sent,) = fake_anthropic.message_requests
    body = sent.json()
    assert body["stream"] is True and body["model"] == "deepseek-v4-pro"
    (result,) = body["messages"][2]["content"]
    assert result["type"] == "tool_result"
    assert result["tool_use_id"] == "toolu_01"
    assert result["is_error"] is False
    assert isinstance(result["content"], str)
    head, _, block = result["content"].partition("\n\n")
    assert head == "the file:"
    assert_described(block, "diagram")
    assert body["messages"][:2] == tool_result_history("diagram")[:2]

    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text.startswith("echo: the file:")
    assert "A picture showing diagram." in text
    assert final.content[0].text == text
    (delta,) = [e for e in events if e.type == "message_delta"]
    assert delta.usage.output_tokens == 17
    assert delta.usage.model_extra["ocr"]["images"] == 1
    assert fake.ocr_calls == ["diagram"]


async def test_raw_stream_usage_ocr_is_in_message_delta_only(make_both, fake, fake_anthropic):
    proxy = await make_both()
    request = {
        "model": "deepseek-v4-pro-ocr",
        "max_tokens": 64,
        "stream": True,
        "messages": tool_result_history("chart"),
    }
    async with proxy.session.post(
        proxy.make_url("/v1/messages"), json=request, headers={"anthropic-version": "2023-06-01"}
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-OCR-Model"] == "vision-1"
        raw = await r.read()
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names.count("message_delta") == 1
    for name, data in events:
        assert data["type"] == name  # every event relayed whole, name and data matching
    start = events[0][1]
    assert start["message"]["usage"] == {"input_tokens": 42, "output_tokens": 1}
    (delta,) = [data for name, data in events if name == "message_delta"]
    assert delta["usage"]["output_tokens"] == 17
    assert delta["usage"]["ocr"] == {
        "model": "vision-1",
        "images": 1,
        "cache_hits": 0,
        "failures": 0,
        "input_tokens": 100,
        "output_tokens": 20,
    }
    assert b"ocr" not in raw.split(b"event: content_block_start")[0]  # not in message_start


# 3. a Claude-Code-shaped transcript


SIGNATURE = "EqQBCkgIARABGAIiQF3sdf+9/Xw==sig"
THINKING = (
    b'{"type": "thinking",  "thinking": "The user wants \\u00e9 and \\"quotes\\"\\n'
    b'I should read the file.", "signature": "' + SIGNATURE.encode() + b'"}'
)


def claude_code_body(shot: str, pasted: str) -> bytes:
    """A Claude Code turn, written by hand so that its bytes (spacing, escapes) are known."""
    system = (
        b'[{"type":"text","text":"You are Claude Code, Anthropic\'s official CLI.",'
        b'"cache_control":{"type":"ephemeral"}},'
        b'{"type":"text","text":"cwd: /repo","cache_control":{"type":"ephemeral","ttl":"1h"}}]'
    )
    tool_use = (
        b'{"type":"tool_use","id":"toolu_01","name":"Read","input":{"file_path":"/repo/shot.png"}}'
    )
    reminder = (
        b'{"type":"text","text":"<system-reminder>\\nThe task list is empty.\\n</system-reminder>"}'
    )
    unknown = (
        b'{"type":"tool_reference","tool_name":"mcp__vision__look","x_future":[1,2,{"a":null}]}'
    )
    image_pasted = orjson.dumps(img(pasted, cache_control={"type": "ephemeral"}))
    image_shot = orjson.dumps(img(shot))
    return (
        b'{"model":"deepseek-v4-pro-ocr","max_tokens":32000,"stream":false,'
        b'"system":' + system + b","
        b'"metadata":{"user_id":"user_abc_account_def_session_0123"},'
        b'"context_management":{"edits":[{"type":"clear_tool_uses_20250919","keep":{"type":"tool_uses","value":3}}]},'
        b'"thinking":{"type":"enabled","budget_tokens":1024},'
        b'"ocr_model":"vision-1",'
        b'"messages":['
        b'{"role":"user","content":['
        + image_pasted
        + b',{"type":"text","text":"[Image #1] what does this error say?"}]},'
        b'{"role":"assistant","content":[' + THINKING + b"," + tool_use + b"]},"
        b'{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01","content":['
        + image_shot
        + b"]},"
        + reminder
        + b","
        + unknown
        + b"]}]}"
    )


async def test_claude_code_transcript_passes_through_byte_exact(make_both, fake, fake_anthropic):
    proxy = await make_both()
    body = claude_code_body("stacktrace", "error dialog")
    client_obj = orjson.loads(body)
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "context-management-2025-06-27,interleaved-thinking-2025-05-14",
        "content-type": "application/json",
        "x-api-key": "sk-client",
    }
    answers = []
    for _ in range(2):
        async with proxy.session.post(
            proxy.make_url("/v1/messages?beta=true"), data=body, headers=headers
        ) as r:
            assert r.status == 200, await r.text()
            answers.append((dict(r.headers), await r.json()))

    first, second = fake_anthropic.message_requests
    assert first.path == "/v1/messages?beta=true"
    assert first.headers["anthropic-beta"] == headers["anthropic-beta"]
    assert first.headers["anthropic-version"] == "2023-06-01"
    sent = first.json()
    assert "ocr_model" not in sent
    assert sent["model"] == "deepseek-v4-pro"
    for key in ("system", "metadata", "context_management", "thinking", "max_tokens", "stream"):
        assert sent[key] == client_obj[key], key
    assert list(sent) == [k for k in client_obj if k != "ocr_model"]  # order kept too

    # the assistant turn (thinking + signature, tool_use) is untouched, the thinking to the byte
    assert sent["messages"][1] == client_obj["messages"][1]
    assert raw_value(first.body, b'{"type": "thinking"') == THINKING
    assert sent["messages"][1]["content"][0]["signature"] == SIGNATURE

    pasted, question = sent["messages"][0]["content"]
    assert set(pasted) == {"type", "text", "cache_control"}
    assert pasted["type"] == "text" and pasted["cache_control"] == {"type": "ephemeral"}
    assert_described(pasted["text"], "error dialog")
    assert question == client_obj["messages"][0]["content"][1]

    result, reminder, unknown = sent["messages"][2]["content"]
    assert result["tool_use_id"] == "toolu_01" and set(result) == {"type", "tool_use_id", "content"}
    assert isinstance(result["content"], str)
    assert_described(result["content"], "stacktrace")
    assert reminder == client_obj["messages"][2]["content"][1]
    assert unknown == client_obj["messages"][2]["content"][2]
    for raw in (
        b'{"type":"text","text":"<system-reminder>\\nThe task list is empty.\\n</system-reminder>"}',
        b'{"type":"tool_reference","tool_name":"mcp__vision__look","x_future":[1,2,{"a":null}]}',
        b'{"type":"tool_use","id":"toolu_01","name":"Read","input":{"file_path":"/repo/shot.png"}}',
    ):
        assert raw in first.body

    # deterministic: the same history gives the same upstream bytes; the second turn is all hits
    assert second.body == first.body
    assert sorted(fake.ocr_calls) == ["error dialog", "stacktrace"]
    (h1, a1), (h2, a2) = answers
    assert h1["X-OCR-Cache-Hits"] == "0" and h2["X-OCR-Cache-Hits"] == "2"
    assert a1["usage"]["ocr"]["images"] == 2 and a2["usage"]["ocr"]["cache_hits"] == 2
    assert a2["usage"]["ocr"]["input_tokens"] == 0


async def test_claude_code_transcript_through_the_sdk_beta_client(make_both, fake, fake_anthropic):
    proxy = await make_both()
    client_obj = orjson.loads(claude_code_body("stacktrace", "error dialog"))
    params = {k: v for k, v in client_obj.items() if k not in ("ocr_model", "stream")}
    params["max_tokens"] = 2048  # the SDK refuses a long non-streamed request
    async with sdk(proxy) as client:
        message = await client.beta.messages.create(
            **params,
            betas=["context-management-2025-06-27"],
            extra_query={
                "beta": "true"
            },  # as Claude Code sends it (this SDK's beta client does not)
            extra_headers={"X-OCR-Model": "vision-2"},
        )
    (sent,) = fake_anthropic.message_requests
    assert sent.path == "/v1/messages?beta=true"
    assert sent.headers["anthropic-beta"] == "context-management-2025-06-27"
    assert "x-ocr-model" not in {k.lower() for k in sent.headers}
    body = sent.json()
    assert body["model"] == "deepseek-v4-pro"
    for key in ("system", "metadata", "context_management", "thinking"):
        assert body[key] == client_obj[key], key
    assert body["messages"][1] == client_obj["messages"][1]
    assert body["messages"][2]["content"][1:] == client_obj["messages"][2]["content"][1:]
    pasted = body["messages"][0]["content"][0]
    assert pasted["cache_control"] == {"type": "ephemeral"}
    assert_described(pasted["text"], "error dialog", "vision-2")
    assert message.usage.model_extra["ocr"]["model"] == "vision-2"
    assert sorted(fake.ocr_calls) == ["error dialog", "stacktrace"]


# 4. document blocks, and what is left alone


PDF = "JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSPj4Kc3RyZWFtCg=="


async def test_document_content_images_replaced_pdf_left_alone(make_both, fake, fake_anthropic):
    proxy = await make_both()
    pdf_doc = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
        "title": "spec.pdf",
        "cache_control": {"type": "ephemeral"},
    }
    content_doc = {
        "type": "document",
        "source": {
            "type": "content",
            "content": [{"type": "text", "text": "page 1"}, img("page two")],
        },
        "title": "scan",
        "citations": {"enabled": True},
    }
    async with sdk(proxy) as client:
        message = await client.messages.create(
            model="deepseek-v4-pro-ocr",
            max_tokens=64,
            messages=[user(pdf_doc, content_doc, "summarise")],
        )
    (sent,) = fake_anthropic.message_requests
    pdf, doc, ask = sent.json()["messages"][0]["content"]
    assert pdf == pdf_doc
    assert ask == {"type": "text", "text": "summarise"}
    assert {k: v for k, v in doc.items() if k != "source"} == {
        "type": "document",
        "title": "scan",
        "citations": {"enabled": True},
    }
    assert doc["source"]["type"] == "content"
    page1, page2 = doc["source"]["content"]  # a document's content stays an array
    assert page1 == {"type": "text", "text": "page 1"}
    assert set(page2) == {"type", "text"}
    assert_described(page2["text"], "page two")
    assert fake.ocr_calls == ["page two"]
    assert message.usage.model_extra["ocr"]["images"] == 1


async def test_file_source_image_passed_on_with_a_warning(make_both, fake, fake_anthropic, caplog):
    proxy = await make_both()
    file_image = {
        "type": "image",
        "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"},
    }
    request = {
        "model": "deepseek-v4-pro-ocr",
        "max_tokens": 64,
        "messages": [user("look", file_image)],
    }
    with caplog.at_level(logging.WARNING, logger="ocrproxy"):
        async with proxy.session.post(
            proxy.make_url("/v1/messages"),
            json=request,
            headers={"anthropic-beta": "files-api-2025-04-14"},
        ) as r:
            status, answer = r.status, await r.read()
    (sent,) = fake_anthropic.message_requests
    body = sent.json()
    assert body["model"] == "deepseek-v4-pro"
    assert body["messages"][0]["content"][1] == file_image
    assert fake.ocr_calls == []
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "Files API" in r.getMessage()
    ]
    assert warnings and "messages[0].content[1]" in warnings[0].getMessage()
    # the upstream refused it (it is an image block); its 400 reaches the client unchanged
    assert status == 400
    refusal = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": DEEPSEEK_REFUSAL.format(where="messages[0].content"),
        },
    }
    assert answer == json.dumps(refusal).encode()

    async with sdk(proxy) as client:
        with pytest.raises(anthropic.BadRequestError) as info:
            await client.messages.create(**request)
    assert "unknown variant `image`" in info.value.message


# 5. keep-alives while the OCR model is slow, and an error after the commit


class Gate:
    """Holds every OCR call of the fake OpenAI model until opened: a stream is then certain to
    outlast ``keepalive_after_s`` in its OCR step, however loaded the machine, with no timing
    in any assertion."""

    def __init__(self, fake: Any, monkeypatch: Any) -> None:
        self.event = asyncio.Event()
        self.held = 0
        describe = fake.describe

        async def held(body: Any) -> Any:
            self.held += 1
            await self.event.wait()
            return await describe(body)

        monkeypatch.setattr(fake, "describe", held)

    def open(self) -> None:
        self.event.set()

    def close(self) -> None:
        self.event = asyncio.Event()


KEEPALIVE = {"keepalive_after_s": 0.2, "keepalive_interval_s": 0.2}


async def test_stream_commits_early_with_pings_while_ocr_is_slow(
    make_both, fake, fake_anthropic, monkeypatch
):
    gate = Gate(fake, monkeypatch)
    proxy = await make_both(ocr=KEEPALIVE)
    request = {
        "model": "deepseek-v4-pro-ocr",
        "max_tokens": 64,
        "stream": True,
        "messages": [user("what is it?", img("slow one"))],
    }
    async with proxy.session.post(proxy.make_url("/v1/messages"), json=request) as r:
        assert r.status == 200  # committed while the OCR call is held
        assert gate.held == 1 and fake.ocr_calls == []
        assert r.headers["X-OCR-Model"] == "vision-1" and r.headers["X-OCR-Images"] == "1"
        first = await r.content.readuntil(b"\n\n")
        assert first == b'event: ping\ndata: {"type": "ping"}\n\n'
        assert fake_anthropic.message_requests == []
        gate.open()
        raw = first + await r.content.read()
    events = sse_events(raw)
    names = [name for name, _ in events]
    start = names.index("message_start")
    assert set(names[:start]) == {"ping"}
    assert names[-1] == "message_stop"
    (delta,) = [d for n, d in events if n == "message_delta"]
    assert delta["usage"]["ocr"]["images"] == 1
    (sent,) = fake_anthropic.message_requests
    assert_described(sent.json()["messages"][0]["content"][1]["text"], "slow one")

    gate.close()
    async with sdk(proxy) as client:  # a new image: the SDK skips the pings and finishes
        async with client.messages.stream(
            model="deepseek-v4-pro-ocr",
            max_tokens=64,
            messages=[user("and this?", img("slow two"))],
        ) as stream:
            assert gate.held == 2  # the headers came before the OCR answer
            gate.open()
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert "A picture showing slow two." in text
    assert final.stop_reason == "end_turn"
    assert final.content[0].text == text
    assert fake.ocr_calls == ["slow one", "slow two"]


async def test_ocr_failure_after_commit_is_an_error_event(
    make_both, fake, fake_anthropic, monkeypatch
):
    gate = Gate(fake, monkeypatch)
    fake.ocr_fail = {"broken"}
    proxy = await make_both(ocr={**KEEPALIVE, "on_error": "fail"})
    request = {
        "model": "deepseek-v4-pro-ocr",
        "max_tokens": 64,
        "stream": True,
        "messages": [user("what is it?", img("broken"))],
    }
    async with proxy.session.post(proxy.make_url("/v1/messages"), json=request) as r:
        assert r.status == 200
        gate.open()
        raw = await r.read()
    events = sse_events(raw)
    assert events[0] == ("ping", {"type": "ping"})
    name, data = events[-1]
    assert name == "error"
    assert set(data) == {"type", "error"} and data["type"] == "error"
    assert set(data["error"]) == {"type", "message"}
    assert data["error"]["type"] == "api_error"
    assert "messages[0].content[1]" in data["error"]["message"]
    assert {n for n, _ in events} == {"ping", "error"}
    assert fake.ocr_calls == ["broken"]
    assert fake_anthropic.message_requests == []  # nothing went upstream

    gate.close()
    async with sdk(proxy) as client:
        with pytest.raises(anthropic.APIStatusError) as info:
            async with client.messages.stream(
                **{k: v for k, v in request.items() if k != "stream"}
            ) as stream:
                gate.open()
                async for _ in stream:
                    pass
    assert isinstance(info.value, anthropic.APIError)
    assert info.value.body["error"]["type"] == "api_error"
    assert fake.ocr_calls == ["broken", "broken"]  # a failure is not cached
    assert fake_anthropic.message_requests == []


async def test_upstream_error_after_commit_is_its_own_error_event(
    make_both, fake, fake_anthropic, monkeypatch
):
    gate = Gate(fake, monkeypatch)
    fake_anthropic.rate_limited = 1
    proxy = await make_both(ocr=KEEPALIVE)
    request = {
        "model": "fail-429-ocr",
        "max_tokens": 64,
        "stream": True,
        "messages": [user("what is it?", img("late limit"))],
    }
    async with proxy.session.post(proxy.make_url("/v1/messages"), json=request) as r:
        assert r.status == 200
        gate.open()
        raw = await r.read()
    events = sse_events(raw)
    assert events[0] == ("ping", {"type": "ping"})
    assert events[-1] == (
        "error",
        {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}},
    )
    assert {n for n, _ in events} == {"ping", "error"}
    (sent,) = fake_anthropic.message_requests
    assert b'"image"' not in sent.body and fake.ocr_calls == ["late limit"]


# 6. errors the proxy makes, in Anthropic's shape


async def post_raw(proxy: Any, body: Any, **headers: str) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with proxy.session.post(
        proxy.make_url("/v1/messages"),
        data=data,
        headers={"content-type": "application/json", **headers},
    ) as r:
        return r.status, await r.json(content_type=None)


def assert_anthropic_error(answer: Any, kind: str) -> str:
    assert set(answer) == {"type", "error"}, answer
    assert answer["type"] == "error"
    assert set(answer["error"]) == {"type", "message"}, answer
    assert answer["error"]["type"] == kind
    message: str = answer["error"]["message"]
    assert message
    return message


async def test_error_no_messages(make_both, fake_anthropic):
    proxy = await make_both()
    status, answer = await post_raw(proxy, {"model": "deepseek-v4-pro-ocr", "max_tokens": 5})
    assert status == 400
    assert "`messages`" in assert_anthropic_error(answer, "invalid_request_error")
    assert fake_anthropic.received == []


@pytest.mark.parametrize(
    "source, words",
    [
        ({"type": "base64", "media_type": "image/png", "data": "not*base64!"}, "base64"),
        ({"type": "base64", "media_type": "application/pdf", "data": b64(png("x"))}, "media type"),
        ({"type": "base64", "media_type": "image/png", "data": b64(b"plain text, no image")}, ""),
    ],
    ids=["malformed-base64", "bad-media-type", "not-an-image"],
)
async def test_error_bad_image(make_both, fake, fake_anthropic, source, words):
    proxy = await make_both()
    request = {
        "model": "deepseek-v4-pro-ocr",
        "max_tokens": 5,
        "messages": [user("hi", {"type": "image", "source": source})],
    }
    status, answer = await post_raw(proxy, request)
    assert status == 400
    message = assert_anthropic_error(answer, "invalid_request_error")
    assert "messages[0].content[1]" in message and words in message
    async with sdk(proxy) as client:
        with pytest.raises(anthropic.BadRequestError) as info:
            await client.messages.create(**request)
    assert info.value.status_code == 400
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert fake.ocr_calls == [] and fake_anthropic.received == []


async def test_error_authentication(make_both, fake_anthropic):
    proxy = await make_both(auth={"keys": ["sk-client-good"]})
    request = {"model": "deepseek-v4-pro", "max_tokens": 5, "messages": [user("hi")]}
    status, answer = await post_raw(proxy, request, **{"x-api-key": "sk-wrong"})
    assert status == 401
    assert_anthropic_error(answer, "authentication_error")
    status, answer = await post_raw(proxy, request)
    assert status == 401
    assert_anthropic_error(answer, "authentication_error")
    async with sdk(proxy, api_key="sk-wrong") as client:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.create(**request)
    assert info.value.body["error"]["type"] == "authentication_error"
    assert "sk-wrong" not in info.value.message
    assert fake_anthropic.received == []
    async with sdk(proxy, api_key="sk-client-good") as client:  # x-api-key, as the SDK sends it
        message = await client.messages.create(**request)
    assert message.content[0].text == "echo: hi"
    (sent,) = fake_anthropic.message_requests
    assert sent.headers["x-api-key"] == "sk-ant-upstream-secret"


async def test_error_unknown_ocr_model_and_unknown_model(make_both, fake, fake_anthropic):
    openai_up = {
        "name": "fake",
        "base_url": fake.url,
        "api_key": "sk-upstream-secret",
        "models": ["vision-*"],
    }
    proxy = await make_both(upstreams=[anthropic_upstream(fake_anthropic), openai_up])
    request = {"model": "deepseek-v4-pro", "max_tokens": 5, "messages": [user("hi", img("a"))]}
    async with sdk(proxy) as client:
        with pytest.raises(anthropic.NotFoundError) as info:
            await client.messages.create(
                **request, extra_headers={"X-OCR-Model": "nobody-serves-me"}
            )
        assert info.value.body["error"]["type"] == "not_found_error"
        assert "nobody-serves-me" in info.value.body["error"]["message"]
        with pytest.raises(anthropic.NotFoundError) as info:
            await client.messages.create(**{**request, "model": "gpt-unknown-ocr"})
        assert "gpt-unknown" in info.value.body["error"]["message"]
    status, answer = await post_raw(proxy, {**request, "ocr_model": "nobody-serves-me"})
    assert status == 404
    assert_anthropic_error(answer, "not_found_error")
    assert fake.ocr_calls == [] and fake_anthropic.received == []


async def test_error_body_too_large(make_both, fake, fake_anthropic):
    proxy = await make_both(server={"max_body_bytes": 2048})
    request = {"model": "deepseek-v4-pro-ocr", "max_tokens": 5, "messages": [user("x" * 4096)]}
    status, answer = await post_raw(proxy, request)
    assert status == 413
    assert_anthropic_error(answer, "request_too_large")
    async with sdk(proxy) as client:
        with pytest.raises(anthropic.APIStatusError) as info:
            await client.messages.create(**request)
    assert info.value.status_code == 413
    assert info.value.body["error"]["type"] == "request_too_large"
    assert fake_anthropic.received == []


async def test_error_image_too_large(make_both, fake, fake_anthropic):
    proxy = await make_both(ocr={"max_image_bytes": 1024})
    big = image_block(b64(png("big", size=4096)))
    request = {"model": "deepseek-v4-pro-ocr", "max_tokens": 5, "messages": [user("hi", big)]}
    status, answer = await post_raw(proxy, request)
    assert status == 413
    message = assert_anthropic_error(answer, "request_too_large")
    assert "1024" in message
    assert fake.ocr_calls == [] and fake_anthropic.received == []


async def test_error_no_anthropic_upstream(make_proxy, fake):
    proxy = await make_proxy()
    request = {"model": "deepseek-v4-pro", "max_tokens": 5, "messages": [user("hi")]}
    for model in ("deepseek-v4-pro", "deepseek-v4-pro-ocr"):
        status, answer = await post_raw(proxy, {**request, "model": model})
        assert status == 404
        message = assert_anthropic_error(answer, "not_found_error")
        assert "Anthropic Messages API" in message and "Invalid URL" not in message
    async with sdk(proxy) as client:
        with pytest.raises(anthropic.NotFoundError) as info:
            await client.messages.create(**request)
    assert "No upstream of this proxy speaks the Anthropic Messages API" in info.value.message
    assert fake.received == []


# 7. SDK retries on a 429 relayed before the commit


async def test_sdk_retries_a_relayed_429_and_the_image_is_described_once(
    make_both, fake, fake_anthropic
):
    proxy = await make_both()
    fake_anthropic.rate_limited = 1
    async with sdk(proxy, max_retries=2) as client:
        raw = await client.messages.with_raw_response.create(
            model="fail-429-ocr", max_tokens=5, messages=[user("again?", img("retried"))]
        )
        message = await raw.parse()
    assert raw.retries_taken == 1
    first, second = fake_anthropic.message_requests
    assert first.json()["model"] == second.json()["model"] == "fail-429"
    assert first.body == second.body
    assert fake.ocr_calls == ["retried"]
    assert raw.headers["x-ocr-cache-hits"] == "1"
    assert message.usage.model_extra["ocr"]["cache_hits"] == 1
    assert "A picture showing retried." in message.content[0].text


async def test_a_429_reaches_the_sdk_as_rate_limit_error(make_both, fake, fake_anthropic):
    proxy = await make_both()
    fake_anthropic.rate_limited = 5
    async with sdk(proxy, max_retries=0) as client:
        with pytest.raises(anthropic.RateLimitError) as info:
            await client.messages.create(
                model="fail-429-ocr", max_tokens=5, messages=[user("x", img("limited"))]
            )
    assert info.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Rate limited"},
    }


async def test_text_only_models_describe_without_a_suffix(make_both, fake, fake_anthropic):
    proxy = await make_both(ocr={"text_only_models": ["deepseek-v4-*"]})
    async with sdk(proxy) as client:
        message = await client.messages.create(
            model="deepseek-v4-pro", max_tokens=5, messages=[user(img("declared"))]
        )
        other = await client.messages.create(
            model="deepseek-flash", max_tokens=5, messages=[user("no image here")]
        )
    first, second = fake_anthropic.message_requests
    assert first.json()["model"] == "deepseek-v4-pro"
    assert_described(first.json()["messages"][0]["content"][0]["text"], "declared")
    assert message.usage.model_extra["ocr"]["images"] == 1
    assert second.json()["model"] == "deepseek-flash"
    assert other.usage.model_extra == {}  # not an OCR request: relayed as it is
    assert fake.ocr_calls == ["declared"]


# 8. without an OCR switch (and with the fallback off) the request goes as it is, and
# DeepSeek's refusal comes back, its message naming the -ocr model (tests/test_fallback.py)


async def test_without_ocr_switch_the_refusal_is_relayed_unchanged(make_both, fake, fake_anthropic):
    proxy = await make_both(ocr={"fallback_on_rejection": False})
    body = (
        b'{"model": "deepseek-v4-pro", "max_tokens": 5,\n "messages": [{"role": "user", "content": '
        b'[{"type": "text", "text": "hi"}, ' + orjson.dumps(img("not described")) + b"]}]}"
    )
    async with proxy.session.post(
        proxy.make_url("/v1/messages"), data=body, headers={"content-type": "application/json"}
    ) as r:
        status, answer = r.status, await r.read()
    (sent,) = fake_anthropic.message_requests
    assert sent.body == body
    refusal = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": DEEPSEEK_REFUSAL.format(where="messages[0].content")
            + " (ocrproxy: this model cannot read images; use `deepseek-v4-pro-ocr` to have"
            " them described first)",
        },
    }
    assert status == 400
    assert orjson.loads(answer) == refusal
    assert fake.ocr_calls == []
    assert "X-OCR-Model" not in r.headers

    async with sdk(proxy) as client:
        with pytest.raises(anthropic.BadRequestError) as info:
            await client.messages.create(**orjson.loads(body))
    assert info.value.body == refusal
    assert fake.ocr_calls == []


async def test_same_image_in_chat_then_messages_is_one_ocr_call(make_both, fake, fake_anthropic):
    """One description cache for both dialects (the neutral image record)."""
    proxy = await make_both()
    data = base64.b64encode(png("shared")).decode()
    chat = {
        "model": "gpt-3.5-turbo-ocr",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}
                ],
            }
        ],
    }
    async with proxy.session.post(proxy.make_url("/v1/chat/completions"), json=chat) as r:
        assert r.status == 200
    async with sdk(proxy) as client:
        raw = await client.messages.with_raw_response.create(
            model="deepseek-v4-pro-ocr", max_tokens=5, messages=[user(image_block(data))]
        )
    assert raw.headers["x-ocr-cache-hits"] == "1"
    assert fake.ocr_calls == ["shared"]
    (block,) = fake_anthropic.message_requests[0].json()["messages"][0]["content"]
    assert_described(block["text"], "shared")


async def test_a_plain_answer_to_a_committed_stream_arrives_as_its_events(
    make_both: Any, fake: Any
) -> None:
    """The stream was committed while the image was read; the upstream then answered with a
    plain message: the client still gets a well-formed Messages stream, with usage.ocr in its
    message_delta, and the SDK reads it to the end."""
    fake.ocr_delay = 1.0  # far past keepalive_after_s: the 200 is committed meanwhile
    proxy = await make_both(ocr={"keepalive_after_s": 0.2, "keepalive_interval_s": 0.2})
    client = anthropic.AsyncAnthropic(
        base_url=str(proxy.make_url("")).rstrip("/"), api_key="k", max_retries=0
    )
    try:
        async with client.messages.stream(
            model="deepseek-plain-ocr",
            max_tokens=64,
            messages=[
                {
                    "role": "user",
                    "content": [image_block(b64(png("late"))), {"type": "text", "text": "say"}],
                }
            ],
        ) as stream:
            deltas = [e async for e in stream if e.type == "message_delta"]
            final = await stream.get_final_message()
    finally:
        await client.close()
    assert final.content[0].type == "text" and "A picture showing late." in final.content[0].text
    assert final.stop_reason == "end_turn"
    assert len(deltas) == 1
    ocr = (deltas[0].usage.model_extra or {}).get("ocr")
    assert ocr is not None and ocr["images"] == 1 and ocr["input_tokens"] == 100


def test_an_upstream_529_after_the_commit_is_an_overloaded_error_event() -> None:
    """Anthropic's 529 (overloaded) keeps its error type when the proxy must render it."""
    from ocrproxy.dialects.messages import MESSAGES

    event = MESSAGES.upstream_error_event(529, b"<html>busy</html>")
    name, data = event.split(b"\n", 1)
    assert name == b"event: error"
    error = json.loads(data.removeprefix(b"data: "))["error"]
    assert error["type"] == "overloaded_error" and "529" in error["message"]

"""POST /v1/responses end to end: the official openai SDK (and raw HTTP where bytes matter)
through the proxy, against a fake Responses upstream that refuses images as a text-only
provider does; the OCR model is the OpenAI fake's ``vision-1``."""

from __future__ import annotations

import logging
from typing import Any

import openai
import orjson
import pytest

from ocrproxy.dialects.responses import RESPONSES
from ocrproxy.usage import UsageEditor
from tests.fakes import data_url, image_part, label_of

URL = "/v1/responses"
ENCRYPTED = "gAAAAABo-encrypted+reasoning/blob=="


@pytest.fixture
async def proxy(make_responses):
    return await make_responses()


@pytest.fixture
async def sdk(proxy):
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="sk-client", max_retries=0
    )
    yield client
    await client.close()


def image(label: str, **extra: Any) -> dict[str, Any]:
    return {"type": "input_image", "image_url": data_url(label), **extra}


def text(value: str) -> dict[str, str]:
    return {"type": "input_text", "text": value}


def codex_input(label: str = "ui") -> list[dict[str, Any]]:
    """A Codex turn: a user message with a screenshot, an encrypted reasoning item passed back,
    a view_image call and its output holding the same screenshot."""
    return [
        {"type": "message", "role": "user", "content": [text("fix the layout"), image(label)]},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": None,
            "encrypted_content": ENCRYPTED,
        },
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "view_image",
            "arguments": '{"path":"ui.png"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": [image(label)]},
    ]


def sent(fake_responses) -> dict[str, Any]:
    """The last request the Responses upstream got."""
    body: dict[str, Any] = fake_responses.received[-1].json()
    return body


def events_of(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a Responses SSE body; comments are skipped."""
    out = []
    for frame in body.split(b"\n\n"):
        name, data = None, None
        for line in frame.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = orjson.loads(line[6:])
        if data is not None:
            assert name == data["type"]
            out.append((name, data))
    return out


async def test_codex_request_streamed_through_the_sdk(sdk, fake, fake_responses):
    stream = await sdk.responses.create(
        model="glm-5.2-ocr",
        instructions="You are Codex.",
        input=codex_input(),
        store=False,
        stream=True,
        tool_choice="auto",
        parallel_tool_calls=True,
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "high"},
        prompt_cache_key="session-1",
    )
    kinds, delta, completed = [], "", None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            delta += event.delta
        if event.type == "response.completed":
            completed = event.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert completed is not None
    ocr = completed.usage.model_extra["ocr"]
    assert ocr["model"] == "vision-1" and ocr["images"] == 1 and ocr["failures"] == 0
    assert (ocr["input_tokens"], ocr["output_tokens"]) == (100, 20)
    assert completed.usage.input_tokens == 12  # the upstream's own usage, kept
    assert fake.ocr_calls == ["ui"]  # the same screenshot twice: described once

    body = sent(fake_responses)
    assert body["model"] == "glm-5.2"
    assert body["instructions"] == "You are Codex." and body["store"] is False
    assert body["include"] == ["reasoning.encrypted_content"]
    assert body["reasoning"] == {"effort": "high"} and body["prompt_cache_key"] == "session-1"
    user, reasoning, call, output = body["input"]
    assert user["content"][0] == text("fix the layout")
    assert user["content"][1]["type"] == "input_text"
    assert "A picture showing ui." in user["content"][1]["text"]
    assert reasoning == codex_input()[1]  # encrypted reasoning passed back as it was
    assert call == codex_input()[2]
    assert isinstance(output["output"], str)  # a tool output left with text only: a string
    assert output["output"].startswith("[Image 2 ") and "A picture showing ui." in output["output"]
    assert output["call_id"] == "call_1"
    assert delta == "echo: " + output["output"]  # the fake echoed the rewritten tool output


async def test_codex_fields_pass_byte_exact(proxy, fake_responses):
    # Odd spacing, escapes and unknown fields: only the items holding images are re-encoded.
    reasoning = (
        b'{"type" : "reasoning","id":"rs_\\u0031","summary":[ ],'
        b'"encrypted_content":"' + ENCRYPTED.encode() + b'"}'
    )
    instructions = b'"You are \\"Codex\\".\\n\\u00e9"'
    tools = b'[ {"type":"function","name":"view_image","parameters":{"type":"object"}} ]'
    body = (
        b'{"model":"codex-mini-ocr","instructions":' + instructions + b',"store":false,'
        b'"tools":' + tools + b',"x_unknown": {"keep" : [1, 2.50]},'
        b'"previous_response_id":"resp_0","text":{"verbosity" : "low"},"input":['
        + reasoning
        + b',{"role":"user","content":[{"type":"input_image","image_url":"'
        + data_url("odd").encode()
        + b'"}]}]}'
    )
    r = await proxy.post(URL, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200, await r.text()
    upstream = fake_responses.received[-1].body
    for piece in (reasoning, instructions, tools, b'"x_unknown":{"keep" : [1, 2.50]}'):
        assert piece in upstream
    assert b'"previous_response_id":"resp_0"' in upstream
    assert b'"text":{"verbosity" : "low"}' in upstream
    assert orjson.loads(upstream)["model"] == "codex-mini"


async def test_images_in_message_content_of_any_role_and_the_short_form(sdk, fake, fake_responses):
    raw = await sdk.responses.with_raw_response.create(
        model="glm-5.2-ocr",
        input=[
            {"role": "user", "content": [text("what is this?"), image("short", detail="low")]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "a chart", "annotations": []}],
            },
            {"role": "developer", "content": [image("dev")]},
            {"type": "message", "role": "user", "content": [image("long", detail="original")]},
        ],
    )
    response = raw.parse()
    assert response.usage.model_extra["ocr"]["images"] == 3
    assert raw.headers["x-ocr-model"] == "vision-1" and raw.headers["x-ocr-images"] == "3"
    assert raw.headers["x-ocr-cache-hits"] == "0" and "x-ocr-ms" in raw.headers
    assert sorted(fake.ocr_calls) == ["dev", "long", "short"]
    details = {}
    for call in fake.received:  # the OCR calls: the detail each image was sent with
        url = call.json()["messages"][0]["content"][1]["image_url"]
        details[label_of(url["url"])] = url.get("detail")
    assert details == {"short": "low", "dev": None, "long": "high"}  # `original` as `high`
    user, assistant, developer, last = sent(fake_responses)["input"]
    assert "type" not in user and user["content"][0] == text("what is this?")
    assert "A picture showing short." in user["content"][1]["text"]
    assert assistant["content"][0]["text"] == "a chart"
    assert isinstance(developer["content"], list)  # message content stays an array
    assert developer["content"][0]["type"] == "input_text"
    assert "A picture showing long." in last["content"][0]["text"]
    assert response.output_text.startswith("echo: [Image 3 ")  # the fake echoed the block


async def test_custom_tool_and_computer_call_outputs(proxy, fake, fake_responses):
    screenshot = {"type": "computer_screenshot", "image_url": data_url("screen")}
    request = {
        "model": "glm-5.2-ocr",
        "input": [
            {"type": "custom_tool_call", "call_id": "c1", "name": "shot", "input": "x"},
            {
                "type": "custom_tool_call_output",
                "call_id": "c1",
                "output": [text("here it is"), image("custom")],
            },
            {"type": "computer_call", "call_id": "c2", "action": {"type": "screenshot"}},
            {
                "type": "computer_call_output",
                "call_id": "c2",
                "acknowledged_safety_checks": [{"id": "s1"}],
                "output": screenshot,
            },
            {"type": "function_call_output", "call_id": "c3", "output": "plain string"},
            {
                "type": "function_call_output",
                "call_id": "c4",
                "output": [image("mixed"), {"type": "input_file", "file_id": "file-1"}],
            },
        ],
    }
    r = await proxy.post(URL, json=request)
    assert r.status == 200, await r.text()
    assert sorted(fake.ocr_calls) == ["custom", "mixed", "screen"]
    items = sent(fake_responses)["input"]
    assert items[0] == request["input"][0] and items[2] == request["input"][2]
    custom = items[1]["output"]
    assert isinstance(custom, str)  # text only once described: one string, a blank line between
    first, second = custom.split("\n\n", 1)
    assert first == "here it is" and "A picture showing custom." in second
    computer = items[3]
    assert computer["call_id"] == "c2" and computer["acknowledged_safety_checks"] == [{"id": "s1"}]
    assert computer["output"]["type"] == "input_text"
    assert "A picture showing screen." in computer["output"]["text"]
    assert items[4] == request["input"][4]
    mixed = items[5]["output"]  # an input_file is left: the array stays an array
    assert isinstance(mixed, list) and mixed[1] == {"type": "input_file", "file_id": "file-1"}
    assert "A picture showing mixed." in mixed[0]["text"]


async def test_file_id_only_image_is_left_with_a_warning(sdk, fake, fake_responses, caplog):
    caplog.set_level(logging.WARNING, logger="ocrproxy.responses")
    file_image = {"type": "input_image", "file_id": "file-abc", "detail": "auto"}
    screenshot = {"type": "computer_screenshot", "file_id": "file-def"}
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.responses.create(
            model="glm-5.2-ocr",
            input=[
                {"role": "user", "content": [image("seen"), file_image]},
                {"type": "computer_call_output", "call_id": "c", "output": screenshot},
            ],
        )
    # The text-only upstream refuses the image the proxy could not read: its 400 is relayed.
    assert info.value.status_code == 400
    assert "does not support images" in info.value.message
    assert fake.ocr_calls == ["seen"]
    user, computer = sent(fake_responses)["input"]
    assert user["content"][1] == file_image and computer["output"] == screenshot
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("input[0].content[1]" in w for w in warnings)
    assert any("input[1].output" in w for w in warnings)
    assert not any("file-abc" in w for w in warnings)


async def test_string_input_is_forwarded_as_text(sdk, fake, fake_responses):
    raw = await sdk.responses.with_raw_response.create(
        model="glm-5.2-ocr", input="just text", previous_response_id="resp_0"
    )
    response = raw.parse()
    assert response.output_text == "echo: just text"
    assert raw.headers["x-ocr-images"] == "0"
    assert response.usage.model_extra["ocr"]["images"] == 0
    body = sent(fake_responses)
    assert body["input"] == "just text" and body["model"] == "glm-5.2"
    assert body["previous_response_id"] == "resp_0"
    assert fake.ocr_calls == []


async def test_no_input_with_previous_response_id_adds_none(proxy, fake_responses):
    r = await proxy.post(URL, json={"model": "glm-5.2-ocr", "previous_response_id": "resp_0"})
    assert r.status == 200
    body = sent(fake_responses)
    assert body == {"model": "glm-5.2", "previous_response_id": "resp_0"}


async def test_ocr_usage_in_the_raw_stream_only_in_the_final_event(proxy, fake, fake_responses):
    request = {"model": "glm-5.2-ocr", "stream": True, "input": codex_input("raw")}
    r = await proxy.post(URL, json=request)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["X-OCR-Images"] == "1"
    body = await r.read()
    assert b"[DONE]" not in body
    events = events_of(body)
    assert [n for n, _ in events][:2] == ["response.created", "response.in_progress"]
    for name, data in events:
        usage = (data.get("response") or {}).get("usage")
        if name == "response.completed":
            assert usage["ocr"]["images"] == 1 and usage["ocr"]["model"] == "vision-1"
            assert usage["input_tokens"] == 12 and usage["total_tokens"] == 17
        elif usage is not None:
            assert "ocr" not in usage  # response.in_progress's own usage is left alone
    assert events[-1][0] == "response.completed"


async def test_ocr_usage_in_response_incomplete(proxy, fake, fake_responses):
    request = {
        "model": "incomplete-1-ocr",
        "stream": True,
        "input": [{"role": "user", "content": [image("inc")]}],
    }
    body = await (await proxy.post(URL, json=request)).read()
    name, data = events_of(body)[-1]
    assert name == "response.incomplete"
    assert data["response"]["usage"]["ocr"]["images"] == 1


async def test_keepalive_comments_while_ocr_is_slow(make_responses, fake, fake_responses):
    proxy = await make_responses(ocr={"keepalive_after_s": 0.05, "keepalive_interval_s": 0.05})
    fake.ocr_delay = 0.5
    request = {"model": "glm-5.2-ocr", "stream": True, "input": codex_input("slow")}
    r = await proxy.post(URL, json=request)
    assert r.status == 200 and r.headers["X-OCR-Images"] == "1"
    body = await r.read()
    assert body.startswith(b": keep-alive\n\n")  # the first one written at the commit
    assert b": ocr images=1 cache_hits=0" in body
    assert events_of(body)[-1][1]["response"]["usage"]["ocr"]["images"] == 1

    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="sk-client", max_retries=0
    )
    try:
        fake.ocr_delay = 0.5
        stream = await client.responses.create(
            model="glm-5.2-ocr", input=codex_input("slower"), stream=True
        )
        kinds = [event.type async for event in stream]
    finally:
        await client.close()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert fake.ocr_calls == ["slow", "slower"]


async def test_error_after_commit_is_an_error_event(make_responses, fake, fake_responses):
    proxy = await make_responses(
        ocr={"keepalive_after_s": 0.05, "keepalive_interval_s": 0.05, "on_error": "fail"}
    )
    fake.ocr_delay = 0.3
    fake.ocr_fail = {"broken"}
    request = {"model": "glm-5.2-ocr", "stream": True, "input": codex_input("broken")}
    r = await proxy.post(URL, json=request)
    assert r.status == 200
    body = await r.read()
    assert body.startswith(b": keep-alive\n\n")
    events = events_of(body)
    assert len(events) == 1 and body.endswith(b"\n\n")
    name, data = events[0]
    assert name == "error" and data["type"] == "error" and data["code"] == "ocr_failed"
    assert data["message"]
    assert fake_responses.received == []  # nothing was sent upstream

    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="sk-client", max_retries=0
    )
    try:
        stream = await client.responses.create(
            model="glm-5.2-ocr", input=codex_input("broken"), stream=True
        )
        seen = [event async for event in stream]
    finally:
        await client.close()
    assert [e.type for e in seen] == ["error"] and seen[0].code == "ocr_failed"


async def test_upstream_error_after_commit_is_an_error_event(make_responses, fake):
    proxy = await make_responses(ocr={"keepalive_after_s": 0.05, "keepalive_interval_s": 0.05})
    fake.ocr_delay = 0.2
    request = {"model": "fail-400-ocr", "stream": True, "input": codex_input("late")}
    body = await (await proxy.post(URL, json=request)).read()
    name, data = events_of(body)[-1]
    assert name == "error"
    assert (data["code"], data["message"]) == ("x", "bad thing")


async def test_errors_are_openai_shaped(proxy, sdk):
    r = await proxy.post(URL, json={"model": "glm-5.2-ocr", "input": 7})
    assert r.status == 400
    error = (await r.json())["error"]
    assert error["param"] == "input" and error["type"] == "invalid_request_error"

    bad = {"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x/y.png"}]}
    r = await proxy.post(URL, json={"model": "glm-5.2-ocr", "input": [bad]})
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_image"

    with pytest.raises(openai.BadRequestError) as info:
        await sdk.responses.create(
            model="glm-5.2-ocr",
            input=[{"role": "user", "content": [{"type": "input_image", "detail": "auto"}]}],
        )
    assert info.value.body["code"] == "invalid_image"
    assert "input[0].content[0]" in info.value.message

    with pytest.raises(openai.BadRequestError) as redirect:
        await sdk.responses.create(model="glm-5.2", input="hi", extra_body={"base_url": "x"})
    assert redirect.value.body["param"] == "base_url"


async def test_a_wrong_key_is_an_openai_shaped_401(make_responses, fake_responses):
    proxy = await make_responses(auth={"keys": ["sk-right"]})
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="sk-wrong", max_retries=0
    )
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.responses.create(model="glm-5.2-ocr", input="hi")
    finally:
        await client.close()
    assert info.value.body["code"] == "invalid_api_key"
    assert fake_responses.received == []


async def test_without_an_ocr_switch_the_body_goes_byte_for_byte(
    make_responses, fake, fake_responses
):
    proxy = await make_responses(ocr={"fallback_on_rejection": False})  # see test_fallback.py
    body = (
        b'{"model":"glm-5.2", "input":[{"role":"user","content":['
        b'{"type":"input_image","image_url":"' + data_url("raw").encode() + b'"}]}],'
        b'"store" : false}'
    )
    r = await proxy.post(URL, data=body, headers={"Content-Type": "application/json"})
    assert fake_responses.received[-1].body == body
    assert fake.ocr_calls == []
    assert r.status == 400  # the text-only upstream's own refusal, relayed as it was
    error = (await r.json())["error"]
    assert error["param"] == "input[0].content[0]" and error["code"] == "invalid_value"
    assert "X-OCR-Model" not in r.headers


async def test_same_image_in_chat_then_responses_is_described_once(sdk, fake, fake_responses):
    completion = await sdk.chat.completions.create(
        model="gpt-3.5-turbo-ocr",
        messages=[{"role": "user", "content": [image_part(data_url("shared"))]}],
    )
    assert "A picture showing shared." in completion.choices[0].message.content
    response = await sdk.responses.create(
        model="glm-5.2-ocr", input=[{"role": "user", "content": [image("shared")]}]
    )
    assert fake.ocr_calls == ["shared"]
    assert response.usage.model_extra["ocr"]["cache_hits"] == 1
    assert "A picture showing shared." in sent(fake_responses)["input"][0]["content"][0]["text"]


@pytest.mark.parametrize(
    ("model", "sections", "extra"),
    [
        ("glm-5.2", {}, {"extra_body": {"ocr_model": "vision-1"}}),
        ("glm-5.2", {}, {"extra_headers": {"X-OCR-Model": "vision-1"}}),
        ("glm-5.2", {"ocr": {"text_only_models": ["glm-*"]}}, {}),
    ],
    ids=["ocr_model", "header", "text_only_models"],
)
async def test_the_other_ocr_switches(make_responses, fake, fake_responses, model, sections, extra):
    proxy = await make_responses(**sections)
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="sk-client", max_retries=0
    )
    try:
        response = await client.responses.create(
            model=model, input=[{"role": "user", "content": [image("switch")]}], **extra
        )
    finally:
        await client.close()
    assert fake.ocr_calls == ["switch"]
    assert response.usage.model_extra["ocr"]["images"] == 1
    body = sent(fake_responses)
    assert body["model"] == "glm-5.2" and "ocr_model" not in body
    assert "A picture showing switch." in body["input"][0]["content"][0]["text"]


async def test_a_remote_image_url_is_described(make_responses, fake, fake_responses):
    proxy = await make_responses(ocr={"fetch_images": False})
    url = "https://images.example/signed/a.png?X-Amz-Signature=abc"
    remote = {"type": "input_image", "image_url": url, "detail": "auto"}
    request = {"model": "glm-5.2-ocr", "input": [{"role": "user", "content": [remote]}]}
    r = await proxy.post(URL, json=request)
    assert r.status == 200, await r.text()
    assert fake.ocr_calls == [label_of(url)]  # the OCR model was given the URL
    assert sent(fake_responses)["input"][0]["content"][0]["type"] == "input_text"


async def test_a_plain_answer_to_a_committed_stream_becomes_its_final_event(
    make_responses, fake, fake_responses
):
    proxy = await make_responses(ocr={"keepalive_after_s": 0.05, "keepalive_interval_s": 0.05})
    fake.ocr_delay = 0.3
    request = {"model": "plain-1-ocr", "stream": True, "input": codex_input("plain")}
    body = await (await proxy.post(URL, json=request)).read()
    assert body.startswith(b": keep-alive\n\n")
    [(name, data)] = events_of(body)
    assert name == "response.completed"
    assert data["response"]["status"] == "completed"
    assert data["response"]["output"][0]["content"][0]["text"].startswith("echo: [Image 2 ")


@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_the_stream_editor_finds_the_final_usage_however_the_stream_is_cut(piece):
    usage = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
    events = [
        {"type": "response.created", "response": {"id": "r", "usage": None}},
        {"type": "response.in_progress", "response": {"id": "r", "usage": dict(usage)}},
        {"type": "response.output_text.delta", "delta": '{"usage": {"a": 1}}'},
        {"type": "response.completed", "response": {"id": "r", "usage": dict(usage)}},
    ]
    stream = b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )
    editor = UsageEditor({"images": 1}, RESPONSES.stream_usage_path, RESPONSES.stream_usage_events)
    out = b"".join(editor.feed(stream[i : i + piece]) for i in range(0, len(stream), piece))
    out += editor.flush()
    got = [data for _, data in events_of(out)]
    assert got[:3] == events[:3]  # every other event as it came, usage or not
    assert got[3]["response"]["usage"] == {**usage, "ocr": {"images": 1}}

"""The image shapes chat clients really send to /v1/chat/completions, end to end.

Besides ``image_url`` parts, clients that mix dialects send Anthropic-style ``image`` parts and
the Responses API's ``input_image`` parts; agents put images in ``tool`` messages (MCP
screenshots) and ``assistant`` ones (re-sent generated images). ``file`` (PDF) and
``input_audio`` parts are not images and must reach the upstream untouched.
"""

from __future__ import annotations

import base64
import logging
import re
from typing import Any

import openai
from aiohttp import web

from tests.conftest import chat
from tests.fake_anthropic import image_block
from tests.fakes import FakeOpenAI, data_url, image_part, label_of, png

URL = "/v1/chat/completions"


def b64(label: str, size: int = 0) -> str:
    return base64.b64encode(png(label, size)).decode()


def anthropic_part(label: str, media_type: str = "image/png") -> dict[str, Any]:
    """An Anthropic-style image part with a base64 source."""
    source = {"type": "base64", "media_type": media_type, "data": b64(label)}
    return {"type": "image", "source": source}


def input_image(url: str, detail: str | None = None) -> dict[str, Any]:
    """A Responses-style image part: ``image_url`` is the URL string itself."""
    part: dict[str, Any] = {"type": "input_image", "image_url": url}
    if detail is not None:
        part["detail"] = detail
    return part


def ocr_bodies(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [r.json() for r in fake.received if r.json().get("model") == "vision-1"]


def ocr_url(body: dict[str, Any]) -> dict[str, Any]:
    """The ``image_url`` object of an OCR call."""
    image_url: dict[str, Any] = body["messages"][0]["content"][1]["image_url"]
    return image_url


def is_block(text: str, number: int, label: str) -> bool:
    """Whether ``text`` is the whole reference block of image ``number`` showing ``label``."""
    head = re.match(rf"\[Image {number} #([0-9a-f]{{8}}) \(described by vision-1", text)
    return (
        head is not None
        and f"A picture showing {label}." in text
        and text.endswith(f"[End of image {number} #{head[1]}]")
    )


# --- Anthropic-style and Responses-style image parts -------------------------------------------


async def test_anthropic_image_part_is_described_in_place_and_flattened(proxy, fake):
    req = chat("gpt-3.5-turbo-ocr", "before", anthropic_part("cat"), "after")
    r = await proxy.post(URL, json=req)
    assert r.status == 200, await r.text()
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    assert isinstance(content, str)  # only text left: one string, as for image_url parts
    before, block, after = content.split("\n\n")
    assert (before, after) == ("before", "after")
    assert is_block(block, 1, "cat")
    assert fake.ocr_calls == ["cat"]
    # The OCR model gets it as a data URL under the declared media type.
    (body,) = ocr_bodies(fake)
    assert ocr_url(body) == {"url": data_url("cat")}
    assert r.headers["X-OCR-Images"] == "1"


async def test_input_image_parts_data_url_and_remote_url_keep_their_detail(make_proxy, fake):
    proxy = await make_proxy(ocr={"fetch_images": False})
    remote = "https://example.com/shot.png?sig=1"
    req = chat("m-ocr", input_image(data_url("form"), detail="high"), input_image(remote, "low"))
    r = await proxy.post(URL, json=req)
    assert r.status == 200, await r.text()
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    first, second = content.split("\n\n")  # one string: only text is left
    assert is_block(first, 1, "form") and is_block(second, 2, label_of(remote))
    urls = sorted((ocr_url(b)["url"], ocr_url(b).get("detail")) for b in ocr_bodies(fake))
    assert urls == sorted([(data_url("form"), "high"), (remote, "low")])


async def test_anthropic_url_source_without_fetching_goes_to_the_ocr_model(make_proxy, fake):
    proxy = await make_proxy(ocr={"fetch_images": False})
    url = "https://example.com/a.png?sig=2"
    part = {"type": "image", "source": {"type": "url", "url": url}}
    r = await proxy.post(URL, json=chat("m-ocr", part))
    assert r.status == 200, await r.text()
    (body,) = ocr_bodies(fake)
    assert ocr_url(body) == {"url": url}
    assert "described by vision-1" in fake.chat_requests[-1].json()["messages"][0]["content"]


async def test_anthropic_url_source_is_fetched_and_shares_the_inline_images_entry(
    make_proxy, fake, aiohttp_server
):
    served = png("remote", 300)

    async def shot(request: web.Request) -> web.Response:
        return web.Response(body=served, content_type="image/png")

    app = web.Application()
    app.router.add_get("/shot.png", shot)
    images = await aiohttp_server(app)
    proxy = await make_proxy(
        ocr={"allow_private_hosts": ["127.0.0.1"], "allowed_ports": [images.port]}
    )
    url = str(images.make_url("/shot.png"))
    r = await proxy.post(
        URL, json=chat("m-ocr", {"type": "image", "source": {"type": "url", "url": url}})
    )
    assert r.status == 200, await r.text()
    assert fake.ocr_calls == ["remote"]
    (body,) = ocr_bodies(fake)
    assert ocr_url(body)["url"] == "data:image/png;base64," + base64.b64encode(served).decode()
    # The same bytes sent inline as an image_url part: a cache hit, no second OCR call.
    inline = "data:image/png;base64," + base64.b64encode(served).decode()
    r = await proxy.post(URL, json=chat("m-ocr", image_part(inline)))
    assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == "1"
    assert fake.ocr_calls == ["remote"]


async def test_an_image_parts_json_escaped_base64_reaches_the_ocr_model_unescaped(proxy, fake):
    data = b64("???")
    assert "/" in data
    escaped = data.replace("/", "\\/")  # JSON may spell "/" as "\/"
    body = (
        b'{"model":"m-ocr","messages":[{"role":"user","content":[{"type":"image","source":'
        b'{"type":"base64","media_type":"image/png","data":"' + escaped.encode() + b'"}}]}]}'
    )
    r = await proxy.post(URL, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200, await r.text()
    (ocr,) = ocr_bodies(fake)
    assert ocr_url(ocr) == {"url": "data:image/png;base64," + data}
    assert fake.ocr_calls == ["???"]
    # The same bytes unescaped, as an image_url part: the same identity, a cache hit.
    r = await proxy.post(URL, json=chat("m-ocr", image_part("data:image/png;base64," + data)))
    assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == "1"


async def test_the_same_bytes_in_three_shapes_are_one_ocr_call(proxy, fake):
    req = chat(
        "m-ocr",
        image_part(data_url("twin")),
        anthropic_part("twin"),
        input_image(data_url("twin")),
    )
    r = await proxy.post(URL, json=req)
    assert r.status == 200, await r.text()
    assert fake.ocr_calls == ["twin"]
    assert r.headers["X-OCR-Images"] == "1"
    blocks = fake.chat_requests[-1].json()["messages"][0]["content"].split("\n\n")
    assert [is_block(b, n, "twin") for n, b in enumerate(blocks, 1)] == [True] * 3


async def test_an_image_part_after_an_image_url_part_in_a_later_turn_is_a_cache_hit(proxy, fake):
    turn1 = chat("m-ocr", "what is this?", image_part(data_url("receipt")))
    r = await proxy.post(URL, json=turn1)
    assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == "0"
    # A client that re-sends the history in Anthropic's shape, or as input_image.
    for part in (anthropic_part("receipt"), input_image(data_url("receipt"))):
        r = await proxy.post(URL, json=chat("m-ocr", "and now?", part))
        assert r.status == 200, await r.text()
        assert r.headers["X-OCR-Cache-Hits"] == "1"
        assert (
            "A picture showing receipt." in fake.chat_requests[-1].json()["messages"][0]["content"]
        )
    assert fake.ocr_calls == ["receipt"]


async def test_a_chat_image_part_and_a_messages_image_block_share_one_description(make_both, fake):
    proxy = await make_both()
    r = await proxy.post(URL, json=chat("gpt-3.5-turbo-ocr", anthropic_part("shared")))
    assert r.status == 200, await r.text()
    body = {
        "model": "deepseek-chat-ocr",
        "max_tokens": 100,
        "messages": [
            {
                "role": "user",
                "content": [image_block(b64("shared")), {"type": "text", "text": "hi"}],
            }
        ],
    }
    r = await proxy.post("/v1/messages", json=body)
    assert r.status == 200, await r.text()  # the fake refuses image blocks: it got text
    assert r.headers["X-OCR-Cache-Hits"] == "1"
    assert fake.ocr_calls == ["shared"]


async def test_a_rewritten_array_with_another_part_stays_an_array(proxy, fake):
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    req = chat("m-ocr", anthropic_part("a"), audio, input_image(data_url("b")))
    r = await proxy.post(URL, json=req)
    assert r.status == 200, await r.text()
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    assert [p["type"] for p in content] == ["text", "input_audio", "text"]
    assert set(content[0]) == {"type", "text"} and is_block(content[0]["text"], 1, "a")
    assert content[1] == audio
    assert set(content[2]) == {"type", "text"} and is_block(content[2]["text"], 2, "b")


async def test_image_parts_given_only_by_reference_pass_on_with_a_warning(proxy, fake, caplog):
    by_file = {"type": "image", "source": {"type": "file", "file_id": "file_011CN"}}
    by_id = {"type": "input_image", "file_id": "file-abc", "detail": "auto"}
    with caplog.at_level(logging.WARNING):
        r = await proxy.post(URL, json=chat("m-ocr", by_file, by_id, image_part(data_url("x"))))
    assert r.status == 200, await r.text()
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    assert content[:2] == [by_file, by_id]
    assert is_block(content[2]["text"], 1, "x")
    assert fake.ocr_calls == ["x"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Files API image at messages[0].content[0]" in m for m in warned)
    assert any("file_id image at messages[0].content[1]" in m for m in warned)


async def test_malformed_image_and_input_image_parts_are_the_clients_400(proxy, fake):
    cases = [
        (
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": 7}},
            "messages[0].content[0]",
        ),
        (
            {"type": "image", "source": {"type": "url", "url": "ftp://x/a.png"}},
            "messages[0].content[0]",
        ),
        (
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "application/pdf", "data": b64("p")},
            },
            "messages[0].content[0]",
        ),
        (input_image("file:///etc/passwd"), "messages[0].content[0].image_url"),
        ({"type": "input_image", "detail": "auto"}, "messages[0].content[0].image_url"),
        (input_image("data:image/png;base64,QR=="), "messages[0].content[0]"),
    ]
    for part, param in cases:
        r = await proxy.post(URL, json=chat("m-ocr", part))
        assert r.status == 400, (part, await r.text())
        error = (await r.json())["error"]
        assert error["param"] == param, (part, error)
    assert fake.chat_requests == [] and fake.ocr_calls == []


async def test_new_image_shapes_count_toward_max_images(make_proxy, fake):
    proxy = await make_proxy(ocr={"max_images": 2})
    req = chat("m-ocr", image_part(data_url("1")), anthropic_part("2"), input_image(data_url("3")))
    r = await proxy.post(URL, json=req)
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "too_many_images"
    assert fake.ocr_calls == []


async def test_without_ocr_the_new_shapes_are_forwarded_byte_for_byte(proxy, fake):
    # Regression (held before these shapes were found): no OCR switch, no rewrite at all.
    body = (
        b'{"model":"gpt-3.5-turbo","messages":[{"role":"user","content":[ {"type":"image",'
        b' "source":{"type":"base64","media_type":"image/png","data":"'
        + b64("n").encode()
        + b'"}}, {"type":"input_image","image_url":"'
        + data_url("m").encode()
        + b'"}]}]}'
    )
    r = await proxy.post(URL, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200
    assert fake.chat_requests[-1].body == body
    assert fake.ocr_calls == []


async def test_the_openai_sdk_sends_an_anthropic_style_image_part(proxy, fake):
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="sk-client", max_retries=0
    )
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-3.5-turbo-ocr",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what does it say?"},
                        anthropic_part("invoice"),  # not in the SDK's types: sent as given
                    ],
                }
            ],
            extra_body={"metadata": {"client": "mixed-dialects"}},
        )
    finally:
        await client.close()
    completion = raw.parse()
    assert "A picture showing invoice." in completion.choices[0].message.content
    assert completion.usage.model_extra["ocr"]["images"] == 1
    assert raw.headers["x-ocr-images"] == "1"
    sent = fake.chat_requests[-1].json()
    assert sent["metadata"] == {"client": "mixed-dialects"}
    text, block = sent["messages"][0]["content"].split("\n\n", 1)
    assert text == "what does it say?" and is_block(block, 1, "invoice")
    assert fake.ocr_calls == ["invoice"]


# --- tool and assistant messages (regression: these were already scanned) ---------------------


async def test_qwen_code_mcp_screenshot_in_a_tool_message_becomes_a_string(proxy, fake):
    call = {
        "id": "call_7f3a",
        "type": "function",
        "function": {"name": "mcp__playwright__browser_take_screenshot", "arguments": "{}"},
    }
    messages = [
        {"role": "system", "content": "You are Qwen Code."},
        {"role": "user", "content": "Open the page and check the layout."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {
            "role": "tool",
            "tool_call_id": "call_7f3a",
            "content": [
                {"type": "text", "text": "Took the viewport screenshot"},
                {"type": "image_url", "image_url": {"url": data_url("viewport")}},
            ],
        },
    ]
    r = await proxy.post(URL, json={"model": "qwen3-coder-ocr", "messages": messages})
    assert r.status == 200, await r.text()
    sent = fake.chat_requests[-1].json()["messages"]
    assert sent[:3] == messages[:3]
    tool = sent[3]
    assert set(tool) == {"role", "tool_call_id", "content"}
    assert (tool["role"], tool["tool_call_id"]) == ("tool", "call_7f3a")
    assert isinstance(tool["content"], str)  # text only: a string, as strict servers want
    text, block = tool["content"].split("\n\n")
    assert text == "Took the viewport screenshot" and is_block(block, 1, "viewport")
    assert fake.ocr_calls == ["viewport"]


async def test_a_tool_message_holding_only_an_image_becomes_a_string(proxy, fake):
    messages = [
        {"role": "user", "content": "screenshot please"},
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": [anthropic_part("only")],  # mixed dialects in a tool message too
        },
    ]
    r = await proxy.post(URL, json={"model": "m-ocr", "messages": messages})
    assert r.status == 200, await r.text()
    tool = fake.chat_requests[-1].json()["messages"][1]
    assert tool["tool_call_id"] == "call_1"
    assert isinstance(tool["content"], str) and is_block(tool["content"], 1, "only")


async def test_an_assistant_message_re_sending_a_generated_image_becomes_a_string(proxy, fake):
    messages = [
        {"role": "user", "content": "draw a red square"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Here is your image:"},
                {"type": "image_url", "image_url": {"url": data_url("red square")}},
            ],
        },
        {"role": "user", "content": "now make it blue"},
    ]
    r = await proxy.post(URL, json={"model": "m-ocr", "messages": messages})
    assert r.status == 200, await r.text()
    sent = fake.chat_requests[-1].json()["messages"]
    assert sent[0] == messages[0] and sent[2] == messages[2]
    assert sent[1]["role"] == "assistant"
    text, block = sent[1]["content"].split("\n\n")
    assert text == "Here is your image:" and is_block(block, 1, "red square")
    assert fake.ocr_calls == ["red square"]


async def test_an_assistant_message_replaying_an_input_image_becomes_a_string(proxy, fake):
    # hermes-agent replayed a generated image as `input_image` in the assistant turn.
    messages = [
        {"role": "user", "content": "generate a logo"},
        {"role": "assistant", "content": [input_image(data_url("logo"))]},
        {"role": "user", "content": "thanks"},
    ]
    r = await proxy.post(URL, json={"model": "m-ocr", "messages": messages})
    assert r.status == 200, await r.text()
    assistant = fake.chat_requests[-1].json()["messages"][1]
    assert isinstance(assistant["content"], str) and is_block(assistant["content"], 1, "logo")


# --- file (PDF) and input_audio parts (regression: these were already left alone) -------------

PDF = base64.b64encode(b"%PDF-1.7\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n").decode()
# Sent with the client's own spacing and key order, to be found again byte for byte.
FILE_PART = (
    b'{ "type" : "file",  "file": {"filename":"spec.pdf", "file_data":'
    b'"data:application/pdf;base64,' + PDF.encode() + b'"} }'
)
AUDIO_PART = b'{"input_audio":{"format":"wav","data":"UklGRiQAAABXQVZF"},"type":"input_audio"}'


async def test_file_and_input_audio_parts_reach_the_upstream_byte_identical(proxy, fake):
    body = (
        b'{"model":"m-ocr","messages":[{"role":"user","content":[{"type":"text","text":"read"},'
        + FILE_PART
        + b","
        + AUDIO_PART
        + b',{"type":"image_url","image_url":{"url":"'
        + data_url("scan").encode()
        + b'"}}]}]}'
    )
    r = await proxy.post(URL, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200, await r.text()
    upstream = fake.chat_requests[-1]
    # The array was rebuilt around them (the image became text) ...
    content = upstream.json()["messages"][0]["content"]
    assert [p["type"] for p in content] == ["text", "file", "input_audio", "text"]
    assert is_block(content[3]["text"], 1, "scan")
    # ... and they are spliced back exactly as the client wrote them.
    assert FILE_PART in upstream.body and AUDIO_PART in upstream.body
    # Neither is an image: one OCR call, one image counted.
    assert fake.ocr_calls == ["scan"]
    assert r.headers["X-OCR-Images"] == "1"
    assert (await r.json())["usage"]["ocr"]["images"] == 1


async def test_file_and_input_audio_parts_do_not_count_toward_max_images(make_proxy, fake):
    proxy = await make_proxy(ocr={"max_images": 1})
    body = (
        b'{"model":"m-ocr","messages":[{"role":"user","content":['
        + FILE_PART
        + b","
        + AUDIO_PART
        + b","
        + FILE_PART
        + b',{"type":"image_url","image_url":"'
        + data_url("one").encode()
        + b'"}]}]}'
    )
    r = await proxy.post(URL, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200, await r.text()  # one image, under max_images = 1
    upstream = fake.chat_requests[-1]
    assert upstream.body.count(FILE_PART) == 2 and AUDIO_PART in upstream.body
    assert fake.ocr_calls == ["one"]
    assert r.headers["X-OCR-Images"] == "1"


async def test_file_and_input_audio_parts_without_images_are_kept_as_an_array(proxy, fake):
    body = (
        b'{"model":"m-ocr","messages":[{"role":"user","content":[{"type":"text","text":"hi"},'
        + FILE_PART
        + b","
        + AUDIO_PART
        + b"]}]}"
    )
    r = await proxy.post(URL, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200, await r.text()
    upstream = fake.chat_requests[-1]
    content = upstream.json()["messages"][0]["content"]
    assert [p["type"] for p in content] == ["text", "file", "input_audio"]  # not flattened
    assert FILE_PART in upstream.body and AUDIO_PART in upstream.body
    assert fake.ocr_calls == [] and r.headers["X-OCR-Images"] == "0"

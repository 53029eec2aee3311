"""End-to-end chat-completions behaviour through the proxy against the fake upstream."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time

import orjson

from tests.conftest import chat, encode
from tests.fakes import data_url, image_part, png

URL = "/v1/chat/completions"


async def test_request_without_ocr_is_forwarded_byte_for_byte(proxy, fake):
    # Odd spacing, key order, a big integer and an image: none of it may be touched.
    body = (
        b'{ "model" : "gpt-3.5-turbo",  "messages":[{"role":"user","content":[{"type":"text",'
        b'"text":"hi"},{"type":"image_url","image_url":{"url":"'
        + data_url("x").encode()
        + b'"}}]}],'
        b' "seed": 123456789012345678901234567890, "temperature":0.50 }'
    )
    r = await proxy.post(URL, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200
    assert fake.chat_requests[-1].body == body
    assert fake.ocr_calls == []
    assert "X-OCR-Model" not in r.headers


async def test_suffix_strips_model_and_replaces_image_in_place(proxy, fake):
    req = chat("gpt-3.5-turbo-ocr", "before", image_part(data_url("cat")), "after")
    r = await proxy.post(URL, json=req)
    assert r.status == 200
    sent = fake.chat_requests[-1].json()
    assert sent["model"] == "gpt-3.5-turbo"
    content = sent["messages"][0]["content"]
    assert isinstance(content, str)  # flattened: only text left
    before, block, after = content.split("\n\n")
    assert (before, after) == ("before", "after")
    # The delimiters carry the request's nonce (8 hex digits), the same in both.
    head = re.match(r"\[Image 1 #([0-9a-f]{8}) \(described by vision-1", block)
    assert head is not None
    assert "A picture showing cat." in block
    assert block.endswith(f"[End of image 1 #{head[1]}]")
    assert fake.ocr_calls == ["cat"]


async def test_ocr_model_field_selects_describer_and_is_removed(proxy, fake):
    req = chat("deepseek-chat", "look", image_part(data_url("dog")), ocr_model="vision-pro")
    r = await proxy.post(URL, json=req)
    assert r.status == 200
    sent = fake.chat_requests[-1].json()
    assert "ocr_model" not in sent
    assert sent["model"] == "deepseek-chat"
    assert "described by vision-pro" in sent["messages"][0]["content"]
    ocr_request = next(r.json() for r in fake.received if r.json().get("model") == "vision-pro")
    parts = ocr_request["messages"][0]["content"]
    assert parts[0]["type"] == "text" and "Transcribe ALL visible text" in parts[0]["text"]
    assert parts[1]["image_url"]["url"] == data_url("dog")
    assert ocr_request["stream"] is False and ocr_request["max_tokens"] > 0
    assert r.headers["X-OCR-Model"] == "vision-pro"


async def test_suffix_and_ocr_model_together(proxy, fake):
    req = chat("gpt-4o-ocr", image_part(data_url("a")), ocr_model="vision-x")
    r = await proxy.post(URL, json=req)
    assert r.status == 200
    sent = fake.chat_requests[-1].json()
    assert sent["model"] == "gpt-4o"  # a model that can see still gets OCR: the user asked
    assert "described by vision-x" in sent["messages"][0]["content"]


async def test_every_other_field_reaches_upstream_exactly(proxy, fake):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    extra = {
        "temperature": 0.3,
        "top_p": 0.9,
        "n": 2,
        "stop": ["END"],
        "max_tokens": 77,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"50256": -100},
        "user": "u-1",
        "tools": tools,
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "seed": 7,
        "vendor_field": {"nested": [1, 2.5, None, True]},
    }
    messages = [
        {"role": "system", "content": "sys", "name": "boss"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "result"},
        {"role": "user", "content": [image_part(data_url("chart"), detail="high")]},
    ]
    req = {"model": "gpt-3.5-turbo-ocr", "messages": messages, **extra}
    r = await proxy.post(URL, json=req)
    assert r.status == 200
    sent = fake.chat_requests[-1].json()
    for key, value in extra.items():
        assert sent[key] == value, key
    assert sent["messages"][:3] == messages[:3]
    assert "A picture showing chart." in sent["messages"][3]["content"]
    ocr_request = next(r.json() for r in fake.received if r.json().get("model") == "vision-1")
    assert ocr_request["messages"][0]["content"][1]["image_url"]["detail"] == "high"


async def test_images_in_every_role_and_bare_string_url(proxy, fake):
    messages = [
        {"role": "system", "content": [{"type": "image_url", "image_url": data_url("s")}]},
        {"role": "user", "content": [{"type": "text", "text": "q"}, image_part(data_url("u"))]},
        {"role": "assistant", "content": [image_part(data_url("a"))]},
        {"role": "user", "content": "plain string stays"},
    ]
    r = await proxy.post(URL, json={"model": "m-ocr", "messages": messages})
    assert r.status == 200
    sent = fake.chat_requests[-1].json()["messages"]
    assert "Image 1" in sent[0]["content"] and "showing s." in sent[0]["content"]
    assert sent[1]["content"].startswith("q\n\n[Image 2")
    assert "Image 3" in sent[2]["content"] and "showing a." in sent[2]["content"]
    assert sent[3]["content"] == "plain string stays"
    assert sorted(fake.ocr_calls) == ["a", "s", "u"]


async def test_content_array_with_non_text_part_stays_an_array(proxy, fake):
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    cached_text = {"type": "text", "text": "t", "cache_control": {"type": "ephemeral"}}
    req = chat("m-ocr", image_part(data_url("i")), audio, cached_text)
    r = await proxy.post(URL, json=req)
    assert r.status == 200
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    assert content[0]["type"] == "text" and "showing i." in content[0]["text"]
    assert content[1] == audio
    assert content[2] == cached_text


async def test_text_only_arrays_are_flattened_even_without_images(proxy, fake):
    r = await proxy.post(URL, json=chat("m-ocr", "one", "two"))
    assert r.status == 200
    assert fake.chat_requests[-1].json()["messages"][0]["content"] == "one\n\ntwo"
    assert r.headers["X-OCR-Images"] == "0"


async def test_remote_url_is_passed_to_ocr_model_as_is(make_proxy, fake):
    proxy = await make_proxy(ocr={"fetch_images": False})  # fetching: see test_fetch.py
    url = "https://example.com/a.png?sig=1"
    r = await proxy.post(URL, json=chat("m-ocr", image_part(url)))
    assert r.status == 200
    ocr_request = next(r.json() for r in fake.received if r.json().get("model") == "vision-1")
    assert ocr_request["messages"][0]["content"][1]["image_url"]["url"] == url


async def test_same_image_twice_in_one_request_is_described_once(proxy, fake):
    img = data_url("twin")
    r = await proxy.post(URL, json=chat("m-ocr", image_part(img), "and", image_part(img)))
    assert r.status == 200
    assert fake.ocr_calls == ["twin"]
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    assert "[Image 1 " in content and "[Image 2 " in content
    assert content.count("A picture showing twin.") == 2
    assert r.headers["X-OCR-Images"] == "1"


async def test_four_images_are_described_concurrently(proxy, fake):
    fake.ocr_delay = 0.3
    req = chat("m-ocr", *(image_part(data_url(f"img{i}")) for i in range(4)))
    started = time.monotonic()
    r = await proxy.post(URL, json=req)
    elapsed = time.monotonic() - started
    assert r.status == 200
    assert sorted(fake.ocr_calls) == ["img0", "img1", "img2", "img3"]
    assert fake.ocr_peak == 4  # all four were in flight at once
    assert elapsed < 1.2  # sequential would take at least 1.2 s


async def test_concurrency_limit_holds(make_proxy, fake):
    proxy = await make_proxy(ocr={"max_concurrency": 2})
    fake.ocr_delay = 0.1
    req = chat("m-ocr", *(image_part(data_url(f"c{i}")) for i in range(6)))
    r = await proxy.post(URL, json=req)
    assert r.status == 200
    assert len(fake.ocr_calls) == 6
    assert fake.ocr_peak == 2


async def test_second_turn_of_conversation_hits_cache(proxy, fake):
    img = data_url("screenshot")
    turn1 = {"model": "m-ocr", "messages": [{"role": "user", "content": [image_part(img)]}]}
    r1 = await proxy.post(URL, json=turn1)
    assert r1.status == 200 and r1.headers["X-OCR-Cache-Hits"] == "0"
    turn2 = {
        "model": "m-ocr",
        "messages": [
            {"role": "user", "content": [image_part(img)]},
            {"role": "assistant", "content": "It is a screenshot."},
            {"role": "user", "content": "What app?"},
        ],
    }
    r2 = await proxy.post(URL, json=turn2)
    assert r2.status == 200
    assert fake.ocr_calls == ["screenshot"]
    assert r2.headers["X-OCR-Cache-Hits"] == "1"
    usage = (await r2.json())["usage"]["ocr"]
    assert usage == {
        "model": "vision-1",
        "images": 1,
        "cache_hits": 1,
        "failures": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
    }


async def test_concurrent_identical_images_make_one_ocr_call(proxy, fake):
    fake.ocr_delay = 0.2
    req = chat("m-ocr", image_part(data_url("shared")))
    responses = await asyncio.gather(*(proxy.post(URL, json=req) for _ in range(5)))
    assert [r.status for r in responses] == [200] * 5
    assert fake.ocr_calls == ["shared"]
    hits = sorted(int(r.headers["X-OCR-Cache-Hits"]) for r in responses)
    assert hits == [0, 1, 1, 1, 1]


async def test_cache_key_includes_ocr_model(proxy, fake):
    img = image_part(data_url("k"))
    await proxy.post(URL, json=chat("m", img, ocr_model="vision-a"))
    await proxy.post(URL, json=chat("m", img, ocr_model="vision-b"))
    await proxy.post(URL, json=chat("m", img, ocr_model="vision-a"))
    assert fake.ocr_calls == ["k", "k"]


async def test_ocr_failure_placeholder_then_retry_next_time(proxy, fake):
    fake.ocr_fail = {"broken"}
    req = chat("m-ocr", image_part(data_url("broken")), image_part(data_url("fine")))
    r = await proxy.post(URL, json=req)
    assert r.status == 200
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    assert re.search(r"Image 1 #[0-9a-f]{8}: this image could not be analysed", content)
    assert "A picture showing fine." in content
    assert "vision backend down" not in content  # the reason is logged, not sent to the model
    # failures are not cached: the next request tries again
    fake.ocr_fail = set()
    r = await proxy.post(URL, json=req)
    assert "A picture showing broken." in fake.chat_requests[-1].json()["messages"][0]["content"]
    assert fake.ocr_calls.count("broken") == 2 and fake.ocr_calls.count("fine") == 1


async def test_ocr_failure_policy_fail_answers_502(make_proxy, fake, caplog):
    proxy = await make_proxy(ocr={"on_error": "fail"})
    fake.ocr_fail = {"bad"}
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("bad"))))
    assert r.status == 502
    error = (await r.json())["error"]
    assert error["code"] == "ocr_failed" and "messages[0].content[0]" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fake.chat_requests == []
    assert any("OCR failed" in rec.getMessage() for rec in caplog.records)


async def test_ocr_timeout_is_a_failure(make_proxy, fake):
    proxy = await make_proxy(ocr={"timeout_s": 0.2})
    fake.ocr_delay = 2
    started = time.monotonic()
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("slow"))))
    assert r.status == 200
    assert time.monotonic() - started < 1.5
    assert "could not be analysed" in fake.chat_requests[-1].json()["messages"][0]["content"]


async def test_usage_gains_ocr_costs_and_headers(proxy, fake):
    req = chat("m-ocr", image_part(data_url("p")), image_part(data_url("q")))
    r = await proxy.post(URL, json=req)
    body = await r.json()
    assert body["usage"]["prompt_tokens"] == 11  # upstream numbers kept
    assert body["usage"]["ocr"] == {
        "model": "vision-1",
        "images": 2,
        "cache_hits": 0,
        "failures": 0,
        "prompt_tokens": 200,
        "completion_tokens": 40,
        "total_tokens": 240,
    }
    assert r.headers["X-OCR-Images"] == "2"
    assert r.headers["X-OCR-Cache-Hits"] == "0"
    assert float(r.headers["X-OCR-Ms"]) >= 0
    assert len(r.headers["X-Request-Id"]) >= 16
    assert r.headers["X-Upstream-Request-Id"] == "upstream-req-1"


async def test_request_id_is_kept_from_client(proxy):
    r = await proxy.post(URL, json=chat("m-ocr", "x"), headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    r = await proxy.post(URL, json=chat("m-ocr", "x"), headers={"X-Request-Id": "bad id\u00e9"})
    assert r.headers["X-Request-Id"] != "bad id\u00e9"


# -- streaming -------------------------------------------------------------------------------


async def read_events(response) -> list[bytes]:
    raw = await response.read()
    return [e for e in raw.split(b"\n\n") if e]


async def test_stream_is_relayed_with_sse_headers(proxy, fake):
    req = chat("m-ocr", image_part(data_url("s")), stream=True)
    r = await proxy.post(URL, json=req)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["Cache-Control"] == "no-cache"
    assert r.headers["X-Accel-Buffering"] == "no"
    assert r.headers["X-OCR-Images"] == "1"
    events = await read_events(r)
    assert events[-1] == b"data: [DONE]"
    deltas = [orjson.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert deltas == [f"t{i} " for i in range(5)]


async def test_stream_usage_chunk_gains_ocr(proxy, fake):
    req = chat(
        "m-ocr", image_part(data_url("u")), stream=True, stream_options={"include_usage": True}
    )
    r = await proxy.post(URL, json=req)
    events = await read_events(r)
    chunks = [orjson.loads(e[6:]) for e in events if e != b"data: [DONE]"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["usage"]["prompt_tokens"] == 11
    assert chunks[-1]["usage"]["ocr"]["images"] == 1
    assert chunks[-1]["usage"]["ocr"]["total_tokens"] == 120


async def test_stream_arrives_chunk_by_chunk(proxy, fake):
    fake.chunk_delay = 0.3
    req = chat("m-ocr", image_part(data_url("c")), stream=True)
    started = time.monotonic()
    r = await proxy.post(URL, json=req)
    first = await r.content.readuntil(b"\n\n")
    first_at = time.monotonic() - started
    rest = await r.read()
    total = time.monotonic() - started
    assert first.startswith(b"data: ")
    assert rest.endswith(b"data: [DONE]\n\n")
    assert first_at < 0.25 and total > 1.2  # the first chunk did not wait for the last


async def test_slow_ocr_stream_gets_keepalives_then_data(make_proxy, fake):
    proxy = await make_proxy(ocr={"keepalive_after_s": 0.1, "keepalive_interval_s": 0.1})
    fake.ocr_delay = 0.5
    req = chat("m-ocr", image_part(data_url("k")), stream=True)
    started = time.monotonic()
    r = await proxy.post(URL, json=req)
    headers_at = time.monotonic() - started
    assert r.status == 200 and headers_at < 0.4  # committed before OCR finished
    assert r.headers["X-OCR-Images"] == "1"
    body = await r.read()
    assert body.startswith(b": keep-alive\n\n")
    assert b": ocr images=1 cache_hits=0" in body
    assert body.endswith(b"data: [DONE]\n\n")
    assert "showing k." in fake.chat_requests[-1].json()["messages"][0]["content"]


async def test_error_after_keepalive_is_an_error_event(make_proxy, fake):
    proxy = await make_proxy(
        ocr={"keepalive_after_s": 0.05, "keepalive_interval_s": 0.05, "on_error": "fail"}
    )
    fake.ocr_delay = 0.3
    fake.ocr_fail = {"x"}
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("x")), stream=True))
    assert r.status == 200
    body = await r.read()
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert len(events) == 1
    error = orjson.loads(events[0][6:])["error"]
    assert error["code"] == "ocr_failed"
    assert fake.chat_requests == []


async def test_upstream_error_after_keepalive_is_relayed_as_event(make_proxy, fake):
    proxy = await make_proxy(ocr={"keepalive_after_s": 0.05, "keepalive_interval_s": 0.05})
    fake.ocr_delay = 0.2
    r = await proxy.post(URL, json=chat("fail-400-ocr", image_part(data_url("e")), stream=True))
    body = await r.read()
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert orjson.loads(events[-1][6:])["error"]["message"] == "bad thing"


async def test_client_disconnect_closes_upstream_stream(proxy, fake):
    req = chat("slow-stream-ocr", image_part(data_url("d")), stream=True)
    r = await proxy.post(URL, json=req)
    await r.content.readuntil(b"\n\n")
    r.close()  # the client goes away mid-stream
    await asyncio.wait_for(fake.stream_closed.wait(), timeout=3)


async def test_client_disconnect_during_ocr_cancels_ocr(proxy, fake):
    fake.ocr_delay = 5
    req = chat("m-ocr", image_part(data_url("gone")), stream=True)
    task = asyncio.ensure_future(proxy.post(URL, json=req))
    while not fake.ocr_calls:
        await asyncio.sleep(0.01)
    task.cancel()  # the client gives up while the image is being described
    try:
        await task
    except asyncio.CancelledError:
        pass
    deadline = time.monotonic() + 3
    while fake.ocr_active and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert fake.ocr_active == 0  # the OCR call was cancelled, not left running
    assert fake.chat_requests == []


# -- errors ----------------------------------------------------------------------------------


async def error_of(r, status: int) -> dict:
    assert r.status == status, await r.text()
    body = await r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_invalid_json_is_400(proxy):
    r = await proxy.post(URL, data=b"{not json", headers={"Content-Type": "application/json"})
    await error_of(r, 400)


async def test_not_an_object_is_400(proxy):
    r = await proxy.post(URL, data=b"[1,2]", headers={"Content-Type": "application/json"})
    await error_of(r, 400)


async def test_missing_model_or_messages_is_400(proxy, fake):
    error = await error_of(await proxy.post(URL, json={"messages": []}), 400)
    assert error["param"] == "model"
    error = await error_of(await proxy.post(URL, json={"model": "m"}), 400)
    assert error["param"] == "messages"
    error = await error_of(await proxy.post(URL, json={"model": "m", "messages": "hi"}), 400)
    assert error["param"] == "messages"
    error = await error_of(await proxy.post(URL, json={"model": 5, "messages": []}), 400)
    assert error["param"] == "model"
    assert fake.received == []


async def test_malformed_data_url_names_message_and_part(proxy, fake):
    req = {
        "model": "m-ocr",
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "t"},
                    image_part("data:image/png;base64,@@@notbase64"),
                ],
            },
        ],
    }
    error = await error_of(await proxy.post(URL, json=req), 400)
    assert "messages[1].content[1]" in error["message"]
    assert error["code"] == "invalid_image"
    no_comma = chat("m-ocr", image_part("data:image/png;base64"))
    error = await error_of(await proxy.post(URL, json=no_comma), 400)
    assert "messages[0].content[0]" in error["message"]
    not_b64 = chat("m-ocr", image_part("data:image/png," + "abc"))
    await error_of(await proxy.post(URL, json=not_b64), 400)
    ftp = chat("m-ocr", image_part("ftp://host/x.png"))
    await error_of(await proxy.post(URL, json=ftp), 400)
    assert fake.received == []


async def test_wrongly_shaped_content_is_400_not_500(proxy, fake):
    for content in ([1, 2], [{"no_type": 1}], [{"type": "image_url", "image_url": 5}]):
        req = {"model": "m-ocr", "messages": [{"role": "user", "content": content}]}
        await error_of(await proxy.post(URL, json=req), 400)
    req = {"model": "m-ocr", "messages": ["not an object"]}
    await error_of(await proxy.post(URL, json=req), 400)
    assert fake.received == []


async def test_body_over_limit_is_413(make_proxy, fake):
    proxy = await make_proxy(server={"max_body_bytes": 4096})
    big = chat("m-ocr", image_part(data_url("big", size=8000)))
    error = await error_of(await proxy.post(URL, json=big), 413)
    assert error["code"] == "payload_too_large"
    assert fake.received == []


async def test_upstream_error_status_and_body_are_relayed(proxy):
    r = await proxy.post(URL, json=chat("fail-500", "x"))
    assert r.status == 500
    assert (await r.json())["error"]["message"] == "upstream exploded"
    r = await proxy.post(URL, json=chat("fail-400-ocr", image_part(data_url("z"))))
    assert r.status == 400
    assert (await r.json())["error"]["message"] == "bad thing"


async def test_upstream_unreachable_is_502(make_proxy, fake, unused_tcp_port):
    proxy = await make_proxy(
        upstreams=[{"base_url": f"http://127.0.0.1:{unused_tcp_port}/v1", "api_key": "sk-u"}]
    )
    error = await error_of(await proxy.post(URL, json=chat("m", "x")), 502)
    assert error["code"] == "bad_gateway"
    assert str(unused_tcp_port) not in error["message"]


async def test_upstream_timeout_is_504(make_proxy, fake):
    proxy = await make_proxy(
        upstreams=[{"base_url": fake.url, "api_key": "sk-u", "read_timeout_s": 0.3}]
    )
    error = await error_of(await proxy.post(URL, json=chat("hang", "x")), 504)
    assert error["code"] == "gateway_timeout"


async def test_unknown_model_route_is_404(make_proxy, fake):
    proxy = await make_proxy(
        upstreams=[{"base_url": fake.url, "api_key": "sk-u", "models": ["gpt-*"]}]
    )
    error = await error_of(await proxy.post(URL, json=chat("claude-3", "x")), 404)
    assert error["code"] == "model_not_found"


async def test_payload_bytes_untouched_by_proxy_encoding(proxy, fake):
    # A large image in an OCR request: the OCR model receives exactly the client's data URL.
    img = data_url("large", size=300_000)
    r = await proxy.post(URL, data=encode(chat("m-ocr", image_part(img))))
    assert r.status == 200
    ocr_request = next(r.json() for r in fake.received if r.json().get("model") == "vision-1")
    sent_url = ocr_request["messages"][0]["content"][1]["image_url"]["url"]
    assert base64.b64decode(sent_url.partition(",")[2]) == png("large", 300_000)


# -- OCR retries -------------------------------------------------------------------------------


async def test_ocr_retries_on_429_and_5xx_then_succeeds(make_proxy, fake):
    proxy = await make_proxy(ocr={"retries": 2, "retry_backoff_s": 0.01})
    fake.ocr_flaky = {"flaky": [429, 503]}
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("flaky"))))
    assert r.status == 200
    assert fake.ocr_calls == ["flaky"] * 3
    assert "A picture showing flaky." in fake.chat_requests[-1].json()["messages"][0]["content"]


async def test_large_image_is_sent_whole_on_every_retry(make_proxy, fake):
    # A long image URL goes to the OCR model in pieces: each attempt sends the whole body again,
    # with a Content-Length (not chunked), byte for byte the JSON of the request.
    proxy = await make_proxy(ocr={"retries": 2, "retry_backoff_s": 0.01})
    fake.ocr_flaky = {"bigflaky": [503, 502]}
    img = data_url("bigflaky", size=700_000)
    r = await proxy.post(URL, json=chat("m-ocr", image_part(img, detail='hi "\\/ é')))
    assert r.status == 200
    assert fake.ocr_calls == ["bigflaky"] * 3
    calls = [r for r in fake.received if r.json().get("model") == "vision-1"]
    assert len(calls) == 3
    for call in calls:
        assert call.headers["Content-Length"] == str(len(call.body))
        assert "Transfer-Encoding" not in call.headers
        assert call.body == orjson.dumps(orjson.loads(call.body))
        part = call.json()["messages"][0]["content"][1]
        assert part == {"type": "image_url", "image_url": {"url": img, "detail": 'hi "\\/ é'}}
    assert "A picture showing bigflaky." in fake.chat_requests[-1].json()["messages"][0]["content"]


async def test_ocr_retries_are_bounded(make_proxy, fake):
    proxy = await make_proxy(ocr={"retries": 1, "retry_backoff_s": 0.01})
    fake.ocr_flaky = {"down": [503, 503, 503]}
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("down"))))
    assert r.status == 200
    assert fake.ocr_calls == ["down"] * 2
    assert "could not be analysed" in fake.chat_requests[-1].json()["messages"][0]["content"]


async def test_ocr_client_errors_are_not_retried(make_proxy, fake):
    proxy = await make_proxy(ocr={"retries": 3, "retry_backoff_s": 0.01})
    fake.ocr_flaky = {"bad": [400]}
    await proxy.post(URL, json=chat("m-ocr", image_part(data_url("bad"))))
    assert fake.ocr_calls == ["bad"]


async def test_ocr_retry_honours_retry_after(make_proxy, fake):
    proxy = await make_proxy(ocr={"retries": 1, "retry_backoff_s": 0.0})
    fake.ocr_flaky = {"wait": [429]}
    fake.retry_after = "0.4"
    started = time.monotonic()
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("wait"))))
    assert r.status == 200 and fake.ocr_calls == ["wait", "wait"]
    assert time.monotonic() - started >= 0.4


async def test_ocr_connect_errors_are_retried(make_proxy, fake, unused_tcp_port):
    proxy = await make_proxy(
        upstreams=[
            {"base_url": f"http://127.0.0.1:{unused_tcp_port}/v1", "models": ["vision-*"]},
            {"base_url": fake.url},
        ],
        ocr={"retries": 2, "retry_backoff_s": 0.2},
    )
    started = time.monotonic()
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("x"))))
    assert time.monotonic() - started >= 0.3  # two backoffs: at least 0.1 s + 0.2 s
    assert r.status == 200
    assert "could not be analysed" in fake.chat_requests[-1].json()["messages"][0]["content"]


async def test_large_bodies_reach_the_upstream_whole_with_their_length(proxy, fake):
    # Past 1 MB the proxy sends a body in pieces; the upstream must not see a difference.
    text = "".join(f"line {n}: all work and no play\n" for n in range(100_000))  # ~3.4 MB
    body = encode(chat("gpt-3.5-turbo", text, temperature=0.5))
    json_type = {"Content-Type": "application/json"}
    r = await proxy.post(URL, data=io.BytesIO(body), headers=json_type)  # the client's pieces
    assert r.status == 200
    sent = fake.chat_requests[-1]
    assert sent.body == body
    assert sent.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in sent.headers
    # Rewritten by the OCR step and still large.
    request = encode(chat("gpt-3.5-turbo-ocr", text, image_part(data_url("big"))))
    r = await proxy.post(URL, data=io.BytesIO(request), headers=json_type)
    assert r.status == 200
    sent = fake.chat_requests[-1]
    assert sent.headers["Content-Length"] == str(len(sent.body))
    content = orjson.loads(sent.body)["messages"][0]["content"]
    assert content.startswith(text) and "A picture showing big." in content


async def test_an_image_url_with_json_escapes_is_the_same_image(proxy, fake):
    # Some JSON encoders write "/" as "\/": the URL is the same, and so is the image.
    url = next(data_url(label) for label in ("???", "x???", "xy???") if "/" in data_url(label))
    escaped = orjson.dumps(url).decode().replace("/", "\\/")
    body = (
        '{"model":"m-ocr","messages":[{"role":"user","content":[{"type":"image_url",'
        '"image_url":{"url":' + escaped + "}}]}]}"
    )
    r = await proxy.post(URL, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == "0"
    ocr = next(r.json() for r in fake.received if r.json().get("model") == "vision-1")
    assert ocr["messages"][0]["content"][1]["image_url"]["url"] == url  # unescaped, whole
    r = await proxy.post(URL, json=chat("m-ocr", image_part(url)))  # the same, unescaped
    assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == "1"
    assert len(fake.ocr_calls) == 1

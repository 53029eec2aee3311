"""Limits on the images a client sends itself (data URLs): count, bytes, format, dimensions."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest

from ocrproxy import images as images_module
from tests.conftest import chat
from tests.fakes import FakeOpenAI, data_url, image_part
from tests.imagedata import gif_header, jpeg_header, png_header, webp_vp8x_header

URL = "/v1/chat/completions"


def as_data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


async def test_too_many_images_is_400_before_any_ocr(make_proxy: Any, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(ocr={"max_images": 3})
    parts = [image_part(data_url(f"i{n}")) for n in range(4)]
    r = await proxy.post(URL, json=chat("m-ocr", *parts))
    assert r.status == 400
    error = (await r.json())["error"]
    assert error["code"] == "too_many_images" and "limit is 3" in error["message"]
    assert fake.received == []
    r = await proxy.post(URL, json=chat("m-ocr", *parts[:3]))
    assert r.status == 200
    assert sorted(fake.ocr_calls) == ["i0", "i1", "i2"]


async def test_image_over_max_image_bytes_is_413(make_proxy: Any, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(ocr={"max_image_bytes": 10_000})
    for size in (10_001, 200_000):  # just over (exact check) and far over (checked before decoding)
        r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("big", size))))
        assert r.status == 413
        error = (await r.json())["error"]
        assert error["code"] == "payload_too_large"
        assert error["param"] == "messages[0].content[0]"
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("fits", 10_000))))
    assert r.status == 200 and fake.ocr_calls == ["fits"]


@pytest.mark.parametrize(
    "header",
    [png_header(60000, 60000), gif_header(65535, 65535), jpeg_header(60000, 60000, 4000)]
    + [webp_vp8x_header(16000, 16000)],
    ids=["png", "gif", "jpeg", "webp"],
)
async def test_huge_dimensions_are_refused_from_the_header(
    header: bytes, make_proxy: Any, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy()
    r = await proxy.post(URL, json=chat("m-ocr", image_part(as_data_url(header))))
    assert r.status == 400
    error = (await r.json())["error"]
    assert error["code"] == "invalid_image" and "more than the limit" in error["message"]
    assert fake.received == []


async def test_dimension_limit_is_configurable(make_proxy: Any, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(ocr={"max_image_pixels": 100})
    r = await proxy.post(URL, json=chat("m-ocr", image_part(as_data_url(png_header(11, 10)))))
    assert r.status == 400
    assert "11x10" in (await r.json())["error"]["message"]


@pytest.mark.parametrize(
    "payload",
    [b"hello, I am text", b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"%PDF-1.4\n", b"\0" * 64],
    ids=["text", "svg", "pdf", "zeros"],
)
async def test_bad_magic_bytes_are_refused(
    payload: bytes, make_proxy: Any, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy()
    r = await proxy.post(URL, json=chat("m-ocr", image_part(as_data_url(payload))))
    assert r.status == 400
    error = (await r.json())["error"]
    assert error["code"] == "invalid_image" and "first bytes" in error["message"]
    assert fake.received == []


async def test_bad_base64_is_refused(make_proxy: Any, fake: FakeOpenAI) -> None:
    proxy = await make_proxy()
    r = await proxy.post(URL, json=chat("m-ocr", image_part("data:image/png;base64,iVBOR*w0K")))
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "invalid_image"
    assert fake.received == []


async def test_client_image_errors_do_not_follow_on_error(
    make_proxy: Any, fake: FakeOpenAI
) -> None:
    # on_error governs what the proxy could not do; a bad image the client sent is its own 400.
    proxy = await make_proxy(ocr={"on_error": "placeholder"})
    r = await proxy.post(URL, json=chat("m-ocr", image_part(as_data_url(b"not an image"))))
    assert r.status == 400


# --- what is decoded when: only images not described in memory ---------------------------------


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The images the proxy decodes (the base64 check), by where they are in the request."""
    seen: list[str] = []
    real = images_module.check_payload

    def counting(payload: bytes, where: str) -> tuple[int, bytes]:
        seen.append(where)
        return real(payload, where)

    monkeypatch.setattr(images_module, "check_payload", counting)
    return seen


async def test_an_image_described_in_memory_is_not_decoded_again(
    make_proxy: Any, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = count_decodes(monkeypatch)
    proxy = await make_proxy()
    picture = image_part(data_url("chart", size=300_000))  # large: checked in a worker thread
    r = await proxy.post(URL, json=chat("m-ocr", picture, picture))
    assert r.status == 200 and r.headers["X-OCR-Images"] == "1"
    assert decoded == ["messages[0].content[0]"]  # the same text twice: decoded once
    r = await proxy.post(URL, json=chat("m-ocr", "again", picture, image_part(data_url("new"))))
    assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == "1"
    assert decoded == ["messages[0].content[0]", "messages[0].content[2]"]
    assert fake.ocr_calls == ["chart", "new"]


async def test_a_bad_image_beside_a_described_one_is_400_before_any_ocr_call(
    make_proxy: Any, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy()
    known = image_part(data_url("known"))
    assert (await proxy.post(URL, json=chat("m-ocr", known))).status == 200
    for bad in (
        "data:image/png;base64,iVBOR*w0K",  # not base64
        as_data_url(b"not an image"),  # not an image
        as_data_url(png_header(70_000, 70_000)),  # too many pixels
    ):
        fresh = image_part(data_url(f"fresh-{len(fake.received)}"))
        r = await proxy.post(URL, json=chat("m-ocr", known, fresh, image_part(bad)))
        assert r.status == 400, bad
        error = (await r.json())["error"]
        assert error["code"] == "invalid_image" and error["param"].startswith(
            "messages[0].content[2]"
        )
    assert fake.ocr_calls == ["known"]  # the fresh images were not sent for nothing
    assert len(fake.chat_requests) == 1


async def test_a_streaming_request_with_a_bad_image_is_a_400_not_an_event(
    make_proxy: Any, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Even when checking the image outlasts the wait after which a stream is committed early
    # (a slow machine; here a decode slowed down on purpose).
    real = images_module.check_data_url

    def slow(url: str, where: str) -> tuple[int, bytes]:
        time.sleep(0.2)
        return real(url, where)

    monkeypatch.setattr(images_module, "check_data_url", slow)
    proxy = await make_proxy(ocr={"keepalive_after_s": 0.01, "keepalive_interval_s": 0.05})
    good = image_part(data_url("slow"))
    bad = image_part(as_data_url(b"not an image" + bytes(60_000)))  # checked in a thread
    r = await proxy.post(URL, json=chat("m-ocr", good, bad, stream=True))
    assert r.status == 400 and r.content_type == "application/json"
    assert (await r.json())["error"]["param"].startswith("messages[0].content[1]")
    assert fake.received == []

"""Limits on the images a client sends itself (data URLs): count, bytes, format, dimensions."""

from __future__ import annotations

import base64
from typing import Any

import pytest

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

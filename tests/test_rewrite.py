"""The rewrite and image scan as pure functions: in place, numbered, flattened, lossless."""

from __future__ import annotations

import base64
import json

import msgspec
import pytest

from ocrproxy.dialects.chat import rewrite, scan
from ocrproxy.errors import BadRequest, InvalidImage
from ocrproxy.images import decode_data_url, decode_payload, identify
from ocrproxy.rewrite import placeholder_block, reference_block
from ocrproxy.schema import object_decoder
from tests.fakes import data_url, image_part, png


def run(body: dict, blocks_for=lambda i: f"B{i}") -> dict:
    raw = json.dumps(body).encode()
    obj = object_decoder.decode(raw)
    found = scan(obj["messages"])
    blocks = [blocks_for(i) for i in range(len(found.images))]
    return json.loads(rewrite(obj, found, blocks, "real"))


def test_images_replaced_in_place_and_numbered_across_messages():
    body = {
        "model": "x-ocr",
        "ocr_model": "v",
        "messages": [
            {"role": "user", "content": [image_part(data_url("a")), {"type": "text", "text": "t"}]},
            {"role": "user", "content": [{"type": "text", "text": "u"}, image_part("https://h/i")]},
        ],
    }
    out = run(body)
    assert out == {
        "model": "real",
        "messages": [
            {"role": "user", "content": "B0\n\nt"},
            {"role": "user", "content": "u\n\nB1"},
        ],
    }


def test_untouched_messages_and_fields_keep_their_values():
    body = {
        "temperature": 1.5,
        "model": "x",
        "messages": [
            {"role": "system", "content": "s", "name": "n"},
            {"role": "user", "content": [image_part(data_url("a"))], "weird": {"k": [1, None]}},
        ],
        "big": 123456789012345678901234567890,
    }
    out = run(body)
    assert list(out) == ["temperature", "model", "messages", "big"]  # key order kept
    assert out["big"] == 123456789012345678901234567890
    assert out["messages"][0] == body["messages"][0]
    assert out["messages"][1]["weird"] == {"k": [1, None]}


def test_blocks_are_delimited_and_placeholder_is_clear():
    block = reference_block(3, "gpt-4o-mini", "TEXT: hi")
    assert block.startswith("[Image 3 (described by gpt-4o-mini")
    assert "TEXT: hi" in block and block.endswith("[End of image 3]")
    assert "could not be analysed" in placeholder_block(2)


def test_data_url_decoding():
    assert decode_data_url(data_url("q"), "w") == png("q")
    for bad in (
        "data:image/png;base64",
        "data:image/png,abc",
        "data:text/html;base64,AAAA",
        "data:image/png;base64,****",
        "data:image/png;base64,",
    ):
        with pytest.raises(InvalidImage):
            decode_data_url(bad, "w")


def test_scan_rejects_bad_shapes_with_the_path():
    def raw(messages) -> msgspec.Raw:
        return msgspec.Raw(json.dumps(messages).encode())

    with pytest.raises(BadRequest, match="must not be empty"):
        scan(raw([]))
    with pytest.raises(BadRequest, match=r"messages\[1\]"):
        scan(raw([{"role": "user", "content": "x"}, 5]))
    with pytest.raises(BadRequest, match=r"messages\[0\].content\[1\]"):
        scan(raw([{"role": "user", "content": [{"type": "text", "text": "a"}, "str"]}]))
    with pytest.raises(InvalidImage, match=r"messages\[0\].content\[0\].image_url"):
        scan(raw([{"role": "user", "content": [{"type": "image_url", "image_url": {"u": 1}}]}]))


async def test_identity_is_over_decoded_bytes_and_large_payloads_work():
    messages = [
        {
            "role": "user",
            "content": [
                image_part(data_url("same")),
                image_part("data:image/png;base64," + base64.b64encode(png("same")).decode()),
                image_part(data_url("big", size=200_000)),
                image_part("https://h/x.png"),
            ],
        }
    ]
    found = scan(msgspec.Raw(json.dumps(messages).encode()))
    await identify(found.images)
    a, b, big, remote = found.images
    assert a.digest == b.digest and len(a.digest) == 32
    assert big.size == 200_000 and big.digest != a.digest
    assert remote.size == 0 and len(remote.digest) == 32


def test_url_schemes_are_case_insensitive():
    messages = [
        {
            "role": "user",
            "content": [
                image_part("DATA:" + data_url("u")[5:]),
                image_part("HTTPS://h/x.png"),
            ],
        }
    ]
    found = scan(msgspec.Raw(json.dumps(messages).encode()))
    assert [im.is_data for im in found.images] == [True, False]
    assert decode_payload(found.images[0].payload, "w") == png("u")

"""Property: any message/content shape either rewrites losslessly or is a 400-class error."""

from __future__ import annotations

import json

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocrproxy.dialects.chat import rewrite, scan
from ocrproxy.errors import ProxyError
from ocrproxy.images import _identify
from ocrproxy.schema import object_decoder
from tests.fakes import data_url

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
image_urls = st.sampled_from(
    [data_url("a"), data_url("b"), "https://h/x.png", "data:image/png;base64,@@", "ftp://x", ""]
)
parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=8)),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, image_urls),
    st.builds(lambda u: {"type": "image_url", "image_url": u}, image_urls | json_values),
    st.builds(lambda v: {"type": "input_audio", "input_audio": v}, json_values),
    st.dictionaries(st.sampled_from(["type", "text", "image_url", "x"]), json_values, max_size=3),
    json_values,
)
contents = st.one_of(st.text(max_size=8), st.none(), st.lists(parts, max_size=5), json_values)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": contents},
        optional={"name": st.text(max_size=3), "extra": json_values},
    )
    | json_values,
    max_size=4,
)


def is_plain_text(part: object) -> bool:
    return (
        isinstance(part, dict)
        and set(part) == {"type", "text"}
        and part["type"] == "text"
        and isinstance(part["text"], str)
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, json_values)
def test_rewrite_never_crashes_and_never_loses_a_part(msgs, extra):
    body = json.dumps({"model": "m", "messages": msgs, "extra": extra}).encode()
    obj = object_decoder.decode(body)
    try:
        found = scan(obj["messages"])
        _identify(found.images)
    except ProxyError as exc:
        assert 400 <= exc.status < 500
        return
    blocks = [f"<<IMAGE {i}>>" for i in range(len(found.images))]
    out = json.loads(rewrite(obj, found, blocks, "real"))
    assert out["extra"] == extra and out["model"] == "real"
    assert len(out["messages"]) == len(msgs)
    image_number = 0
    for before, after in zip(msgs, out["messages"], strict=True):
        if not isinstance(before, dict) or not isinstance(before.get("content"), list):
            assert after == before  # untouched
            continue
        assert {k: v for k, v in after.items() if k != "content"} == {
            k: v for k, v in before.items() if k != "content"
        }
        expected = []
        for part in before["content"]:
            if isinstance(part, dict) and part.get("type") == "image_url":
                expected.append({"type": "text", "text": blocks[image_number]})
                image_number += 1
            else:
                expected.append(part)
        if expected and all(is_plain_text(p) for p in expected):
            assert after["content"] == "\n\n".join(p["text"] for p in expected)
        else:
            assert after["content"] == expected
    assert image_number == len(found.images)


def test_scan_of_non_array_messages_is_a_400():
    for raw in (b'"x"', b"5", b"{}", b"null"):
        try:
            scan(msgspec.Raw(raw))
        except ProxyError as exc:
            assert exc.status == 400
        else:
            raise AssertionError(raw)

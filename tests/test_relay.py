"""The SSE usage editor: events split anywhere still get usage.ocr, everything else untouched."""

from __future__ import annotations

import msgspec
import orjson

from ocrproxy.usage import UsageEditor, with_ocr_usage

OCR = {
    "model": "v",
    "images": 1,
    "cache_hits": 0,
    "prompt_tokens": 5,
    "completion_tokens": 1,
    "total_tokens": 6,
}


def stream(sep: bytes = b"\n\n") -> bytes:
    chunk = b'data: {"id":"1","choices":[{"delta":{"content":"hi"}}],"usage":null}' + sep
    final = b'data: {"id":"1","choices":[],"usage":{"prompt_tokens":3,"total_tokens":4}}' + sep
    return chunk * 3 + final + b"data: [DONE]" + sep


def run(data: bytes, size: int) -> bytes:
    editor = UsageEditor(OCR)
    out = b"".join(editor.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + editor.flush()


def test_usage_chunk_gains_ocr_however_the_stream_is_split():
    original = stream()
    for size in (1, 2, 7, 64, len(original)):
        out = run(original, size)
        events = [e for e in out.split(b"\n\n") if e]
        assert events[:3] == [e for e in original.split(b"\n\n") if e][:3]  # untouched
        final = orjson.loads(events[3][6:])
        assert final["usage"] == {"prompt_tokens": 3, "total_tokens": 4, "ocr": OCR}
        assert events[4] == b"data: [DONE]"


def test_crlf_event_separators():
    out = run(stream(b"\r\n\r\n"), 5)
    assert b'"ocr":{' in out and out.endswith(b"data: [DONE]\r\n\r\n")


def test_complete_events_are_not_held_back():
    editor = UsageEditor(OCR)
    first = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    assert editor.feed(first + b'data: {"cho') == first
    assert editor.feed(b'ices":[]}\n\n') == b'data: {"choices":[]}\n\n'


def test_plain_body_merge_keeps_other_fields():
    body = b'{"id":"x","usage":{"prompt_tokens":1},"z":[1,2]}'
    out = orjson.loads(with_ocr_usage(body, msgspec.Raw(orjson.dumps(OCR))))
    assert out == {"id": "x", "usage": {"prompt_tokens": 1, "ocr": OCR}, "z": [1, 2]}
    assert with_ocr_usage(b'{"usage":null}', msgspec.Raw(b"{}")) is None
    assert with_ocr_usage(b"not json", msgspec.Raw(b"{}")) is None

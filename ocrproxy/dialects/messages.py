"""Anthropic Messages: ``POST /v1/messages`` (Claude Code) and its ``count_tokens``.

Rules:
- Images are walked in every message of every role: ``{"type": "image", "source": ...}``
  blocks at the top of a content array, inside ``tool_result.content[]`` (Claude Code's Read
  tool and screenshot tools put them there), and inside ``document`` blocks whose source is
  ``{"type": "content", "content": [...]}``. A ``base64`` source is inline (its ``data`` stays a
  view into the client's body); a ``url`` source is remote. A ``file`` source (Files API) is
  left as it is, with a warning; PDF documents are left alone.
- Each image block becomes ``{"type": "text", "text": <reference block>}`` in place, keeping
  its ``cache_control``. A ``tool_result`` keeps its other fields; if its content is then text
  only, it becomes one string (several backends accept nothing else there). Only messages
  holding images are re-encoded, and only their top-level keys: every block, ``system``,
  ``thinking`` (with its signature) and unknown field is spliced back as the client sent it.
- ``usage`` is top-level in a plain answer and in the ``message_delta`` event (cumulative),
  where ``usage.ocr`` goes, counting tokens as ``input_tokens``/``output_tokens``;
  ``message_start`` carries its usage one level down and is left alone. Keep-alives are
  ``event: ping``; errors are ``{"type": "error", "error": {"type", "message"}}``, as a body or
  an ``event: error``. There is no progress event (``[ocr] progress``): a thinking block the
  proxy made up would have no valid signature, and clients send thinking blocks back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import config
from ..errors import BadRequest, ProxyError, UpstreamError
from ..images import Image, decode_raw, str_decoder, too_many
from ..schema import RawObject, array_decoder, encoder, is_json, object_decoder
from . import Dialect, Found, Parsed, decode_messages, kind_of, reason, source_image, splice_point

# Anthropic's error type for each status the proxy answers with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


@dataclass(slots=True)
class Blocks:
    """One content array the proxy rebuilds: its blocks as sent, and what changes in it."""

    raws: list[msgspec.Raw]
    images: dict[int, tuple[int, msgspec.Raw | None]] = field(default_factory=dict)  # j: (n, cc)
    nested: dict[int, tuple[RawObject, Blocks]] = field(default_factory=dict)  # tool_result...
    texts: dict[int, str] = field(default_factory=dict)  # plain text blocks, by index


@dataclass(slots=True)
class Walk(Found):
    """The messages of a request and, for each one holding images, its rebuilt content."""

    messages: list[RawObject] = field(default_factory=list)
    contents: dict[int, Blocks] = field(default_factory=dict)


class _Walker:
    def __init__(self, max_images: int) -> None:
        self.found = Walk()
        self.max_images = max_images

    def content(self, raw: msgspec.Raw, where: str, flattens: bool = False) -> Blocks | None:
        """The blocks of a content array, if any image is inside (else None: left as sent).
        Only an array that may become one string (``flattens``: a tool_result's) has its plain
        text blocks decoded."""
        blocks = Blocks(decode_raw(array_decoder, raw, where))
        for j, block_raw in enumerate(blocks.raws):
            at = f"{where}[{j}]"
            if not is_json(block_raw, b"{"):
                continue  # not ours to judge: the upstream will
            block = decode_raw(object_decoder, block_raw, at)
            kind = kind_of(block)
            if kind == "image":
                self._image(blocks, j, block, at)
            elif kind == "text" and flattens and len(block) == 2 and _is_string(block, "text"):
                blocks.texts[j] = decode_raw(str_decoder, block["text"], at)
            elif kind == "tool_result" and is_json(block.get("content", b"0"), b"["):
                inner = self.content(block["content"], f"{at}.content", flattens=True)
                if inner is not None:
                    blocks.nested[j] = (block, inner)
            elif kind == "document" and is_json(block.get("source", b"0"), b"{"):
                source = decode_raw(object_decoder, block["source"], f"{at}.source")
                if kind_of(source) == "content" and is_json(source.get("content", b"0"), b"["):
                    inner = self.content(source["content"], f"{at}.source.content")
                    if inner is not None:
                        blocks.nested[j] = (block, inner)
        return blocks if blocks.images or blocks.nested else None

    def _image(self, blocks: Blocks, j: int, block: RawObject, where: str) -> None:
        raw_source = block.get("source")
        if raw_source is None or not is_json(raw_source, b"{"):
            raise BadRequest(f"`{where}.source` must be an object", param=f"{where}.source")
        image = source_image(decode_raw(object_decoder, raw_source, f"{where}.source"), where)
        if image is None:
            return
        images = self.found.images
        images.append(image)
        if len(images) > self.max_images:
            raise too_many(f"more than {self.max_images}", self.max_images)
        blocks.images[j] = (len(images) - 1, block.get("cache_control"))


def _is_string(obj: RawObject, name: str) -> bool:
    raw = obj.get(name)
    return raw is not None and is_json(raw, b'"')


def _rebuild(blocks: Blocks, text: Sequence[str], flatten: bool) -> Any:
    """A content array with its images as text; one string if ``flatten`` and only plain text
    blocks are left."""
    out: list[Any] = []
    texts: list[str] = []
    only_text = True
    for j, raw in enumerate(blocks.raws):
        if j in blocks.images:
            number, cache_control = blocks.images[j]
            replaced: dict[str, Any] = {"type": "text", "text": text[number]}
            if cache_control is not None:
                replaced["cache_control"] = cache_control
                only_text = False
            out.append(replaced)
            texts.append(text[number])
        elif j in blocks.nested:
            block, inner = blocks.nested[j]
            out.append(_nested(block, inner, text))
            only_text = False
        else:
            out.append(raw)
            if j in blocks.texts:
                texts.append(blocks.texts[j])
            else:
                only_text = False
    return "\n\n".join(texts) if flatten and only_text else out


def _nested(block: RawObject, inner: Blocks, text: Sequence[str]) -> dict[str, Any]:
    if kind_of(block) == "tool_result":
        return {**block, "content": _rebuild(inner, text, flatten=True)}
    source = object_decoder.decode(block["source"])  # a document: its source holds the blocks
    return {**block, "source": {**source, "content": _rebuild(inner, text, flatten=False)}}


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + encoder.encode(data) + b"\n\n"


# How a finished block of each kind is streamed: its empty start and the delta that fills it.
_DELTAS = {"text": ("text", "text_delta"), "thinking": ("thinking", "thinking_delta")}


def _block_events(index: int, block: Any) -> list[bytes]:
    kind = block.get("type") if isinstance(block, dict) else None
    deltas: list[dict[str, Any]] = []
    empty = block
    if kind in _DELTAS:
        field_name, delta_type = _DELTAS[kind]
        empty = {**block, field_name: ""}
        deltas.append({"type": delta_type, field_name: block.get(field_name, "")})
        if kind == "thinking" and "signature" in block:
            empty.pop("signature", None)
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind == "tool_use":
        empty = {**block, "input": {}}
        partial = encoder.encode(block.get("input", {})).decode()
        deltas.append({"type": "input_json_delta", "partial_json": partial})
    start = {"type": "content_block_start", "index": index, "content_block": empty}
    events = [_event("content_block_start", start)]
    for delta in deltas:
        data = {"type": "content_block_delta", "index": index, "delta": delta}
        events.append(_event("content_block_delta", data))
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


class _OcrAnswerBlock(msgspec.Struct):
    type: str = ""
    text: str | None = None


class _OcrUsage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0


class _OcrAnswer(msgspec.Struct):
    content: list[_OcrAnswerBlock]
    usage: _OcrUsage | None = None


_answer_decoder = msgspec.json.Decoder(_OcrAnswer)
_DATA_MARK = b'"data":""'


class Messages(Dialect):
    name = "messages"
    api = "anthropic"
    path = "messages"
    items = "messages"
    keep_alive = b'event: ping\ndata: {"type": "ping"}\n\n'
    answer_name = "message"

    def find(self, parsed: Parsed, max_images: int) -> Found:
        messages = decode_messages(parsed.obj["messages"])
        walker = _Walker(max_images)
        walker.found.messages = messages
        for i, message in enumerate(messages):
            content = message.get("content")
            if content is not None and is_json(content, b"["):
                blocks = walker.content(content, f"messages[{i}].content")
                if blocks is not None:
                    walker.found.contents[i] = blocks
        return walker.found

    def splice(self, parsed: Parsed, found: Found, blocks: Sequence[str], model: str) -> bytes:
        assert isinstance(found, Walk)
        messages: list[Any] = list(found.messages)
        for i, content in found.contents.items():
            messages[i] = {**found.messages[i], "content": _rebuild(content, blocks, False)}
        return self.encode(parsed.obj, messages, model)

    def ocr_usage(self, usage: Mapping[str, Any]) -> dict[str, Any]:
        return dict(usage)  # already in Anthropic's words: input_tokens, output_tokens

    def error_body(self, error: ProxyError) -> bytes:
        kind = ERROR_TYPES.get(error.status, "api_error")
        return encoder.encode({"type": "error", "error": {"type": kind, "message": error.message}})

    def error_event(self, error: ProxyError | bytes) -> bytes:
        payload = self.error_body(error) if isinstance(error, ProxyError) else error
        return b"event: error\ndata: " + payload + b"\n\n"

    def upstream_error_event(self, status: int, payload: bytes) -> bytes:
        try:
            obj = object_decoder.decode(payload)
        except msgspec.DecodeError:
            obj = {}
        if bytes(obj.get("type", b"")) == b'"error"' and "error" in obj:
            return self.error_event(msgspec.json.format(payload, indent=0))
        message = reason(payload) if "error" in obj else f"The upstream answered HTTP {status}"
        error = UpstreamError(message)
        error.status = status
        return self.error_event(error)

    def as_events(self, payload: bytes) -> bytes:
        """A plain message as the stream it stands for: message_start, each block's start,
        one delta and stop, message_delta (stop reason, usage), message_stop."""
        message = msgspec.json.decode(payload)
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            raise msgspec.DecodeError("not a message")
        usage = message.get("usage") or {}
        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
        events = [_event("message_start", {"type": "message_start", "message": start})]
        for index, block in enumerate(message["content"]):
            events += _block_events(index, block)
        delta = {
            "stop_reason": message.get("stop_reason"),
            "stop_sequence": message.get("stop_sequence"),
        }
        events.append(
            _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
        )
        events.append(_event("message_stop", {"type": "message_stop"}))
        return b"".join(events)

    def ocr_request(
        self, model: str, settings: config.Ocr, image: Image
    ) -> tuple[bytes, bytes | memoryview, bytes]:
        source: dict[str, str]
        if not image.is_data:
            source = {"type": "url", "url": image.url}
        else:
            data = "" if image.json_safe else bytes(image.payload).decode()
            source = {"type": "base64", "media_type": image.media_type, "data": data}
        body = encoder.encode(
            {
                "model": model,
                "max_tokens": settings.max_tokens,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": source},
                            {"type": "text", "text": settings.prompt},
                        ],
                    }
                ],
            }
        )
        if not image.is_data or not image.json_safe:
            return body, b"", b""
        head, tail = splice_point(body, _DATA_MARK)
        return head, image.payload, tail

    def ocr_answer(self, payload: bytes) -> tuple[str, int, int] | None:
        try:
            answer = _answer_decoder.decode(payload)
        except msgspec.DecodeError:
            return None
        text = "\n".join(b.text for b in answer.content if b.type == "text" and b.text)
        usage = answer.usage or _OcrUsage()
        return text, usage.input_tokens, usage.output_tokens


MESSAGES = Messages()

"""OpenAI Chat Completions: ``POST /v1/chat/completions``.

Rules:
- Every message of every role whose ``content`` is an array is walked (``tool`` messages
  carry MCP screenshots, ``assistant`` ones re-sent generated images). Three kinds of part are
  images: ``image_url`` whose ``image_url`` is ``{"url": ...}`` or a bare string, a base64
  ``data:`` URL or an ``http(s)`` URL; the Responses API's ``input_image`` (its ``image_url``
  the same URL string, ``detail`` beside it) and the Anthropic-style ``image`` with a
  ``base64`` or ``url`` ``source``, both sent here by clients that mix dialects. An
  ``input_image`` with only a ``file_id``, an ``image`` with a ``file`` source, and ``file``
  (PDF) and ``input_audio`` parts are passed on as they are. Parts are decoded one level only,
  so an image's URL or base64 stays raw JSON (megabytes never become a ``str``).
- Each image part becomes ``{"type": "text", "text": <reference block>}`` in place. A content
  array that then holds only plain text parts (``{"type": "text", "text": ...}`` and nothing
  else) is flattened into one string, parts joined by a blank line: many text-only upstreams
  reject content arrays. Every other byte is spliced back as the client sent it.
- ``usage`` is top-level in a plain answer and in the stream's usage chunk, which only comes
  when the client asked for it (``stream_options.include_usage``); ``usage.ocr`` counts tokens
  as ``prompt_tokens``/``completion_tokens``. Events are ``data:`` lines ending in
  ``data: [DONE]``; keep-alives are SSE comments; errors are ``{"error": {...}}``. Notes on
  the OCR step (``[ocr] progress``) are chunks whose delta holds only ``reasoning_content``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import config
from ..errors import BadRequest, InvalidImage, ProxyError, UpstreamError
from ..images import Image, decode_raw, str_decoder, too_many
from ..schema import (
    RawObject,
    array_decoder,
    encoder,
    is_json,
    object_decoder,
    ocr_response_decoder,
)
from . import (
    Dialect,
    Found,
    Parsed,
    decode_messages,
    field_value,
    source_image,
    splice_point,
    url_image,
)

log = logging.getLogger("ocrproxy.chat")


@dataclass(slots=True)
class Part:
    """One element of a content array: a plain text part, an image, or anything else (raw)."""

    raw: msgspec.Raw
    text: str | None = None
    image: int | None = None


@dataclass(slots=True)
class Scan(Found):
    """The messages of a request, decoded just far enough to find and replace images."""

    messages: list[RawObject] = field(default_factory=list)
    contents: dict[int, list[Part]] = field(default_factory=dict)


def _image_url(part: RawObject, where: str) -> tuple[msgspec.Raw, str | None]:
    """The raw JSON string of an image part's URL (``image_url`` or ``image_url.url``), and
    its ``detail``."""
    value = part.get("image_url")
    detail = None
    if value is not None and is_json(value, b"{"):
        fields = decode_raw(object_decoder, value, f"{where}.image_url")
        value = fields.get("url")
        raw_detail = fields.get("detail")
        if raw_detail is not None and is_json(raw_detail, b'"'):
            detail = decode_raw(str_decoder, raw_detail, f"{where}.image_url.detail")
    if value is None or not is_json(value, b'"') or len(memoryview(value)) <= 2:
        raise InvalidImage(
            f"`{where}.image_url` must be a URL string or an object with a `url` string",
            param=f"{where}.image_url",
        )
    return value, detail


def image_of(raw_url: msgspec.Raw, where: str, detail: str | None) -> Image:
    """The image a part's raw JSON URL string stands for: a data: URL or an http(s) URL."""
    image = url_image(raw_url, where, f"{where}.image_url.url")
    image.detail = detail
    return image


def _part_image(kind: str, part: RawObject, where: str) -> Image | None:
    """The image a content part of type ``kind`` holds; None if it holds none the proxy can
    describe (any other part, or an image given only by reference)."""
    if kind == "image_url":
        raw_url, detail = _image_url(part, where)
        return image_of(raw_url, where, detail)
    if kind == "input_image":
        given = part.get("image_url")
        if (given is None or is_json(given, b"n")) and "file_id" in part:
            log.warning("a file_id image at %s is passed on as it is", where)
            return None
        raw_url, detail = _image_url(part, where)
        raw_detail = part.get("detail")
        if detail is None and raw_detail is not None and is_json(raw_detail, b'"'):
            detail = decode_raw(str_decoder, raw_detail, f"{where}.detail")
        return image_of(raw_url, where, detail)
    if kind == "image" and "source" in part and is_json(part["source"], b"{"):
        return source_image(decode_raw(object_decoder, part["source"], f"{where}.source"), where)
    return None


def scan(messages_raw: msgspec.Raw, max_images: int | None = None) -> Scan:
    """Decode the messages array and find every image; raise BadRequest on a malformed shape,
    or as soon as it finds image ``max_images + 1``."""
    messages = decode_messages(messages_raw)
    if not messages:
        raise BadRequest("`messages` must not be empty", param="messages")
    found = Scan(messages=messages)
    images = found.images
    for i, message in enumerate(messages):
        content = message.get("content")
        if content is None or not is_json(content, b"["):
            continue
        parts: list[Part] = []
        for j, raw_part in enumerate(decode_raw(array_decoder, content, f"messages[{i}].content")):
            where = f"messages[{i}].content[{j}]"
            raw_type = None
            if is_json(raw_part, b"{"):
                part = decode_raw(object_decoder, raw_part, where)
                raw_type = part.get("type")
            if raw_type is None or not is_json(raw_type, b'"'):
                raise BadRequest(f"`{where}` must be an object with a `type`", param=where)
            kind = decode_raw(str_decoder, raw_type, where)
            image = _part_image(kind, part, where)
            if image is not None:
                images.append(image)
                if max_images is not None and len(images) > max_images:
                    raise too_many(f"more than {max_images}", max_images)
                parts.append(Part(raw_part, image=len(images) - 1))
            elif kind == "text" and len(part) == 2 and is_json(part.get("text", b"0"), b'"'):
                parts.append(Part(raw_part, text=decode_raw(str_decoder, part["text"], where)))
            else:
                parts.append(Part(raw_part))
        found.contents[i] = parts
    return found


def _content(scan: Scan, index: int, blocks: Sequence[str]) -> Any:
    items: list[Any] = []
    texts: list[str] = []
    only_text = True
    for part in scan.contents[index]:
        if part.image is not None:
            block = blocks[part.image]
            items.append({"type": "text", "text": block})
            texts.append(block)
        elif part.text is not None:
            items.append(part.raw)
            texts.append(part.text)
        else:
            items.append(part.raw)
            only_text = False
    return "\n\n".join(texts) if only_text else items


def rewrite(body: RawObject, scan: Scan, blocks: Sequence[str], model: str) -> bytes:
    """Encode the text-only request: ``blocks[i]`` replaces ``scan.images[i]``."""
    messages: list[Any] = []
    for i, message in enumerate(scan.messages):
        if scan.contents.get(i):
            message = {**message, "content": _content(scan, i, blocks)}
        messages.append(message)
    return CHAT.encode(body, messages, model)


# The encoded OCR body up to the image URL's characters: the URL comes first in its object.
_URL_MARK = b'{"url":""'


class Chat(Dialect):
    name = "chat"
    api = "openai"
    path = "chat/completions"
    items = "messages"
    keep_alive = b": keep-alive\n\n"
    answer_name = "chat completion"

    def find(self, parsed: Parsed, max_images: int) -> Found:
        return scan(parsed.obj["messages"], max_images)

    def splice(self, parsed: Parsed, found: Found, blocks: Sequence[str], model: str) -> bytes:
        assert isinstance(found, Scan)
        return rewrite(parsed.obj, found, blocks, model)

    def edits_stream(self, parsed: Parsed) -> bool:
        options = field_value(parsed.obj, "stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def ocr_usage(self, usage: Mapping[str, Any]) -> dict[str, Any]:
        prompt, completion = usage["input_tokens"], usage["output_tokens"]
        return {
            "model": usage["model"],
            "images": usage["images"],
            "cache_hits": usage["cache_hits"],
            "failures": usage["failures"],
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def error_body(self, error: ProxyError) -> bytes:
        return error.to_bytes()

    def error_event(self, error: ProxyError | bytes) -> bytes:
        payload = error.to_bytes() if isinstance(error, ProxyError) else error
        return b"data: " + payload + b"\n\n"

    def upstream_error_event(self, status: int, payload: bytes) -> bytes:
        try:
            obj = object_decoder.decode(payload)
            body = msgspec.json.format(payload, indent=0) if "error" in obj else None
        except msgspec.DecodeError:
            body = None
        if body is None:
            body = UpstreamError(
                f"The upstream answered HTTP {status}", code=str(status)
            ).to_bytes()
        return self.error_event(body)

    def as_events(self, payload: bytes) -> bytes:
        return b"data: " + msgspec.json.format(payload, indent=0) + b"\n\ndata: [DONE]\n\n"

    def progress_event(
        self, text: str, *, stream_id: str, model: str, created: int, first: bool
    ) -> bytes:
        # The field DeepSeek's reasoners stream their thinking in; Open WebUI, Cherry Studio
        # and LobeChat show it as a collapsible box, and the usage chunk never counts it.
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        delta["reasoning_content"] = text
        chunk = {
            "id": stream_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        return b"data: " + encoder.encode(chunk) + b"\n\n"

    def ocr_request(
        self, model: str, settings: config.Ocr, image: Image
    ) -> tuple[bytes, bytes | memoryview, bytes]:
        image_url: dict[str, str] = {"url": ""}
        if image.detail:
            image_url["detail"] = image.detail
        if not image.is_data:
            image_url["url"] = image.url
        elif not image.json_safe:  # the client's text had JSON escapes: encode it properly
            image_url["url"] = (image.data_url_head() + bytes(image.payload)).decode()
        body = encoder.encode(
            {
                "model": model,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": settings.prompt},
                            {"type": "image_url", "image_url": image_url},
                        ],
                    }
                ],
                "max_tokens": settings.max_tokens,
                "stream": False,
            }
        )
        if not image.is_data or not image.json_safe:
            return body, b"", b""
        head, tail = splice_point(body, _URL_MARK)
        return head + image.data_url_head(), image.payload, tail

    def ocr_answer(self, payload: bytes) -> tuple[str, int, int] | None:
        try:
            answer = ocr_response_decoder.decode(payload)
        except msgspec.DecodeError:
            return None
        text = answer.choices[0].message.content if answer.choices else None
        usage = answer.usage
        return (
            text or "",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )


CHAT = Chat()

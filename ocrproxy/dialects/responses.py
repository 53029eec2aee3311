"""OpenAI Responses: ``POST /v1/responses`` (Codex CLI, openai-agents, LobeHub).

Rules:
- ``input`` is a string (no images), an array of items, or absent (a request built on
  ``previous_response_id`` or a stored prompt): only an array is walked. An image is an
  ``{"type": "input_image", "image_url": "data:..." | "http(s)://...", "detail": ...}`` part in
  the ``content`` array of a message item of any role (``"type": "message"``, or the short
  form without a ``type``), in the ``output`` array of a ``function_call_output`` or a
  ``custom_tool_call_output`` (Codex's ``view_image`` and MCP tools put screenshots there), or
  the ``output`` of a ``computer_call_output`` when it is a ``computer_screenshot`` with an
  ``image_url``. An image given by ``file_id`` only (Files API) is left as it is, with a
  warning: the proxy cannot read it. ``detail`` goes to the OCR call (``original``, which Chat
  Completions does not know, as ``high``).
- Each image part becomes ``{"type": "input_text", "text": <reference block>}`` in place. A
  ``computer_call_output`` keeps its item (``call_id``, safety checks and all) and its
  ``output`` becomes that same ``input_text`` object: the screenshot's place holds text, as
  every other image's does, and the call it answers stays paired. A tool output array
  (``function_call_output`` or ``custom_tool_call_output``: both take a string or an array)
  that then holds only plain ``input_text`` parts becomes one string, texts joined by a blank
  line: text-only backends often take nothing else there. Message content stays an array.
  Only items holding images are re-encoded, and only their top-level keys: ``instructions``,
  ``tools``, ``reasoning`` and reasoning items (their ``encrypted_content``), ``store``,
  ``previous_response_id``, ``include``, ``text`` and every unknown field pass as sent.
- Images sent in earlier turns of a ``previous_response_id`` chain live upstream: the proxy
  never sees them, so only the images the request itself carries are described.
- ``usage`` is top-level in a plain answer and at ``response.usage`` in the stream's
  ``response.completed`` (or ``response.incomplete``) event; ``usage.ocr`` counts tokens as
  ``input_tokens``/``output_tokens``. Events are ``event:``/``data:`` pairs with no ``[DONE]``;
  keep-alives are SSE comments; an error in a stream is ``event: error`` with
  ``{"type": "error", "code", "message", "param"}``, a body error is OpenAI's ``{"error": {...}}``.
  There is no progress event (``[ocr] progress``): every event belongs to the response the
  upstream's ``response.created`` opens, and its id is not known while the images are read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..errors import BadRequest, InvalidImage, ProxyError, UpstreamError
from ..images import decode_raw, str_decoder, too_many
from ..schema import RawObject, array_decoder, encoder, is_json, object_decoder
from . import Dialect, Found, Parsed, kind_of, string_field, url_image

log = logging.getLogger("ocrproxy.responses")

# Item types whose `output` is a string or an array of input parts.
_TOOL_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})
_DETAILS = {"low": "low", "high": "high", "auto": "auto", "original": "high"}


@dataclass(slots=True)
class Parts:
    """One array of input parts the proxy rebuilds: the parts as sent, and what changes."""

    raws: list[msgspec.Raw]
    images: dict[int, int] = field(default_factory=dict)  # part index: image number
    texts: dict[int, str] = field(default_factory=dict)  # plain input_text parts, by index


@dataclass(slots=True)
class Walk(Found):
    """The input items, and for each one holding images the key to rebuild and its new value."""

    items: list[msgspec.Raw] = field(default_factory=list)
    objects: dict[int, RawObject] = field(default_factory=dict)
    edits: dict[int, tuple[str, Parts | int]] = field(default_factory=dict)  # (key, parts | n)


class _Walker:
    def __init__(self, max_images: int) -> None:
        self.found = Walk()
        self.max_images = max_images

    def parts(self, raw: msgspec.Raw, where: str) -> Parts | None:
        """The parts of an input array, if any image is among them (else None: left as sent)."""
        parts = Parts(decode_raw(array_decoder, raw, where))
        for j, part_raw in enumerate(parts.raws):
            at = f"{where}[{j}]"
            if not is_json(part_raw, b"{"):
                continue  # not ours to judge: the upstream will
            part = decode_raw(object_decoder, part_raw, at)
            kind = kind_of(part)
            if kind == "input_image":
                number = self.image(part, at)
                if number is not None:
                    parts.images[j] = number
            elif kind == "input_text" and len(part) == 2 and is_json(part.get("text", b"0"), b'"'):
                parts.texts[j] = decode_raw(str_decoder, part["text"], at)
        return parts if parts.images else None

    def image(self, part: RawObject, where: str) -> int | None:
        """The number of the image ``part`` holds; None for a ``file_id``-only one."""
        raw_url = part.get("image_url")
        if raw_url is None or is_json(raw_url, b"n"):  # absent or null
            if "file_id" in part:
                log.warning("a Files API image at %s is passed on as it is", where)
                return None
            raise InvalidImage(
                f"`{where}` must have an `image_url` or a `file_id`", param=f"{where}.image_url"
            )
        if not is_json(raw_url, b'"') or len(memoryview(raw_url)) <= 2:
            raise InvalidImage(
                f"`{where}.image_url` must be a URL string", param=f"{where}.image_url"
            )
        image = url_image(raw_url, where, f"{where}.image_url")
        raw_detail = part.get("detail")
        if raw_detail is not None and is_json(raw_detail, b'"'):
            image.detail = _DETAILS.get(decode_raw(str_decoder, raw_detail, f"{where}.detail"))
        images = self.found.images
        images.append(image)
        if len(images) > self.max_images:
            raise too_many(f"more than {self.max_images}", self.max_images, param="input")
        return len(images) - 1

    def item(self, i: int, raw: msgspec.Raw) -> None:
        if not is_json(raw, b"{"):
            return
        where = f"input[{i}]"
        obj = decode_raw(object_decoder, raw, where)
        kind = kind_of(obj)
        if kind is None or kind == "message":  # a message, in the long or the short form
            key = "content"
        elif kind in _TOOL_OUTPUTS or kind == "computer_call_output":
            key = "output"
        else:
            return  # reasoning, function_call, item_reference...: no images, left as sent
        value = obj.get(key)
        if value is None:
            return
        edit: Parts | int | None = None
        if kind == "computer_call_output":
            if is_json(value, b"{"):
                output = decode_raw(object_decoder, value, f"{where}.output")
                if kind_of(output) == "computer_screenshot":
                    edit = self.image(output, f"{where}.output")
        elif is_json(value, b"["):  # a string content or output has no images
            edit = self.parts(value, f"{where}.{key}")
        if edit is not None:
            self.found.objects[i] = obj
            self.found.edits[i] = (key, edit)


def _rebuild(parts: Parts, blocks: Sequence[str], flatten: bool) -> Any:
    """An input array with its images as text; one string if ``flatten`` and only plain
    ``input_text`` parts are left."""
    out: list[Any] = []
    texts: list[str] = []
    only_text = True
    for j, raw in enumerate(parts.raws):
        if j in parts.images:
            block = blocks[parts.images[j]]
            out.append({"type": "input_text", "text": block})
            texts.append(block)
        else:
            out.append(raw)
            if j in parts.texts:
                texts.append(parts.texts[j])
            else:
                only_text = False
    return "\n\n".join(texts) if flatten and only_text else out


def _error_event(code: str | None, message: str, param: str | None = None) -> bytes:
    event = {"type": "error", "code": code, "message": message, "param": param}
    return b"event: error\ndata: " + encoder.encode(event) + b"\n\n"


# The event a plain Response object stands for, by its status.
_FINAL_EVENTS = {b'"incomplete"': "response.incomplete", b'"failed"': "response.failed"}


class Responses(Dialect):
    """Responses requests go to ``api = "openai"`` upstreams; the OCR model is never asked in
    this dialect (it is called in its own upstream's, ``registry.BY_API``)."""

    name = "responses"
    api = "openai"
    path = "responses"
    items = "input"
    keep_alive = b": keep-alive\n\n"
    stream_usage_path = ("response", "usage")
    stream_usage_events = frozenset({"response.completed", "response.incomplete"})

    def check_items(self, items: msgspec.Raw | None) -> None:
        if items is not None and not (is_json(items, b"[") or is_json(items, b'"')):
            raise BadRequest("`input` must be a string or an array", param="input")

    def find(self, parsed: Parsed, max_images: int) -> Found:
        raw = parsed.obj.get("input")
        walker = _Walker(max_images)
        if raw is None or not is_json(raw, b"["):
            return walker.found  # a string input: text only
        walker.found.items = decode_raw(array_decoder, raw, "input")
        for i, item in enumerate(walker.found.items):
            walker.item(i, item)
        return walker.found

    def splice(self, parsed: Parsed, found: Found, blocks: Sequence[str], model: str) -> bytes:
        assert isinstance(found, Walk)
        if not found.edits:  # nothing to put in place: the input as it came (or absent)
            return self.encode(parsed.obj, parsed.obj.get("input"), model)
        items: list[Any] = list(found.items)
        for i, (key, edit) in found.edits.items():
            obj = found.objects[i]
            if isinstance(edit, int):
                value: Any = {"type": "input_text", "text": blocks[edit]}
            else:
                value = _rebuild(edit, blocks, flatten=kind_of(obj) in _TOOL_OUTPUTS)
            items[i] = {**obj, key: value}
        return self.encode(parsed.obj, items, model)

    def encode(self, obj: RawObject, items: Any, model: str) -> bytes:
        if items is not None:
            return super().encode(obj, items, model)
        out: dict[str, Any] = dict(obj)  # no `input` (previous_response_id): none is added
        out.pop("ocr_model", None)
        out["model"] = model
        return encoder.encode(out)

    def ocr_usage(self, usage: Mapping[str, Any]) -> dict[str, Any]:
        return dict(usage)  # already in the Responses' words: input_tokens, output_tokens

    def error_body(self, error: ProxyError) -> bytes:
        return error.to_bytes()

    def error_event(self, error: ProxyError | bytes) -> bytes:
        if isinstance(error, ProxyError):
            return _error_event(error.code or error.type, error.message, error.param)
        return b"event: error\ndata: " + error + b"\n\n"

    def upstream_error_event(self, status: int, payload: bytes) -> bytes:
        try:
            inner = object_decoder.decode(object_decoder.decode(payload)["error"])
            message = str_decoder.decode(inner["message"])
            code = string_field(inner, "code") or string_field(inner, "type") or str(status)
            return _error_event(code, message, string_field(inner, "param"))
        except (msgspec.DecodeError, KeyError):
            failed = UpstreamError(f"The upstream answered HTTP {status}", code=str(status))
            return self.error_event(failed)

    def as_events(self, payload: bytes) -> bytes:
        response = msgspec.Raw(msgspec.json.format(payload, indent=0))  # DecodeError: not JSON
        status = object_decoder.decode(response).get("status", b"")
        kind = _FINAL_EVENTS.get(bytes(status), "response.completed")
        event = encoder.encode({"type": kind, "response": response})
        return f"event: {kind}\ndata: ".encode() + event + b"\n\n"


RESPONSES = Responses()

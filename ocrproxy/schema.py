"""msgspec views of the OpenAI chat request and response, with shared encoders and decoders.

A plain Struct drops the fields it does not name, so nothing here is ever re-encoded as the
request: the views only *read*. Whatever must reach the upstream untouched is kept as
``msgspec.Raw`` (the exact bytes the client sent) and spliced back by ``rewrite``.
"""

from __future__ import annotations

from typing import Any

import msgspec


class OcrMessage(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None


class OcrChoice(msgspec.Struct):
    message: OcrMessage
    finish_reason: str | None = None


class OcrUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class OcrResponse(msgspec.Struct):
    """What the proxy reads of the OCR model's chat-completions answer."""

    choices: list[OcrChoice]
    usage: OcrUsage | None = None


class ModelsResponse(msgspec.Struct):
    data: list[dict[str, Any]]


RawObject = dict[str, msgspec.Raw]


def is_json(raw: msgspec.Raw, opening: bytes) -> bool:
    """Whether a raw JSON value is an array (``b"["``) or an object (``b"{"``)."""
    return bytes(memoryview(raw)[:1]) == opening


object_decoder = msgspec.json.Decoder(RawObject)
array_decoder = msgspec.json.Decoder(list[msgspec.Raw])
messages_decoder = msgspec.json.Decoder(list[RawObject])
ocr_response_decoder = msgspec.json.Decoder(OcrResponse)
models_decoder = msgspec.json.Decoder(ModelsResponse)
encoder = msgspec.json.Encoder()

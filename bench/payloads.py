"""Request bodies for the scenarios: small chats, streams, chats carrying distinct images, and
their Anthropic Messages and OpenAI Responses counterparts; ``API`` says where each dialect is
posted and how its stream ends."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

PLAIN_MODEL = "bench"
OCR_MODEL = "bench-ocr"  # the proxy's `-ocr` suffix: images go to the fake OCR model
QUESTION = "Summarise the attached material in three short bullet points, please."


def image_url(size: int) -> str:
    """A data URL of ``size`` bytes that no other call returns (random head, zero padding)."""
    raw = b"\x89PNG\r\n\x1a\n" + os.urandom(16)
    raw += bytes(max(0, size - len(raw)))
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def chat(
    model: str = PLAIN_MODEL, *, stream: bool = False, images: int = 0, size: int = 0
) -> bytes:
    """A one-message chat request; with ``images`` distinct images of ``size`` bytes each."""
    content: Any = QUESTION
    if images:
        content = [{"type": "text", "text": QUESTION}]
        content += [
            {"type": "image_url", "image_url": {"url": image_url(size)}} for _ in range(images)
        ]
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
        "temperature": 0.2,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def padded(size: int, *, stream: bool = False) -> bytes:
    """A plain (no OCR) chat body of about ``size`` bytes: the same weight as an image request."""
    base = chat(stream=stream)
    filler = "x" * max(0, size - len(base) - 64)
    body = orjson.loads(base)
    body["messages"].insert(0, {"role": "user", "content": filler})
    return orjson.dumps(body)


def messages(model: str = PLAIN_MODEL, *, stream: bool = False) -> bytes:
    """A one-message Anthropic Messages request, the chat request's counterpart (no OCR)."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 1024,
        "system": "You are a helpful assistant.",
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0.2,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def responses(model: str = PLAIN_MODEL, *, stream: bool = False) -> bytes:
    """A one-message OpenAI Responses request, the chat request's counterpart (no OCR)."""
    body: dict[str, Any] = {
        "model": model,
        "instructions": "You are a helpful assistant.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        "store": False,
        "temperature": 0.2,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


@dataclass(frozen=True)
class Api:
    """A dialect as the load drivers see it: its path, its bodies, its headers, and the text
    its stream's last event carries (a stream that never sent it did not end)."""

    name: str
    path: str
    body: Callable[..., bytes]
    end: str
    headers: dict[str, str] = field(default_factory=dict)


CHAT = Api("chat", "/v1/chat/completions", chat, "[DONE]")
MESSAGES = Api(
    "messages", "/v1/messages", messages, "message_stop", {"anthropic-version": "2023-06-01"}
)
RESPONSES = Api("responses", "/v1/responses", responses, "response.completed")
API = {api.name: api for api in (CHAT, MESSAGES, RESPONSES)}

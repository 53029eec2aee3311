"""A fake Anthropic Messages upstream: a text-only model that refuses images as DeepSeek does.

It runs as a real aiohttp server on 127.0.0.1, serving ``/v1/messages``,
``/v1/messages/count_tokens`` and ``/v1/models``. A request whose messages hold an image block
anywhere (top level, ``tool_result.content``, a ``document``'s content source) gets DeepSeek's
exact 400. Models named ``claude-haiku*`` can see: they act as an OCR model and describe the
image from its label (``tests.fakes.png``). ``fail-429`` answers 429 (``rate_limited`` times,
then normally). Everything else echoes: the plain answer's text is the last user message's text,
and a stream is Anthropic's event sequence with ``usage`` in ``message_start`` and
``message_delta``; ``deepseek-plain`` answers a plain message even when asked to stream.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import Received


def image_block(data: str | None = None, *, url: str | None = None, **extra: Any) -> dict[str, Any]:
    """An Anthropic image block: base64 ``data`` (PNG) or a ``url`` source."""
    if url is not None:
        source: dict[str, Any] = {"type": "url", "url": url}
    else:
        source = {"type": "base64", "media_type": "image/png", "data": data}
    return {"type": "image", "source": source, **extra}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _has_image(value: Any) -> str | None:
    """Where the first image block is, as DeepSeek names it (``messages[i].content``)."""
    for i, message in enumerate(value):
        content = message.get("content")
        if isinstance(content, list) and _blocks_have_image(content):
            return f"messages[{i}].content"
    return None


def _blocks_have_image(blocks: list[Any]) -> bool:
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "image":
            return True
        inner = block.get("content")
        if isinstance(inner, list) and _blocks_have_image(inner):
            return True
        source = block.get("source")
        if isinstance(source, dict) and isinstance(source.get("content"), list):
            if _blocks_have_image(source["content"]):
                return True
    return False


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if block.get("type") == "text":
            parts.append(block["text"])
        elif block.get("type") == "tool_result":
            parts.append(_text_of(block.get("content", "")))
    return "\n".join(parts)


DEEPSEEK_REFUSAL = (
    "Failed to deserialize the JSON body into the target type: {where}: unknown variant "
    "`image`, expected one of `text`, `tool_use`, `tool_result`, `thinking` at line 1 column 1"
)


@dataclass
class FakeAnthropic:
    url: str = ""  # the base URL, as vendors document ANTHROPIC_BASE_URL (no /v1)
    received: list[Received] = field(default_factory=list)
    ocr_calls: list[str] = field(default_factory=list)
    rate_limited: int = 1  # how many times `fail-429` answers 429 before it answers
    models_list: list[str] = field(default_factory=lambda: ["deepseek-v4-pro", "claude-haiku-4-5"])

    def app(self) -> web.Application:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model_id}", self.model)
        return app

    @property
    def message_requests(self) -> list[Received]:
        """Requests to the text model (not OCR calls), in arrival order."""
        return [
            r
            for r in self.received
            if r.path.startswith("/v1/messages")
            and not r.path.startswith("/v1/messages/count_tokens")
            and not r.json().get("model", "").startswith("claude-haiku")
        ]

    async def _record(self, request: web.Request) -> Received:
        body = await request.read()
        item = Received(request.path_qs, request.method, dict(request.headers), body)
        self.received.append(item)
        return item

    @staticmethod
    def _error(status: int, kind: str, message: str) -> web.Response:
        return web.json_response(
            {"type": "error", "error": {"type": kind, "message": message}}, status=status
        )

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = (await self._record(request)).json()
        model = body.get("model", "")
        if model.startswith("claude-haiku"):
            return self.describe(body)
        where = _has_image(body.get("messages", []))
        if where is not None:
            return self._error(400, "invalid_request_error", DEEPSEEK_REFUSAL.format(where=where))
        if model == "fail-429" and self.rate_limited > 0:
            self.rate_limited -= 1
            response = self._error(429, "rate_limit_error", "Rate limited")
            response.headers["retry-after"] = "0"
            return response
        text = "echo: " + _text_of(body["messages"][-1]["content"])
        if body.get("stream") and model != "deepseek-plain":  # that one never streams
            return await self.stream(request, model, text)
        return web.json_response(
            {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 42, "output_tokens": 7},
            },
            headers={"request-id": "req_fake"},
        )

    async def stream(self, request: web.Request, model: str, text: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 42, "output_tokens": 1},
        }
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            ("ping", {"type": "ping"}),
        ]
        for word in text.split(" "):
            delta = {"type": "text_delta", "text": word + " "}
            events.append(
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            )
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 17},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        for name, data in events:
            await response.write(f"event: {name}\ndata: ".encode() + orjson.dumps(data) + b"\n\n")
        return response

    def describe(self, body: dict[str, Any]) -> web.Response:
        content = body["messages"][0]["content"]
        source = next(b["source"] for b in content if b["type"] == "image")
        label = base64.b64decode(source["data"])[8:].rstrip(b"\0").decode()
        self.ocr_calls.append(label)
        return web.json_response(
            {
                "id": "msg_ocr",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": f"Claude sees {label}."}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 300, "output_tokens": 30},
            }
        )

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = (await self._record(request)).json()
        where = _has_image(body.get("messages", []))
        if where is not None:
            return self._error(400, "invalid_request_error", DEEPSEEK_REFUSAL.format(where=where))
        size = len(orjson.dumps(body.get("messages"))) + len(orjson.dumps(body.get("system", "")))
        return web.json_response({"input_tokens": size // 4})

    async def model(self, request: web.Request) -> web.Response:
        await self._record(request)
        model_id = request.match_info["model_id"]
        if model_id not in self.models_list:
            return self._error(404, "not_found_error", f"model: {model_id}")
        return web.json_response({"type": "model", "id": model_id, "display_name": model_id})

    async def models(self, request: web.Request) -> web.Response:
        await self._record(request)
        data = [
            {
                "type": "model",
                "id": m,
                "display_name": m.replace("-", " ").title(),
                "created_at": "2026-01-01T00:00:00Z",
            }
            for m in self.models_list
        ]
        return web.json_response(
            {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        )

"""A fake text-only upstream that turns images away in each vendor's words.

It serves Chat Completions, Responses, Messages and its ``count_tokens`` on 127.0.0.1. A
request with any image part (``image_url``, ``input_image``, ``image``) is refused as the
model's name prefix says: ``deepseek-`` (a serde 400 naming the part's type, in the route's
error shape), ``or-`` (OpenRouter's 404), ``glm-`` (GLM's code 1210), ``generic-`` ("does not
support image input"), ``picky-`` (a complaint about the image, which is not a rejection),
``plain-`` (a text/plain rejection). ``always-`` refuses every request as DeepSeek does, images
or not; a ``glm-`` request with ``"bad": true`` gets 1210 without any image. Text requests are
answered in the route's shape (streamed if asked), echoing the last message's text.
``GET /v1/models`` lists only ``listed``: the fake takes any model name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import Received

IMAGE_TYPES = frozenset({"image_url", "input_image", "image"})
DEEPSEEK = (
    "Failed to deserialize the JSON body into the target type: messages[0]: unknown variant "
    "`{kind}`, expected `text` at line 1 column 200"
)
GLM = {"error": {"code": "1210", "message": "API 调用参数有误，请检查文档。"}}
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def image_kind(value: Any) -> str | None:
    """The type of the first image part anywhere in ``value``, or None."""
    if isinstance(value, dict):
        if value.get("type") in IMAGE_TYPES:
            return str(value["type"])
        values: Any = value.values()
    elif isinstance(value, list):
        values = value
    else:
        return None
    for item in values:
        found = image_kind(item)
        if found:
            return found
    return None


def text_of(value: Any) -> str:
    """Every text string in ``value``, joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(text_of(v) for k, v in value.items() if k in ("text", "content"))
    if isinstance(value, list):
        return " ".join(text_of(v) for v in value)
    return ""


def _json(status: int, obj: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


@dataclass
class FakeRejecting:
    url: str = ""
    received: list[Received] = field(default_factory=list)
    listed: tuple[str, ...] = ("deepseek-chat", "glm-4.5")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        """A list that leaves out models the fake takes (as gateways' deployment names are)."""
        return _json(200, {"object": "list", "data": [{"id": m} for m in self.listed]})

    def images_seen(self) -> list[str | None]:
        """Per request received, the first image part's type (None: it had none)."""
        return [image_kind(r.json()) for r in self.received]

    async def _take(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        body = await request.read()
        self.received.append(Received(request.path_qs, request.method, dict(request.headers), body))
        obj = orjson.loads(body)
        return obj, self._refusal(obj, anthropic=request.path.startswith("/v1/messages"))

    @staticmethod
    def _refusal(obj: dict[str, Any], *, anthropic: bool) -> web.Response | None:
        model = str(obj.get("model", ""))
        if model.startswith("glm-") and obj.get("bad"):
            return _json(400, GLM)
        kind = image_kind(obj)
        if model.startswith("always-"):
            kind = kind or "image_url"
        elif kind is None:
            return None
        if model.startswith(("deepseek-", "always-")):
            message = DEEPSEEK.format(kind=kind)
            if anthropic:
                error = {"type": "invalid_request_error", "message": message}
                return _json(400, {"type": "error", "error": error})
            error = {"message": message, "type": "invalid_request_error", "param": None}
            return _json(400, {"error": {**error, "code": "invalid_request_error"}})
        if model.startswith("or-"):
            return _json(
                404,
                {"error": {"message": "No endpoints found that support image input", "code": 404}},
            )
        if model.startswith("glm-"):
            return _json(400, GLM)
        if model.startswith("generic-"):
            return _json(400, {"error": {"message": f"{model} does not support image input."}})
        if model.startswith("picky-"):
            return _json(400, {"error": {"message": "Invalid image: could not be decoded"}})
        if model.startswith("plain-"):
            return web.Response(status=400, text="images are not supported by this model")
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        obj, refusal = await self._take(request)
        if refusal is not None:
            return refusal
        model, text = obj["model"], "echo: " + text_of(obj["messages"][-1])
        if not obj.get("stream"):
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1}
            return _json(200, {**answer, "model": model, "choices": [choice], "usage": USAGE})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
        chunks: list[dict[str, Any]] = [
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}}]},
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        if (obj.get("stream_options") or {}).get("include_usage"):
            chunks.append({**head, "choices": [], "usage": USAGE})
        for chunk in chunks:
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def messages(self, request: web.Request) -> web.StreamResponse:
        obj, refusal = await self._take(request)
        if refusal is not None:
            return refusal
        text = "echo: " + text_of(obj["messages"][-1])
        return _json(
            200,
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": obj["model"],
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 7, "output_tokens": 3},
            },
        )

    async def count_tokens(self, request: web.Request) -> web.Response:
        obj, refusal = await self._take(request)
        if refusal is not None:
            return refusal
        return _json(200, {"input_tokens": len(text_of(obj["messages"]).split())})

    async def responses(self, request: web.Request) -> web.Response:
        obj, refusal = await self._take(request)
        if refusal is not None:
            return refusal
        content = [
            {"type": "output_text", "text": "echo: " + text_of(obj["input"]), "annotations": []}
        ]
        item = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant"}
        return _json(
            200,
            {
                "id": "resp_1",
                "object": "response",
                "created_at": 1,
                "status": "completed",
                "model": obj["model"],
                "output": [{**item, "content": content}],
                "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
            },
        )

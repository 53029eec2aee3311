"""A fake OpenAI Responses upstream: a text-only model that refuses images.

It runs as a real aiohttp server on 127.0.0.1, serving ``POST /v1/responses``. A request with an
``input_image`` anywhere in its body gets a 400 in OpenAI's error shape, as a text-only provider
answers. Everything else echoes: the answer's text is ``echo: `` plus the text of the last input
item (the string ``input`` itself, a message's text parts, a tool output's text). A stream is the
Responses event sequence (``event:`` + ``data:``, no ``[DONE]``), ending in
``response.completed`` with ``usage`` (``response.incomplete`` for ``incomplete-*`` models); its
``response.in_progress`` event carries a usage object of its own, so that a test can tell that
only the final event gains ``usage.ocr``. ``fail-400`` answers a 400 of its own; ``plain-*``
models answer a plain JSON response even to a streaming request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import Received

USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 5,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 17,
}


def image_at(value: Any, where: str = "input") -> str | None:
    """Where the first ``input_image`` of a JSON value is, or None."""
    if isinstance(value, dict):
        if value.get("type") == "input_image":
            return where
        for key, inner in value.items():
            found = image_at(inner, f"{where}.{key}")
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            found = image_at(inner, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def text_of(value: Any) -> str:
    """The text of an input item (or of the whole input, if it is a string)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(text_of(part) for part in value)
    if isinstance(value, dict):
        if value.get("type") in ("input_text", "output_text"):
            return str(value.get("text", ""))
        for key in ("content", "output"):
            if key in value:
                return text_of(value[key])
    return ""


def _error(status: int, message: str, param: str | None, code: str | None) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return web.json_response(body, status=status)


@dataclass
class FakeResponses:
    url: str = ""
    received: list[Received] = field(default_factory=list)
    chunk_delay: float = 0.0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_post("/v1/responses", self.responses)
        return app

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path_qs, request.method, dict(request.headers), body))
        obj = orjson.loads(body)
        where = image_at(obj.get("input"))
        model = obj.get("model", "")
        if where is not None:
            message = f"Invalid value at '{where}': the model `{model}` does not support images."
            return _error(400, message, where, "invalid_value")
        if model == "fail-400":
            return _error(400, "bad thing", None, "x")
        items = obj.get("input")
        last = items[-1] if isinstance(items, list) and items else items
        text = "echo: " + text_of(last)
        status = "incomplete" if model.startswith("incomplete-") else "completed"
        if obj.get("stream") and not model.startswith("plain-"):
            return await self.stream(request, model, text, status)
        return web.json_response(self._response(model, text, status, USAGE))

    @staticmethod
    def _response(
        model: str, text: str, status: str, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        output = []
        if status != "in_progress":
            message = {"type": "output_text", "text": text, "annotations": []}
            output.append(
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [message],
                }
            )
        return {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "status": status,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        }

    async def stream(
        self, request: web.Request, model: str, text: str, status: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        part = {"type": "output_text", "text": "", "annotations": []}
        item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress"}
        ids = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
        partial = {"input_tokens": 12, "output_tokens": 0, "total_tokens": 12}
        events: list[dict[str, Any]] = [
            {
                "type": "response.created",
                "response": self._response(model, "", "in_progress", None),
            },
            {
                "type": "response.in_progress",
                "response": self._response(model, "", "in_progress", partial),
            },
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "content": []},
            },
            {"type": "response.content_part.added", **ids, "part": part},
        ]
        words = text.split(" ")
        for n, word in enumerate(words):
            delta = word + (" " if n < len(words) - 1 else "")
            events.append(
                {"type": "response.output_text.delta", **ids, "delta": delta, "logprobs": []}
            )
        done_part = {**part, "text": text}
        events += [
            {"type": "response.output_text.done", **ids, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **ids, "part": done_part},
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": {**item, "status": "completed", "content": [done_part]},
            },
            {"type": f"response.{status}", "response": self._response(model, text, status, USAGE)},
        ]
        for number, event in enumerate(events):
            event["sequence_number"] = number
            name = event["type"].encode()
            await response.write(b"event: " + name + b"\ndata: " + orjson.dumps(event) + b"\n\n")
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        return response

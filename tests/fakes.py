"""A fake OpenAI-compatible upstream that plays both the text model and the OCR model.

It runs as a real aiohttp server on 127.0.0.1. Models whose name starts with ``vision`` (or
``gpt-4o-mini``) act as the OCR model: they answer with a description derived from the image, so
a test can tell which image a description belongs to. Every other model echoes what it received.
Special model names select failure modes (``fail-500``, ``slow-stream``, ``hang``...).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


def png(label: str, size: int = 0) -> bytes:
    """Bytes that start like a PNG and carry ``label`` (padded to ``size`` bytes)."""
    data = b"\x89PNG\r\n\x1a\n" + label.encode()
    if size > len(data):
        data += b"\0" * (size - len(data))
    return data


def data_url(label: str, size: int = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(png(label, size)).decode()


def label_of(url: str) -> str:
    """The label a test image carries, or a short hash for remote URLs."""
    if url.startswith("data:"):
        raw = base64.b64decode(url.partition(",")[2])
        return raw[8:].rstrip(b"\0").decode()
    return "url:" + hashlib.sha256(url.encode()).hexdigest()[:8]


def image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    image_url: dict[str, Any] = {"url": url}
    if detail:
        image_url["detail"] = detail
    return {"type": "image_url", "image_url": image_url}


def is_ocr_model(model: str) -> bool:
    return model.startswith(("vision", "gpt-4o-mini"))


@dataclass
class Received:
    path: str
    method: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def ocr_answer(model: str, text: str, tokens: tuple[int, int] = (1, 1)) -> web.Response:
    """A chat completion as an OCR model answers: ``text``, and (prompt, completion) tokens."""
    prompt, completion = tokens
    return web.json_response(
        {
            "id": "chatcmpl-ocr",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


@dataclass
class FakeOpenAI:
    """State and handlers of the fake upstream."""

    url: str = ""
    ocr_delay: float = 0.0
    ocr_fail: set[str] = field(default_factory=set)  # labels whose OCR call answers 500
    # label -> statuses to answer with, one per call, before answering normally
    ocr_flaky: dict[str, list[int]] = field(default_factory=dict)
    retry_after: str | None = None
    bytes_written: int = 0
    chunks: int = 5
    chunk_delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    ocr_calls: list[str] = field(default_factory=list)
    ocr_active: int = 0
    ocr_peak: int = 0
    ocr_windows: list[tuple[float, float]] = field(default_factory=list)
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)
    models_list: list[str] = field(default_factory=lambda: ["gpt-3.5-turbo", "deepseek-chat"])

    def app(self) -> web.Application:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_route("*", "/v1/{tail:.*}", self.echo)
        return app

    @property
    def chat_requests(self) -> list[Received]:
        """Requests to text models (not OCR calls), in arrival order."""
        return [
            r
            for r in self.received
            if r.path == "/v1/chat/completions" and not is_ocr_model(r.json().get("model", ""))
        ]

    async def _record(self, request: web.Request) -> Received:
        body = await request.read()
        item = Received(request.path_qs, request.method, dict(request.headers), body)
        self.received.append(item)
        return item

    async def chat(self, request: web.Request) -> web.StreamResponse:
        item = await self._record(request)
        body = item.json()
        model = body.get("model", "")
        if is_ocr_model(model):
            return await self.describe(body)
        if model == "fail-500":
            return web.json_response(
                {"error": {"message": "upstream exploded", "type": "server_error", "code": None}},
                status=500,
            )
        if model == "fail-400":
            return web.json_response(
                {"error": {"message": "bad thing", "type": "invalid_request_error", "code": "x"}},
                status=400,
            )
        if model == "hang":
            await asyncio.sleep(3600)
        if model == "echo-key":  # a careless upstream that echoes the credentials it got
            return web.json_response(
                {"error": {"message": f"bad key {request.headers.get('Authorization')}"}},
                status=401,
            )
        if model == "firehose":
            return await self.firehose(request)
        if model in ("die-mid-stream", "stall-mid-stream"):
            return await self.broken_stream(request, model)
        if body.get("stream"):
            return await self.stream(request, body)
        content = body["messages"][-1].get("content")
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"echo: {content}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            },
            headers={"X-Request-Id": "upstream-req-1"},
        )

    async def stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        slow = body["model"] == "slow-stream"
        count = 1000 if slow else self.chunks
        try:
            for i in range(count):
                chunk = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}
                    ],
                }
                if (body.get("stream_options") or {}).get("include_usage"):
                    chunk["usage"] = None
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                if slow or self.chunk_delay:
                    await asyncio.sleep(0.05 if slow else self.chunk_delay)
            if (body.get("stream_options") or {}).get("include_usage"):
                final = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body["model"],
                    "choices": [],
                    "usage": {"prompt_tokens": 11, "completion_tokens": count, "total_tokens": 99},
                }
                await response.write(b"data: " + orjson.dumps(final) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_closed.set()
            raise
        if request.transport is None or request.transport.is_closing():
            self.stream_closed.set()
        return response

    async def firehose(self, request: web.Request) -> web.StreamResponse:
        """128 MB of SSE as fast as the reader takes it; counts what it managed to write."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
        try:
            for _ in range(2048):
                await response.write(event)
                self.bytes_written += len(event)
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_closed.set()
            raise
        return response

    async def broken_stream(self, request: web.Request, model: str) -> web.StreamResponse:
        """Two chunks, then the connection dies (or goes silent for a long time)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(2):
            chunk = {"choices": [{"index": 0, "delta": {"content": f"p{i}"}}]}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if model == "stall-mid-stream":
            await asyncio.sleep(3600)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def describe(self, body: dict[str, Any]) -> web.Response:
        content = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        label = label_of(url)
        self.ocr_calls.append(label)
        self.ocr_active += 1
        self.ocr_peak = max(self.ocr_peak, self.ocr_active)
        started = time.monotonic()
        try:
            if self.ocr_delay:
                await asyncio.sleep(self.ocr_delay)
        finally:
            self.ocr_active -= 1
            self.ocr_windows.append((started, time.monotonic()))
        flaky = self.ocr_flaky.get(label)
        if flaky:
            status = flaky.pop(0)
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response(
                {"error": {"message": f"flaky {status}", "type": "server_error"}},
                status=status,
                headers=headers,
            )
        if label in self.ocr_fail:
            return web.json_response(
                {"error": {"message": "vision backend down", "type": "server_error"}}, status=500
            )
        return ocr_answer(body["model"], f"A picture showing {label}.", (100, 20))

    async def models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "owned_by": "fake"} for m in self.models_list
                ],
            }
        )

    async def echo(self, request: web.Request) -> web.Response:
        item = await self._record(request)
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": item.headers,
                "length": len(item.body),
                "sha256": hashlib.sha256(item.body).hexdigest(),
            },
            status=201 if request.method == "PUT" else 200,
            headers={"X-Fake-Header": "kept", "X-Request-Id": "upstream-echo"},
        )

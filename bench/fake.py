"""A fast fake OpenAI upstream and fake OCR model: raw asyncio HTTP/1.1, uvloop when installed.

It must cost far less than the proxy, so it is a bare ``asyncio.Protocol`` (no routing, no
middleware): keep-alive, ``Content-Length`` request bodies, fixed answers. Behaviour per request:

- A body that starts with ``{"model":"vision`` is an OCR call (the proxy's describer encodes
  ``model`` first): the answer is a fixed description after ``--ocr-delay`` seconds, or after
  the model name's seconds for ``vision-delay-<seconds>`` (the retry scenario's OCR latency).
- A body containing ``"stream":true`` gets an SSE stream (chunked encoding) of
  ``X-Bench-Chunks`` chunks (default 20), ``X-Bench-Delay`` seconds apart, then ``[DONE]``.
  ``X-Bench-Hold`` seconds after the first chunk keeps the stream idle (for the memory scenario).
- Anything else gets a small chat completion. ``X-Bench-Latency`` delays any answer.
- ``X-Bench-Fail-Once: <token>`` on a POST that is not an OCR call: the first such request
  with that token gets a 429 rate-limit error (with ``retry-after-ms: 10``, so an SDK retries at
  once), later ones are answered as usual; ``X-Bench-Calls: <token>`` on any request answers
  ``{"calls": n}``, how many POSTs carried that token (the retry scenario's upstream calls).
- A request to ``/v1/messages`` is answered in Anthropic's shapes instead: a small ``message``,
  or a stream of ``message_start``, ``content_block_start``, ``ping``, ``X-Bench-Chunks``
  ``content_block_delta`` events (paced as above), ``content_block_stop``, ``message_delta``
  (with ``usage``) and ``message_stop``, each event in a chunk of its own.
- A request to ``/v1/responses`` is answered in the OpenAI Responses shapes: a small
  ``response`` object, or a stream of ``response.created``, ``response.output_item.added``,
  ``response.content_part.added``, ``X-Bench-Chunks`` ``response.output_text.delta`` events,
  ``response.output_text.done`` and ``response.completed`` (with ``usage``), numbered by
  ``sequence_number``, without ``[DONE]``.

Run: ``python -m bench.fake --port 9001 [--port 9002] --ocr-delay 0.3``; it prints ``READY``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

COMPLETION = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help '
    b'you today?"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}'
)
DESCRIPTION = (
    b'{"id":"chatcmpl-ocr","object":"chat.completion","created":1,"model":"vision-bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"TEXT:\\n(no text)\\n'
    b'DESCRIPTION:\\nA grey benchmark square."},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120}}'
)
CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
    b'"model":"bench","choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}'
    b"\n\n"
)
DONE = b"data: [DONE]\n\n"
MESSAGE = (
    b'{"id":"msg_bench","type":"message","role":"assistant","model":"bench",'
    b'"content":[{"type":"text","text":"Hello! How can I help you today?"}],'
    b'"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,'
    b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":9}}'
)
MESSAGE_START = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_bench","type":"message",'
    b'"role":"assistant","content":[],"model":"bench","stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,'
    b'"output_tokens":1}}}\n\n'
)
BLOCK_START = (
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'
    b"\n\n"
)
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
DELTA = (
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"tok "}}'
    b"\n\n"
)
BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
MESSAGE_DELTA = (
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":%d}}\n\n'
)
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
OUTPUT = (
    b'[{"id":"msg_bench","type":"message","role":"assistant","status":"completed",'
    b'"content":[{"type":"output_text","text":"%s","annotations":[]}]}]'
)
RESPONSES_USAGE = (
    b'{"input_tokens":12,"input_tokens_details":{"cached_tokens":0},"output_tokens":%d,'
    b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":%d}'
)
RESPONSE = (
    b'{"id":"resp_bench","object":"response","created_at":1,"status":"completed",'
    b'"model":"bench","output":'
    + OUTPUT % b"Hello! How can I help you today?"
    + b',"usage":'
    + RESPONSES_USAGE % (9, 21)
    + b"}"
)
RESPONSE_CREATED = (
    b"event: response.created\n"
    b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_bench",'
    b'"object":"response","created_at":1,"status":"in_progress","model":"bench","output":[],'
    b'"usage":null}}\n\n'
)
ITEM_ADDED = (
    b"event: response.output_item.added\n"
    b'data: {"type":"response.output_item.added","sequence_number":1,"output_index":0,'
    b'"item":{"id":"msg_bench","type":"message","role":"assistant","status":"in_progress",'
    b'"content":[]}}\n\n'
)
PART_ADDED = (
    b"event: response.content_part.added\n"
    b'data: {"type":"response.content_part.added","sequence_number":2,"item_id":"msg_bench",'
    b'"output_index":0,"content_index":0,"part":{"type":"output_text","text":"",'
    b'"annotations":[]}}\n\n'
)
TEXT_DELTA = (
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","sequence_number":%d,"item_id":"msg_bench",'
    b'"output_index":0,"content_index":0,"delta":"tok ","logprobs":[]}\n\n'
)
TEXT_DONE = (
    b"event: response.output_text.done\n"
    b'data: {"type":"response.output_text.done","sequence_number":%d,"item_id":"msg_bench",'
    b'"output_index":0,"content_index":0,"text":"%s","logprobs":[]}\n\n'
)
RESPONSE_COMPLETED = (
    b"event: response.completed\n"
    b'data: {"type":"response.completed","sequence_number":%d,"response":{"id":"resp_bench",'
    b'"object":"response","created_at":1,"status":"completed","model":"bench","output":%s,'
    b'"usage":%s}}\n\n'
)


def _plain(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
OCR_ANSWER = _plain(DESCRIPTION)
RATE_LIMITED_BODY = (
    b'{"error":{"message":"Rate limit reached for bench (fake): try again","type":"requests",'
    b'"param":null,"code":"rate_limit_exceeded"}}'
)
RATE_LIMITED = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nretry-after-ms: 10\r\n"
    b"Content-Length: " + str(len(RATE_LIMITED_BODY)).encode() + b"\r\n\r\n" + RATE_LIMITED_BODY
)
_DELAY_MODEL = b'{"model":"vision-delay-'
END = b"0\r\n\r\n"  # the last chunk of a chunked body


@dataclass(frozen=True)
class Shapes:
    """How one dialect answers: its plain answer, its stream's opening frames, its ``i``-th
    chunk (0-based), and the frames after ``n`` chunks (the chunked body's end included)."""

    plain: bytes
    head: bytes
    chunk: Callable[[int], bytes]
    end: Callable[[int], bytes]


def _frames(*events: bytes) -> bytes:
    return b"".join(_chunk(event) for event in events)


def _constant(frame: bytes) -> Callable[[int], bytes]:
    return lambda _: frame


def _messages_end(n: int) -> bytes:
    return _frames(BLOCK_STOP, MESSAGE_DELTA % n, MESSAGE_STOP) + END


def _responses_end(n: int) -> bytes:
    text = b"tok " * n
    usage = RESPONSES_USAGE % (n, 12 + n)
    done = TEXT_DONE % (3 + n, text)
    return _frames(done, RESPONSE_COMPLETED % (4 + n, OUTPUT % text, usage)) + END


CHAT = Shapes(
    _plain(COMPLETION), STREAM_HEAD, _constant(_chunk(CHUNK)), _constant(_chunk(DONE) + END)
)
MESSAGES = Shapes(
    _plain(MESSAGE),
    STREAM_HEAD + _frames(MESSAGE_START, BLOCK_START, PING),
    _constant(_chunk(DELTA)),
    _messages_end,
)
RESPONSES = Shapes(
    _plain(RESPONSE),
    STREAM_HEAD + _frames(RESPONSE_CREATED, ITEM_ADDED, PART_ADDED),
    lambda i: _chunk(TEXT_DELTA % (3 + i)),
    _responses_end,
)
ROUTES = ((b"POST /v1/messages", MESSAGES), (b"POST /v1/responses", RESPONSES))


def shapes(request_line: bytes) -> Shapes:
    """The dialect a request line asks for: Messages, Responses, or (any other path) chat."""
    for prefix, found in ROUTES:
        if request_line.startswith(prefix):
            return found
    return CHAT


class FakeUpstream(asyncio.Protocol):
    """One connection: parse requests one at a time, answer each."""

    ocr_delay = 0.0
    fail_once: ClassVar[dict[bytes, int]] = {}  # X-Bench-Fail-Once token -> requests with it

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy: asyncio.Task[None] | None = None
        self.head: tuple[dict[bytes, bytes], int, Shapes] | None = None  # headers, length

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy is not None and not self.busy.done():
            self.busy.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.busy is None:
            self._parse()

    def _parse(self) -> None:
        while self.transport is not None:
            if self.head is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(self.buffer[:end]).split(b"\r\n")
                del self.buffer[: end + 4]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                self.head = headers, int(headers.get(b"content-length", b"0")), shapes(lines[0])
            headers, length, dialect = self.head
            if len(self.buffer) < length:
                return
            body = bytes(self.buffer[:length])
            del self.buffer[:length]
            self.head = None
            if not self._answer(headers, body, dialect):
                return

    def _answer(self, headers: dict[bytes, bytes], body: bytes, dialect: Shapes) -> bool:
        """Answer now (True), or start a task that answers and resumes parsing (False)."""
        assert self.transport is not None
        latency = float(headers.get(b"x-bench-latency", b"0"))
        is_ocr = dialect is CHAT and body.startswith(b'{"model":"vision')
        stream = not is_ocr and b'"stream":true' in body
        asked = headers.get(b"x-bench-calls")
        if asked is not None:
            self.transport.write(_plain(b'{"calls":%d}' % self.fail_once.get(asked, 0)))
            return True
        # Only a POST (it has a body) counts: the proxy's model-list GET carries the header too.
        token = None if is_ocr or not body else headers.get(b"x-bench-fail-once")
        if token is not None:
            self.fail_once[token] = self.fail_once.get(token, 0) + 1
            if self.fail_once[token] == 1:
                self.transport.write(RATE_LIMITED)
                return True
        ocr_delay = self.ocr_delay
        if is_ocr and body.startswith(_DELAY_MODEL):
            ocr_delay = float(body[len(_DELAY_MODEL) : body.index(b'"', len(_DELAY_MODEL))])
        if not stream and not is_ocr and not latency:
            self.transport.write(dialect.plain)
            return True
        self.busy = asyncio.get_running_loop().create_task(
            self._slow(headers, latency, ocr_delay if is_ocr else None, stream, dialect)
        )
        return False

    async def _slow(
        self,
        headers: dict[bytes, bytes],
        latency: float,
        ocr_delay: float | None,  # an OCR call's latency; None: not an OCR call
        stream: bool,
        dialect: Shapes,
    ) -> None:
        transport = self.transport
        assert transport is not None
        if latency:
            await asyncio.sleep(latency)
        if ocr_delay is not None:
            await asyncio.sleep(ocr_delay)
            transport.write(OCR_ANSWER)
        elif stream:
            chunks = int(headers.get(b"x-bench-chunks", b"20"))
            delay = float(headers.get(b"x-bench-delay", b"0"))
            hold = float(headers.get(b"x-bench-hold", b"0"))
            transport.write(dialect.head)
            chunk = dialect.chunk
            for i in range(chunks):
                transport.write(chunk(i))
                if i == 0 and hold:
                    await asyncio.sleep(hold)
                if delay:
                    await asyncio.sleep(delay)
                elif i % 8 == 7:
                    await asyncio.sleep(0)  # let other connections and the reader in
                if transport.is_closing():
                    return
            transport.write(dialect.end(chunks))
        else:
            transport.write(dialect.plain)
        self.busy = None
        if self.buffer:
            self._parse()


def install_uvloop() -> str:
    """Use uvloop for every new event loop when it is installed; return the loop's name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(ports: list[int], ocr_delay: float) -> None:
    FakeUpstream.ocr_delay = ocr_delay
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(FakeUpstream, "127.0.0.1", port, backlog=4096) for port in ports
    ]
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fake")
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--ocr-delay", type=float, default=0.3)
    args = parser.parse_args()
    install_uvloop()
    try:
        asyncio.run(serve(args.port, args.ocr_delay))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

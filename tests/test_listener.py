"""The listener's own limits, against a real `ocrproxy serve` and raw sockets: the header timeout
(silent, dripping and idle keep-alive connections), the body timeout, and the budget of buffered
request bytes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson

from tests.conftest import chat, encode, spawn_proxy
from tests.fakes import FakeOpenAI


def _toml(fake: FakeOpenAI, server: str) -> str:
    return (
        f'[server]\nlog_level = "warning"\n{server}\n'
        f'[[upstreams]]\nname = "fake"\nbase_url = "{fake.url}"\n'
    )


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _address(base: str) -> tuple[str, int]:
    host, _, port = base.removeprefix("http://").rpartition(":")
    return host, int(port)


async def _closed_within(reader: asyncio.StreamReader, timeout: float) -> float | None:
    """Seconds until the server closed the connection (reading all it sent), None if it did
    not within ``timeout``."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def _connections(
    base: str, count: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    host, port = _address(base)
    conns = [await asyncio.open_connection(host, port) for _ in range(count)]
    try:
        yield conns
    finally:
        for _, writer in conns:
            writer.close()


async def _drip(writer: asyncio.StreamWriter, every: float) -> None:
    """The start of a request, then one header byte every ``every`` seconds, never the end."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: ")
    with contextlib.suppress(ConnectionError):
        while True:
            await asyncio.sleep(every)
            writer.write(b"a")
            await writer.drain()


async def _one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    await reader.readexactly(length)


async def test_silent_dripping_and_idle_connections_are_closed_after_the_header_timeout(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Guards against this: the listener had no header timeout: connections that send nothing,
    that drip a header byte every few seconds, or that idle after one keep-alive request were
    held forever (fd exhaustion by unauthenticated clients)."""
    timeout = 1.0
    per_kind = 50
    async with spawn_proxy(tmp_path, _toml(fake, f"header_timeout_s = {timeout}")) as served:
        proc, base, _, _ = served
        before = fds(proc.pid)
        async with (
            _connections(base, per_kind) as silent,
            _connections(base, per_kind) as dripping,
            _connections(base, per_kind) as idle,
        ):
            drips = [asyncio.ensure_future(_drip(w, 0.2)) for _, w in dripping]
            try:
                await asyncio.gather(*(_one_request(r, w) for r, w in idle))
                opened = time.monotonic()
                during = fds(proc.pid)
                waits = await asyncio.gather(
                    *(_closed_within(r, timeout + 10) for r, _ in silent + dripping + idle)
                )
                all_closed = time.monotonic() - opened
                after = fds(proc.pid)
            finally:
                for task in drips:
                    task.cancel()
                await asyncio.gather(*drips, return_exceptions=True)
    still_open = [i for i, w in enumerate(waits) if w is None]
    assert not still_open, f"{len(still_open)} of {len(waits)} connections still open"
    assert during >= before + 3 * per_kind - 5, (before, during)
    assert after <= before + 5, (before, during, after)
    # Closed soon after the timeout, not at some other limit (generous for a loaded machine).
    assert all_closed < timeout + 5, all_closed


async def test_a_request_whose_headers_arrived_is_not_cut_by_the_header_timeout(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The header timer stops once the headers are in: a slow answer outlives it."""
    fake.chunks, fake.chunk_delay = 4, 0.6  # a 2.4 s stream, header timeout 1 s
    async with spawn_proxy(tmp_path, _toml(fake, "header_timeout_s = 1")) as served:
        _, base, session, _ = served
        async with session.post(
            base + "/v1/chat/completions", json=chat("m", "hi", stream=True)
        ) as r:
            assert r.status == 200
            body = await r.read()
    assert body.endswith(b"data: [DONE]\n\n")


async def _send_head(base: str, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*_address(base))
    writer.write(head)
    await writer.drain()
    return reader, writer


def _post(length: int | None, first: bytes) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n"
    ).encode()
    if length is None:
        return head + f"{len(first):x}\r\n".encode() + first + b"\r\n"
    return head + first


async def _response(
    reader: asyncio.StreamReader, timeout: float
) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def test_a_stalled_body_gets_408_after_the_body_timeout(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Guards against this: a request body that stopped arriving was held forever, with all the
    bytes read so far (40 stalled 30 MiB uploads pinned 1.27 GB)."""
    async with spawn_proxy(tmp_path, _toml(fake, "body_timeout_s = 1")) as served:
        _, base, _, _ = served
        for length in (200_000, None):  # announced, and chunked
            reader, writer = await _send_head(base, _post(length, b'{"model": "m", "messages"'))
            try:
                started = time.monotonic()
                status, _, body = await _response(reader, 10)
                took = time.monotonic() - started
            finally:
                writer.close()
            assert status == 408, body
            assert orjson.loads(body)["error"]["code"] == "body_timeout"
            assert 0.8 < took < 6, took
    assert not fake.received


async def test_the_buffered_bytes_budget_gives_503_with_retry_after_and_recovers(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Guards against this: nothing bounded the request bytes held at once (16 concurrent 49 MiB
    bodies: 686 MB)."""
    server = "max_body_bytes = 100000\nmax_buffered_bytes = 250000\nbody_timeout_s = 30"
    async with spawn_proxy(tmp_path, _toml(fake, server)) as served:
        _, base, session, _ = served
        # Announcing a body reserves nothing: only bytes that arrived are held.
        announced = [await _send_head(base, _post(100_000, b"{")) for _ in range(4)]
        await asyncio.sleep(0.3)
        async with session.post(base + "/v1/chat/completions", json=chat("m", "x" * 60_000)) as r:
            assert r.status == 200, await r.text()
        for _, writer in announced:
            writer.close()
        stalled = [await _send_head(base, _post(100_000, b"{" + b" " * 99_000)) for _ in range(2)]
        try:
            await asyncio.sleep(0.3)  # both hold their 99 001 bytes
            third = await _send_head(base, _post(100_000, b"{" + b" " * 60_000))
            status, headers, body = await _response(third[0], 10)
            third[1].close()
            assert status == 503, body
            assert headers["retry-after"] == "1"
            error = orjson.loads(body)["error"]
            assert error["code"] == "overloaded" and error["type"] == "server_error"
            # A small body still fits in what is left.
            async with session.post(base + "/v1/chat/completions", json=chat("m", "hi")) as r:
                assert r.status == 200
            # Past the budget as it grows (chunked, no length to reserve up front).
            chunked = await _send_head(base, _post(None, b"{" + b" " * 60_000))
            status, _, body = await _response(chunked[0], 10)
            chunked[1].close()
            assert status == 503, body
        finally:
            for _, writer in stalled:
                writer.close()
        # The stalled requests ended: their reservations are back.
        payload = encode(chat("m", "x" * 90_000))
        for _ in range(50):
            async with session.post(
                base + "/v1/chat/completions",
                data=payload,
                headers={"Content-Type": "application/json"},
            ) as r:
                if r.status != 503:
                    break
            await asyncio.sleep(0.1)
        assert r.status == 200

"""Faults and hostile input: broken upstreams, echoed secrets, redirect fields, leaks."""

from __future__ import annotations

import asyncio
import gzip
import os
import time
import tracemalloc

import orjson
import pytest

from ocrproxy.state import CACHE
from tests.conftest import chat
from tests.fakes import data_url, image_part

URL = "/v1/chat/completions"


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]


@pytest.mark.parametrize("model", ["die-mid-stream", "die-mid-stream-ocr"])
async def test_upstream_death_mid_stream_ends_with_error_event(proxy, model):
    r = await proxy.post(URL, json=chat(model, image_part(data_url("a")), stream=True))
    assert r.status == 200
    body = await asyncio.wait_for(r.read(), 5)
    got = events(body)
    assert [orjson.loads(e[6:])["choices"][0]["delta"]["content"] for e in got[:2]] == ["p0", "p1"]
    error = orjson.loads(got[-1][6:])["error"]
    assert error["type"] == "upstream_error" and "ended unexpectedly" in error["message"]


async def test_silent_upstream_hits_idle_read_timeout_not_a_hang(make_proxy, fake):
    proxy = await make_proxy(
        upstreams=[{"base_url": fake.url, "api_key": "sk-u", "read_timeout_s": 0.5}]
    )
    r = await proxy.post(URL, json=chat("stall-mid-stream", "x", stream=True))
    await r.content.readuntil(b"\n\n")
    await r.content.readuntil(b"\n\n")  # the second and last chunk: silence from here
    started = time.monotonic()
    body = await asyncio.wait_for(r.read(), 5)
    waited = time.monotonic() - started
    assert "error" in orjson.loads(events(body)[-1][6:])
    assert 0.45 <= waited < 1.0  # cut after the read timeout, not long after


async def test_a_slow_client_is_not_an_idle_upstream(make_proxy, fake):
    # The proxy stops reading the upstream while its writes to the client wait; that pause,
    # longer than the read timeout, must not count as the upstream's silence.
    proxy = await make_proxy(
        upstreams=[{"base_url": fake.url, "api_key": "sk-u", "read_timeout_s": 0.3}]
    )
    r = await proxy.post(URL, json=chat("firehose", "x", stream=True))
    await r.content.readexactly(1024)
    await asyncio.sleep(1.0)  # the client stops reading: buffers fill, the proxy's write waits
    received, tail = 1024, b""
    async for piece in r.content.iter_any():
        received += len(piece)
        tail = (tail + piece)[-200:]
    assert received == 2048 * 64 * 1024  # all of it, and no error event after it
    assert tail.endswith(b"x" * 100 + b"\n\n")


async def test_long_healthy_stream_is_not_cut_by_a_total_timeout(make_proxy, fake):
    # idle timeout 0.5 s, stream lasting ~1.5 s with 0.1 s gaps: must complete
    proxy = await make_proxy(
        upstreams=[{"base_url": fake.url, "api_key": "sk-u", "read_timeout_s": 0.5}]
    )
    fake.chunks, fake.chunk_delay = 15, 0.1
    r = await proxy.post(URL, json=chat("m", "x", stream=True))
    body = await r.read()
    assert body.endswith(b"data: [DONE]\n\n") and len(events(body)) == 16


async def test_upstream_error_echoing_the_key_is_redacted(proxy):
    r = await proxy.post(URL, json=chat("echo-key", "x"))
    assert r.status == 401
    text = await r.text()
    assert "sk-upstream-secret" not in text and "[redacted]" in text
    r = await proxy.post(URL, json=chat("echo-key-ocr", image_part(data_url("k"))))
    assert "sk-upstream-secret" not in await r.text()


@pytest.mark.parametrize("field", ["api_base", "base_url", "api_key"])
async def test_body_fields_that_would_redirect_the_proxy_are_refused(proxy, fake, field):
    r = await proxy.post(URL, json=chat("m", "x", **{field: "http://169.254.169.254/"}))
    assert r.status == 400
    assert (await r.json())["error"]["param"] == field
    assert fake.received == []


async def test_gzip_request_body_is_forwarded_decoded(proxy, fake):
    body = orjson.dumps({"model": "text-embedding-3-small", "input": "x" * 1000})
    r = await proxy.post(
        "/v1/embeddings",
        data=gzip.compress(body),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status == 200
    assert fake.received[-1].body == body
    assert "Content-Encoding" not in fake.received[-1].headers


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_disconnects_leak_no_tasks_or_sockets(proxy, fake):
    async def abandon_stream() -> None:
        r = await proxy.post(URL, json=chat("slow-stream", "x", stream=True))
        await r.content.readuntil(b"\n\n")
        r.close()

    async def abandon_ocr() -> None:
        task = asyncio.ensure_future(
            proxy.post(URL, json=chat("m-ocr", image_part(data_url(f"g{os.urandom(4).hex()}"))))
        )
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    fake.ocr_delay = 1.0
    await abandon_stream()
    await abandon_ocr()  # warm up: pools and lazily created objects
    await asyncio.sleep(0.2)
    fds_before, tasks_before = open_fds(), len(asyncio.all_tasks())
    for _ in range(10):
        await abandon_stream()
        await abandon_ocr()
    deadline = asyncio.get_running_loop().time() + 3
    while asyncio.get_running_loop().time() < deadline:
        if open_fds() <= fds_before + 2 and len(asyncio.all_tasks()) <= tasks_before:
            break
        await asyncio.sleep(0.05)
    assert open_fds() <= fds_before + 2
    assert len(asyncio.all_tasks()) <= tasks_before
    assert proxy.app[CACHE].in_flight == 0


async def test_slow_client_holds_back_the_upstream(proxy, fake):
    r = await proxy.post(URL, json=chat("firehose", "x", stream=True))
    await r.content.readexactly(1024)
    await asyncio.sleep(1.0)  # the client stops reading
    stalled_at = fake.bytes_written
    await asyncio.sleep(0.5)
    # Only socket and stream buffers fill up (a few MB each hop); the proxy does not keep
    # reading 128 MB into memory while nobody takes it.
    assert fake.bytes_written == stalled_at
    assert stalled_at < 48 * 1024 * 1024
    r.close()
    await asyncio.wait_for(fake.stream_closed.wait(), 3)


async def test_an_announced_body_size_is_not_allocated_before_it_arrives(proxy):
    # A client may announce 40 MB and send a trickle: the proxy's memory follows what arrived.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 40000000\r\n\r\n" + b'{"model": "m", "messages": [' + b" " * 4096
        )
        await writer.drain()
        await asyncio.sleep(0.3)  # the handler is reading the body by now
        grown = tracemalloc.get_traced_memory()[0] - before
        writer.close()
        await writer.wait_closed()
    finally:
        tracemalloc.stop()
    assert grown < 4 * 1024 * 1024

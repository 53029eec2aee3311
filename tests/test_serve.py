"""The proxy as a user runs it: a real `ocrproxy serve` process, its logs, and its shutdown."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import chat, spawn_proxy
from tests.fakes import data_url, image_part

SECRET_UPSTREAM = "sk-upstreamSECRET0123456789abcdef"
SECRET_CLIENT = "client-SECRET-key-0123456789"


@pytest.fixture
async def served(fake, tmp_path: Path):
    config = f"""
[server]
log_level = "info"
[auth]
keys = ["{SECRET_CLIENT}"]
[[upstreams]]
name = "fake"
base_url = "{fake.url}"
api_key = "${{UPSTREAM_KEY}}"
check_models = false
[ocr]
model = "vision-1"
"""
    async with spawn_proxy(tmp_path, config, env={"UPSTREAM_KEY": SECRET_UPSTREAM}) as served:
        yield served


async def test_serve_logs_one_json_line_per_request_without_secrets(served, fake):
    proc, base, session, log_path = served
    headers = {"Authorization": f"Bearer {SECRET_CLIENT}", "X-Request-Id": "req-log-1"}
    img = data_url("confidential-pixels", size=3000)
    async with session.post(
        base + "/v1/chat/completions", headers=headers, json=chat("m-ocr", image_part(img))
    ) as r:
        assert r.status == 200
    async with session.post(base + "/v1/chat/completions", json=chat("m", "x")) as r:
        assert r.status == 401
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 0
    log = log_path.read_text()
    lines = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "ocrproxy.access"]
    assert len(access) == 2
    entry, refused = access
    assert refused["status"] == 401 and refused["bytes_out"] > 0
    assert entry["request_id"] == "req-log-1"
    assert entry["route"] == "/v1/chat/completions" and entry["status"] == 200
    assert entry["model"] == "m-ocr" and entry["real_model"] == "m"
    assert entry["ocr_model"] == "vision-1" and entry["images"] == 1
    assert entry["cache_hits"] == 0 and entry["upstream_status"] == 200
    assert entry["ocr_ms"] >= 0 and entry["ttfb_ms"] > 0 and entry["total_ms"] >= entry["ttfb_ms"]
    assert entry["bytes_out"] > 0
    assert all("request_id" in line for line in lines)
    for forbidden in (SECRET_UPSTREAM, SECRET_CLIENT, img[30:90], "A picture showing"):
        assert forbidden not in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_shutdown_signal_lets_a_live_stream_finish(served, fake, sig):
    proc, base, session, log_path = served
    fake.chunk_delay = 0.1
    fake.chunks = 10
    headers = {"Authorization": f"Bearer {SECRET_CLIENT}"}
    async with session.post(
        base + "/v1/chat/completions", headers=headers, json=chat("m", "hi", stream=True)
    ) as r:
        first = await r.content.readuntil(b"\n\n")
        proc.send_signal(sig)
        rest = await r.read()
    assert first.startswith(b"data: ")
    assert rest.endswith(b"data: [DONE]\n\n")
    await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 0


async def test_shutdown_cancels_streams_past_the_timeout(fake, tmp_path):
    config = f"""
[server]
shutdown_timeout = 1.0
[[upstreams]]
base_url = "{fake.url}"
"""
    async with spawn_proxy(tmp_path, config) as (proc, base, session, _):
        async with session.post(
            base + "/v1/chat/completions", json=chat("slow-stream", "x", stream=True)
        ) as r:
            await r.content.readuntil(b"\n\n")
            started = asyncio.get_running_loop().time()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)
            waited = asyncio.get_running_loop().time() - started
        assert proc.returncode == 0
        assert 0.9 <= waited < 5  # waited for the stream, then gave up at shutdown_timeout
        # new connections are refused once it is shutting down
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(base + "/healthz"):
                pass

"""The shipped systemd unit and nginx site, checked with the real tools, and the real process:
sd_notify readiness, graceful drain, several workers on one port, nginx in front."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from ocrproxy import config
from ocrproxy.metrics import FLUSH_S
from tests.conftest import chat, require_binary
from tests.fakes import FakeOpenAI, data_url, image_part
from tests.servers import ROOT, ProxyProcess, free_port, nginx, proxy_toml

UNIT = ROOT / "systemd" / "ocrproxy.service"
SITE = ROOT / "systemd" / "nginx-ocrproxy.conf"
SHIPPED_BINARY = "/opt/ocrproxy/venv/bin/ocrproxy"


def unit_setting(name: str) -> str:
    found = re.findall(rf"^{name}=(.*)$", UNIT.read_text(), re.M)
    assert len(found) == 1, name
    return found[0]


def rendered_unit(tmp_path: Path) -> Path:
    """The shipped unit with only its ExecStart binary swapped for one that exists here."""
    text = UNIT.read_text()
    assert text.count(SHIPPED_BINARY) == 1
    unit = tmp_path / "ocrproxy.service"
    unit.write_text(text.replace(SHIPPED_BINARY, f"{sys.executable} -m ocrproxy"))
    return unit


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    binary = require_binary("systemd-analyze")
    # verify checks that ExecStart's program exists; on this machine the shipped path
    # (/opt/ocrproxy/venv) does not, and that must be the only complaint.
    shipped = subprocess.run(
        [binary, "verify", str(UNIT)], capture_output=True, text=True, timeout=30
    )
    complaints = [line for line in shipped.stderr.splitlines() if line.strip()]
    assert all(SHIPPED_BINARY in line for line in complaints), complaints
    rendered = subprocess.run(
        [binary, "verify", str(rendered_unit(tmp_path))], capture_output=True, text=True, timeout=30
    )
    assert rendered.returncode == 0 and rendered.stderr.strip() == "", rendered.stderr


def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    binary = require_binary("systemd-analyze")
    result = subprocess.run(
        [binary, "security", "--offline=true", "--no-pager", str(rendered_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    match = re.search(r"Overall exposure level for ocrproxy\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0  # docs/deploy.md reports the measured figure


def test_unit_and_site_agree_with_the_config_defaults() -> None:
    defaults = config.Server()
    stop = unit_setting("TimeoutStopSec")
    assert float(stop.removesuffix("s")) > defaults.shutdown_timeout + 5
    assert unit_setting("Type") == "notify"
    assert "--config /etc/ocrproxy/ocrproxy.toml" in unit_setting("ExecStart")
    site = SITE.read_text()
    size = re.search(r"client_max_body_size (\d+)m;", site)
    assert size and int(size.group(1)) * 1024 * 1024 == defaults.max_body_bytes
    assert re.search(r"proxy_buffering off;", site)
    timeout = re.search(r"proxy_read_timeout (\d+)s;", site)
    assert timeout and int(timeout.group(1)) >= config.Upstream(base_url="x").read_timeout_s


@pytest.fixture
async def served(fake: FakeOpenAI, tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    """One real ocrproxy process in front of the fake upstream."""
    proc = ProxyProcess(tmp_path, proxy_toml(fake.url, free_port()))
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


async def test_ready_is_notified_once_listening_and_sigterm_drains(
    served: ProxyProcess, fake: FakeOpenAI
) -> None:
    assert "READY=1" in served.states  # ProxyProcess waited for it, then the port must answer:
    url = f"http://127.0.0.1:{served.port}"
    fake.ocr_delay = 1.0
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/healthz") as resp:
            assert resp.status == 200
        pending = asyncio.get_running_loop().create_task(
            session.post(url + "/v1/chat/completions", json=chat_with_image("slow"))
        )
        await asyncio.sleep(0.4)  # the request is inside its OCR call now
        assert served.proc is not None
        served.proc.terminate()
        await served.wait_state("STOPPING=1", 5)
        resp = await pending
        assert resp.status == 200  # drained, not cut
        assert "A picture showing slow." in (await resp.json())["choices"][0]["message"]["content"]
        resp.release()
    assert await served.exited() == 0


def chat_with_image(label: str, size: int = 0, **extra: Any) -> dict[str, Any]:
    return chat("gpt-3.5-turbo-ocr", "what is it?", image_part(data_url(label, size)), **extra)


async def test_workers_share_one_port_and_metrics(fake: FakeOpenAI, tmp_path: Path) -> None:
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    proc = ProxyProcess(tmp_path, proxy_toml(fake.url, port), "--workers", "2")
    await proc.start(env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(24):  # a new connection each time: the kernel spreads them
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/healthz") as resp:
                    assert resp.status == 200
        await asyncio.sleep(FLUSH_S + 0.5)  # each worker writes its counts at most this late
        serving = {p.stem.split("_")[1] for p in metrics_dir.glob("counter_*.db")}
        assert len(serving) == 2, serving  # both workers answered requests
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/metrics") as resp:
                text = await resp.text()
        # any worker answers the scrape with the sum over all workers
        assert 'ocrproxy_requests_total{route="/healthz",status="200"} 24.0' in text
    finally:
        assert await proc.stop() == 0
    assert "all workers stopped" in proc.log


# --- nginx in front -----------------------------------------------------------------------------


@pytest.fixture
async def through_nginx(served: ProxyProcess, tmp_path: Path) -> AsyncIterator[str]:
    binary = require_binary("nginx")
    with nginx(binary, tmp_path / "nginx", [served.port]) as port:
        yield f"http://127.0.0.1:{port}"


async def test_nginx_streams_chunk_by_chunk(through_nginx: str, fake: FakeOpenAI) -> None:
    fake.chunks, fake.chunk_delay = 6, 0.25
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(
            through_nginx + "/v1/chat/completions", json=chat("gpt-3.5-turbo", "hi", stream=True)
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 6
    # the upstream spends ~1.5 s on the stream; the first chunk must not wait for the last
    assert arrivals[-1] - arrivals[0] > 1.0
    assert arrivals[0] < arrivals[-1] - 1.0
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert sum(1 for gap in gaps if gap > 0.1) >= 4  # spread out, not one burst


async def test_nginx_passes_a_large_image(through_nginx: str, fake: FakeOpenAI) -> None:
    size = 20 * 1024 * 1024  # far past nginx's default 1 MiB body limit
    async with aiohttp.ClientSession() as session:
        async with session.post(
            through_nginx + "/v1/chat/completions",
            data=io.BytesIO(orjson.dumps(chat_with_image("big", size))),
            headers={"Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    assert fake.ocr_calls == ["big"]
    assert "A picture showing big." in body["choices"][0]["message"]["content"]


async def test_nginx_forwards_request_id_and_client_address(
    through_nginx: str, served: ProxyProcess, tmp_path: Path
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            through_nginx + "/v1/models", headers={"X-Request-Id": "client-chosen-1"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-Id"] == "client-chosen-1"
        async with session.get(through_nginx + "/v1/models") as resp:
            assert resp.status == 200
            minted = resp.headers["X-Request-Id"]
            assert re.fullmatch(r"[0-9a-f]{32}", minted)  # nginx's $request_id
        for path in ("/metrics", "/readyz"):
            async with session.get(through_nginx + path) as resp:
                assert resp.status == 404  # operator endpoints are not exposed through nginx
    await asyncio.sleep(0.2)
    access = {
        line["request_id"]: line for line in served.log_lines() if line.get("msg") == "request"
    }
    for rid in ("client-chosen-1", minted):
        assert access[rid]["forwarded_for"] == "127.0.0.1"  # the client, as nginx saw it
        assert access[rid]["route"] == "/v1/models"
    nginx_log = (tmp_path / "nginx" / "access.log").read_text()
    assert f"rid={minted}" in nginx_log  # both logs carry the same id


def workers_of(pid: int) -> set[int]:
    """The worker processes of supervisor ``pid`` (not multiprocessing's resource tracker)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    found = set()
    for child in map(int, text.split()):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
        except FileNotFoundError:
            pass
    return found


async def test_workers_share_the_sqlite_tier_and_a_dead_worker_is_replaced(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    toml = proxy_toml(
        fake.url,
        port,
        server=f"metrics_port = {metrics_port}\n",
        cache=f'backend = "sqlite"\npath = "{tmp_path / "state" / "cache.sqlite3"}"\n',
    )
    proc = ProxyProcess(tmp_path, toml, "--workers", "2")
    await proc.start()
    url, side = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
    try:
        for i in range(12):  # new connections, spread over both workers
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    url + "/v1/chat/completions", json=chat_with_image("shared")
                ) as resp:
                    assert resp.status == 200
                    assert resp.headers["X-OCR-Cache-Hits"] == ("0" if i == 0 else "1")
        assert fake.ocr_calls == ["shared"]  # one OCR call for both workers
        await asyncio.sleep(FLUSH_S + 0.5)  # each worker writes its counts at most this late
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/metrics") as resp:
                assert resp.status == 404  # only on the metrics port
            async with session.get(side + "/readyz") as resp:
                assert await resp.json() == {
                    "status": "ready",
                    "cache": {"backend": "sqlite", "reachable": True},
                }
            async with session.get(side + "/metrics") as resp:
                text = await resp.text()
        # the worker that did not pay found the description in the shared file
        assert 'ocrproxy_cache_lookups_total{result="hit",tier="sqlite"}' in text

        assert proc.proc is not None
        before = workers_of(proc.proc.pid)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        async with asyncio.timeout(15):
            while True:
                now = workers_of(proc.proc.pid)
                if victim not in now and len(now) == 2:
                    break
                await asyncio.sleep(0.1)
        assert f"worker {victim} exited with -9; starting another" in proc.log
        for _ in range(6):
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/healthz") as resp:
                    assert resp.status == 200
    finally:
        assert await proc.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_a_clear_failure(workers: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config_file = tmp_path / "c.toml"
        config_file.write_text(proxy_toml("http://127.0.0.1:9/v1", port))
        result = subprocess.run(
            [sys.executable, "-m", "ocrproxy", "serve", "--config", str(config_file)]
            + ["--workers", workers],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr and "address already in use" in result.stderr
    assert "Traceback" not in result.stderr


async def test_sigterm_to_the_supervisor_drains_every_worker(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    proc = ProxyProcess(tmp_path, proxy_toml(fake.url, port), "--workers", "2")
    await proc.start(env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    fake.ocr_delay = 1.0
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    sessions = [aiohttp.ClientSession() for _ in range(10)]  # new connections: both workers
    try:
        loop = asyncio.get_running_loop()
        pending = [
            loop.create_task(s.post(url, json=chat_with_image(f"img{i}")))
            for i, s in enumerate(sessions)
        ]
        await asyncio.sleep(0.5)  # every request is inside its OCR call
        assert fake.ocr_active == 10
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        responses = await asyncio.gather(*pending)
        assert [r.status for r in responses] == [200] * 10
        for r in responses:
            r.release()
        assert await proc.exited() == 0
    finally:
        for s in sessions:
            await s.close()
        await proc.stop()
    assert proc.log.count("shutting down: draining") == 2
    # both workers were serving (each counted requests) and both finished theirs
    assert len({p.stem.split("_")[1] for p in metrics_dir.glob("counter_*.db")}) == 2

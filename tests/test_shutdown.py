"""SIGTERM and SIGHUP on a real `ocrproxy serve` (one worker, and a supervisor with two): streams
end with an error event and a complete body, on time; a reload swaps the config in place."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import chat
from tests.fakes import FakeOpenAI, data_url, image_part
from tests.servers import ProxyProcess, free_port

SHUTDOWN_TIMEOUT = 2.0
# The promise is shutdown_timeout + 2 s; a loaded 2-core machine gets some slack on top.
EXIT_BOUND = SHUTDOWN_TIMEOUT + 2 + 3
SHUTDOWN_EVENT_CODE = "server_shutting_down"


async def _serve(tmp_path: Path, toml: str, port: int, *args: str) -> tuple[ProxyProcess, str]:
    """``ocrproxy serve`` started with ``toml`` (listening on ``port``) and its chat URL; the
    caller stops it (``proxy.stop()``, in a ``finally``)."""
    proxy = ProxyProcess(tmp_path, toml, *args)
    await proxy.start()
    assert proxy.proc is not None
    return proxy, f"http://127.0.0.1:{port}/v1/chat/completions"


def _toml(fake: FakeOpenAI, port: int, server: str = "", auth: str = "") -> str:
    return (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nshutdown_timeout = {SHUTDOWN_TIMEOUT}\n'
        f"{server}\n{auth}\n"
        '[ocr]\nmodel = "vision-1"\nkeepalive_after_s = 0.3\nkeepalive_interval_s = 0.5\n'
        f'[[upstreams]]\nname = "fake"\nbase_url = "{fake.url}"\ncheck_models = false\n'
    )


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bytes:
    """POST and read the whole body; a truncated chunked body raises ClientPayloadError."""
    async with session.post(url, json=body) as r:
        assert r.status == 200
        return await r.read()


def _last_event(body: bytes) -> Any:
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    return orjson.loads(events[-1][len(b"data: ") :])


async def _started(fake: FakeOpenAI, streams: int, ocr: int) -> None:
    """Until the fake upstream has begun every stream and every OCR call."""
    async with asyncio.timeout(20):
        while len(fake.chat_requests) < streams or len(fake.ocr_calls) < ocr:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # the relayed streams have sent a chunk or so


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_ends_every_stream_with_an_error_event_and_exits_on_time(
    fake: FakeOpenAI, tmp_path: Path, workers: int
) -> None:
    """Guards against this: on SIGTERM one worker drained for ~2x shutdown_timeout and then cut
    every stream mid-body (no error event, no end of the chunked body, logged as 499); with
    workers the supervisor SIGKILLed them at shutdown_timeout + 5 s and their access lines were
    lost."""
    fake.chunks, fake.chunk_delay = 30, 1.0  # 1 chunk a second for 30 s
    fake.ocr_delay = 30.0  # an OCR stream still waiting for its image
    port = free_port()
    proxy, url = await _serve(tmp_path, _toml(fake, port), port, "--workers", str(workers))
    relayed, waiting = 6, 2
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # spread over the workers
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [
                asyncio.ensure_future(_stream(session, url, chat("m", "hi", stream=True)))
                for _ in range(relayed)
            ]
            tasks += [
                asyncio.ensure_future(
                    _stream(
                        session,
                        url,
                        chat("m-ocr", image_part(data_url(f"img-{i}")), stream=True),
                    )
                )
                for i in range(waiting)
            ]
            try:
                await _started(fake, relayed, waiting)
                signalled = time.monotonic()
                proxy.proc.send_signal(signal.SIGTERM)
                code = await proxy.exited(timeout=30)
                took = time.monotonic() - signalled
                bodies = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await proxy.stop()
    print(f"workers={workers}: exited {took:.2f} s after SIGTERM (shutdown_timeout 2 s)")
    assert code == 0, proxy.log
    assert took < EXIT_BOUND, took
    assert took > SHUTDOWN_TIMEOUT - 0.5, "the live streams were not given their grace period"
    for body in bodies[:relayed]:
        assert b"t0 " in body  # it was relaying
        assert _last_event(body)["error"]["code"] == SHUTDOWN_EVENT_CODE
    for body in bodies[relayed:]:
        assert body.startswith(b": keep-alive")  # committed early, waiting for its image
        assert _last_event(body)["error"]["code"] == SHUTDOWN_EVENT_CODE
    access = [e for e in proxy.log_lines() if e["logger"] == "ocrproxy.access" and "status" in e]
    chats = [e for e in access if e["route"] == "/v1/chat/completions"]
    assert len(chats) == relayed + waiting, access
    assert all(e["status"] == 200 and e["bytes_out"] > 0 for e in chats), chats


async def test_sigterm_ends_an_early_committed_stream_that_relays_its_upstream(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """An OCR stream committed early (keep-alive while its image was described) that is now
    relaying the upstream's stream ends like the others."""
    fake.chunks, fake.chunk_delay = 30, 1.0
    fake.ocr_delay = 1.0  # past keepalive_after_s: committed early, then relayed
    port = free_port()
    proxy, url = await _serve(tmp_path, _toml(fake, port), port)
    try:
        async with aiohttp.ClientSession() as session:
            body = chat("m-ocr", image_part(data_url("late")), stream=True)
            task = asyncio.ensure_future(_stream(session, url, body))
            try:
                await _started(fake, 1, 1)
                proxy.proc.send_signal(signal.SIGTERM)
                code = await proxy.exited(timeout=30)
                got = await asyncio.wait_for(task, 10)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await proxy.stop()
    assert code == 0, proxy.log
    assert got.startswith(b": keep-alive") and b"t0 " in got
    assert _last_event(got)["error"]["code"] == SHUTDOWN_EVENT_CODE


async def test_sigterm_lets_requests_that_finish_in_time_finish_and_cuts_the_rest(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A stream that ends within shutdown_timeout ends normally; a plain request still waiting
    for its upstream at the deadline is cut, and still logged."""
    fake.chunks, fake.chunk_delay = 3, 0.4  # ends 1.2 s after it started: within the grace
    port = free_port()
    proxy, url = await _serve(tmp_path, _toml(fake, port), port)
    try:
        async with aiohttp.ClientSession() as session:
            short = asyncio.ensure_future(_stream(session, url, chat("m", "hi", stream=True)))
            hung = asyncio.ensure_future(session.post(url, json=chat("hang", "hi")))
            try:
                async with asyncio.timeout(20):
                    while len(fake.chat_requests) < 2:
                        await asyncio.sleep(0.05)
                signalled = time.monotonic()
                proxy.proc.send_signal(signal.SIGTERM)
                code = await proxy.exited(timeout=30)
                took = time.monotonic() - signalled
                body = await asyncio.wait_for(short, 10)
                with pytest.raises(aiohttp.ClientConnectionError):
                    await asyncio.wait_for(hung, 10)
            finally:
                for task in (short, hung):
                    task.cancel()
                await asyncio.gather(short, hung, return_exceptions=True)
    finally:
        await proxy.stop()
    assert code == 0, proxy.log
    assert took < EXIT_BOUND, took
    assert body.endswith(b"data: [DONE]\n\n")
    access = [e for e in proxy.log_lines() if e["logger"] == "ocrproxy.access" and "status" in e]
    statuses = sorted(e["status"] for e in access if e["route"] == "/v1/chat/completions")
    assert statuses == [200, 499], access


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _events(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """The log's lines but the access lines (those are written up to 50 ms late)."""
    return [e for e in proxy.log_lines() if "status" not in e]


async def _wait_log(proxy: ProxyProcess, text: str, timeout: float = 20) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            for entry in proxy.log_lines():
                if text in entry["msg"]:
                    return entry
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_reloads_the_config_and_the_old_app_finishes_its_requests(
    fake: FakeOpenAI, tmp_path: Path, workers: int
) -> None:
    """Guards against this: SIGHUP killed the service at once (no drain, no log line), and
    systemd's Restart=on-failure does not restart a process killed by SIGHUP."""
    # The stream outlives the reload: starting new workers takes seconds on a busy machine.
    fake.chunks, fake.chunk_delay = (6 if workers == 1 else 30), 0.5
    port = free_port()
    server = "shutdown_timeout = 20\n"
    toml = _toml(fake, port, auth='[auth]\nkeys = ["key-old"]\n').replace(
        f"shutdown_timeout = {SHUTDOWN_TIMEOUT}\n", server
    )
    proxy, url = await _serve(tmp_path, toml, port, "--workers", str(workers))
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # no connection kept to old workers
        async with aiohttp.ClientSession(connector=connector) as session:
            old_stream = session.post(
                url, json=chat("m", "hi", stream=True), headers=_auth("key-old")
            )
            async with old_stream as r:
                assert r.status == 200
                await r.content.readuntil(b"\n\n")  # the old app is serving it
                proxy.config.write_text(toml.replace('"key-old"', '"key-new"'))
                proxy.proc.send_signal(signal.SIGHUP)
                await _wait_log(proxy, "reloaded")
                if workers > 1:  # the old workers closed their listening sockets
                    async with asyncio.timeout(20):
                        while sum("shutting down" in e["msg"] for e in _events(proxy)) < workers:
                            await asyncio.sleep(0.05)
                    await asyncio.sleep(0.2)
                async with session.post(url, json=chat("m", "x"), headers=_auth("key-new")) as r2:
                    assert r2.status == 200
                async with session.post(url, json=chat("m", "x"), headers=_auth("key-old")) as r2:
                    assert r2.status == 401
                rest = await r.read()  # the old app let it finish
            assert rest.endswith(b"data: [DONE]\n\n")
            assert proxy.proc.returncode is None
            await asyncio.sleep(0.2)  # its access line is written
    finally:
        code = await proxy.stop()
    assert code == 0, proxy.log
    reloaded = next(e["ts"] for e in _events(proxy) if "reloaded" in e["msg"])
    access = [e for e in proxy.log_lines() if e["logger"] == "ocrproxy.access" and "status" in e]
    streamed = [e for e in access if e["status"] == 200 and e["total_ms"] > 2000]
    assert len(streamed) == 1 and streamed[0]["ts"] > reloaded, access


async def test_sighup_with_an_invalid_file_changes_nothing_and_says_why(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """An invalid file on reload: one log line saying why (no secret in it), the old config
    keeps serving."""
    port = free_port()
    secret = "sk-upstream-SECRET-0123456789"
    toml = _toml(fake, port, auth='[auth]\nkeys = ["key-old"]\n').replace(
        'name = "fake"\n', f'name = "fake"\napi_key = "{secret}"\n'
    )
    proxy, url = await _serve(tmp_path, toml, port)
    try:
        async with aiohttp.ClientSession() as session:
            for broken, why in (
                (toml.replace('"key-old"', '"key-new"') + "[server\n", "ocrproxy.toml"),
                (toml.replace("[ocr]\n", "[ocr]\nmax_concurrency = 0\n"), "max_concurrency"),
                (toml.replace(f"port = {port}", f"port = {port + 1}"), "needs a restart"),
            ):
                proxy.config.write_text(broken)
                before = len(_events(proxy))
                proxy.proc.send_signal(signal.SIGHUP)
                entry = await _wait_log(proxy, why)
                assert entry["level"] == "error" and "keeping the running" in entry["msg"]
                assert len(_events(proxy)) == before + 1  # one line, no traceback
                async with session.post(url, json=chat("m", "x"), headers=_auth("key-old")) as r:
                    assert r.status == 200
                async with session.post(url, json=chat("m", "x"), headers=_auth("key-new")) as r:
                    assert r.status == 401
            assert proxy.proc.returncode is None
    finally:
        code = await proxy.stop()
    assert code == 0
    assert secret not in proxy.log


async def test_sighup_whose_new_app_fails_to_start_keeps_the_running_body_limit(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Guards against this: a reload whose new app failed to start (its cache file could not be
    opened) said "keeping the running configuration" but had already applied its body limits
    to the running one."""
    port = free_port()
    toml = _toml(fake, port, server="max_body_bytes = 100000\n")
    proxy, url = await _serve(tmp_path, toml, port)
    body = chat("m", "x" * 20_000)  # between the old limit and the new one
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=body) as r:
                assert r.status == 200
            (tmp_path / "a-file").write_text("not a directory")
            missing = tmp_path / "a-file" / "cache.db"  # cannot be created, even by root
            proxy.config.write_text(
                toml.replace("max_body_bytes = 100000", "max_body_bytes = 2000")
                + f'[cache]\nbackend = "sqlite"\npath = "{missing}"\n'
            )
            proxy.proc.send_signal(signal.SIGHUP)
            entry = await _wait_log(proxy, "keeping the running")
            assert entry["level"] == "error"
            async with session.post(url, json=body) as r:
                assert r.status == 200, await r.text()
            assert proxy.proc.returncode is None
    finally:
        code = await proxy.stop()
    assert code == 0


async def test_a_reload_shares_the_local_engines_pixel_budget(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Guards against this: each generation's local engine had a budget of its own, so while the
    old one drained two engines could each hold max_decoded_bytes of pixels."""
    from ocrproxy import config, server, state

    port = free_port()

    def cfg(mib: int) -> config.Config:
        return config.from_mapping(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "ocr": {"local": {"max_decoded_bytes": mib * 1024 * 1024}},
                "upstreams": [{"name": "fake", "base_url": fake.url}],
            },
            env={},
        )

    listeners = [server._listen("127.0.0.1", port, False)]
    old = server.Generation(cfg(64))
    await old.start(listeners)
    try:
        new = server.Generation(cfg(32), old)
        await new.start(listeners)
        try:
            engines = [g.app[state.DESCRIBER].engine for g in (old, new)]
            assert engines[0] is not None and engines[1] is not None
            assert engines[0].budget is engines[1].budget
            assert engines[1].budget.limit == 32 * 1024 * 1024
            assert engines[1].budget.free == 32 * 1024 * 1024
        finally:
            await new.close()
    finally:
        await old.close()
        server._close(listeners)


def test_the_supervisor_terminates_a_worker_that_got_a_reaped_workers_pid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Guards against this: the pids sent SIGTERM were kept for ever, so a new worker that got
    the pid of one reaped earlier was never sent SIGTERM at stop, and was SIGKILLed at the
    deadline (its access lines lost). No real pid is signalled here: os.kill is recorded."""
    from ocrproxy import config, supervisor

    class Worker:  # what _terminate and _forget use of a multiprocessing.Process
        def __init__(self, pid: int) -> None:
            self.pid = pid
            self.exitcode: int | None = None

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    sent: list[int] = []
    monkeypatch.setattr(supervisor.os, "kill", lambda pid, sig: sent.append(pid))
    sup = supervisor.Supervisor(config.from_mapping({}, env={}))
    old = Worker(4242)
    sup._terminate([old])
    old.exitcode = 0  # it exited and was reaped
    sup._forget([old])
    new = Worker(4242)  # the kernel gave its pid to a new worker
    sup._terminate([new])
    sup._terminate([new])  # but never twice
    assert sent == [4242, 4242]


class _Edgy:
    """An upstream for the ends of streams: ``firehose`` sends 64 KB events without end,
    ``tick`` one small event every 0.2 s, ``half-stall``/``half-die`` one whole event and
    half of the next, then go silent / drop the connection."""

    url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
        if model == "firehose":
            big = b"data: " + b'"' + b"x" * (64 * 1024) + b'"\n\n'
            while True:
                await response.write(big)
        if model == "tick":
            for _ in range(600):
                await response.write(event)
                await asyncio.sleep(0.2)
        await response.write(event)
        await response.write(event[:20])  # half an event: 'data: {"choices": [{'
        if model == "half-stall":
            await asyncio.sleep(3600)
        assert request.transport is not None
        request.transport.abort()
        return response


@pytest.fixture
async def edgy(aiohttp_server: Any) -> _Edgy:
    state = _Edgy()
    server = await aiohttp_server(state.app())
    state.url = str(server.make_url("/v1"))
    return state


def _edgy_toml(edgy: _Edgy, port: int) -> str:
    return (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nshutdown_timeout = 1\n'
        '[ocr]\nmodel = "vision-1"\n'
        f'[[upstreams]]\nname = "edgy"\nbase_url = "{edgy.url}"\n'
    )


def _stalled_client(port: int) -> socket.socket:
    """A streaming request from a client that then reads nothing, with a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    payload = orjson.dumps(chat("firehose", "hi", stream=True))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


async def test_sigterm_with_a_client_that_stopped_reading_still_ends_the_others_on_time(
    edgy: _Edgy, tmp_path: Path
) -> None:
    """Guards against this: the shutdown wrote each stream's ending event in turn, without a
    time limit, so one client that stopped reading held it (and every later stream) until
    systemd's SIGKILL."""
    port = free_port()
    proxy, url = await _serve(tmp_path, _edgy_toml(edgy, port), port)
    stalled = [_stalled_client(port) for _ in range(2)]
    try:
        async with aiohttp.ClientSession() as session:
            task = asyncio.ensure_future(_stream(session, url, chat("tick", "hi", stream=True)))
            try:
                await asyncio.sleep(2.0)  # the stalled streams fill every buffer on the way
                signalled = time.monotonic()
                proxy.proc.send_signal(signal.SIGTERM)
                code = await proxy.exited(timeout=30)
                took = time.monotonic() - signalled
                body = await asyncio.wait_for(task, 10)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        for sock in stalled:
            sock.close()
        await proxy.stop()
    print(f"exited {took:.2f} s after SIGTERM (shutdown_timeout 1 s)")
    assert code == 0, proxy.log
    assert took < 1 + 2 + 3, took  # the promise is shutdown_timeout + 2 s; slack for load
    assert _last_event(body)["error"]["code"] == SHUTDOWN_EVENT_CODE


def _events_parse(received: bytes) -> None:
    """Every whole event a client got parses: no half event glued to an error event."""
    *events, _rest = received.split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: "), received
        orjson.loads(event[len(b"data: ") :])


@pytest.mark.parametrize("model", ["half-stall", "half-die"])
async def test_an_error_event_is_never_glued_to_half_an_event(
    edgy: _Edgy, tmp_path: Path, model: str
) -> None:
    """Guards against this: the upstream-broke and shutdown error events were written after
    whatever the upstream had sent, mid ``data:`` line, so the client's parser failed on the
    glued event. Now the client sees whole events and then either a clean error event or a cut
    connection."""
    port = free_port()
    proxy, url = await _serve(tmp_path, _edgy_toml(edgy, port), port)
    received = b""
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=chat(model, "hi", stream=True)) as r:
                assert r.status == 200
                if model == "half-stall":
                    received = await r.content.readuntil(b"\n\n")  # the half follows it
                    proxy.proc.send_signal(signal.SIGTERM)
                try:
                    async for piece in r.content.iter_any():
                        received += piece
                except aiohttp.ClientPayloadError:
                    pass  # cut: a truncated body
        if model == "half-stall":
            assert await proxy.exited(timeout=30) == 0, proxy.log
    finally:
        await proxy.stop()
    assert received.startswith(b"data: ")
    _events_parse(received)


async def test_end_all_is_not_held_up_by_a_stream_whose_ending_write_waits(
    aiohttp_client: Any,
) -> None:
    """The window the process test above cannot aim at: a client whose buffer is just short of
    full when the shutdown comes, so that the ending write itself pauses and waits for it
    (aiohttp's write_eof ends with a drain). That write is made to wait for ever here; the
    other stream must still get its event, and end_all must return."""
    from ocrproxy import relay
    from ocrproxy.dialects.chat import CHAT
    from ocrproxy.streams import STREAMS, Streams

    streams = Streams()

    async def never(*args: Any) -> None:
        await asyncio.Event().wait()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await relay.start_sse(request, {}, CHAT)
        if request.query.get("stuck"):
            response.write_eof = never  # type: ignore[method-assign]
        await response.write(b": hello\n\n")
        await asyncio.sleep(3600)
        return response

    app = web.Application()
    app[STREAMS] = streams
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    async with client.get("/?stuck=1") as stuck, client.get("/") as normal:
        await stuck.content.readuntil(b"\n\n")
        await normal.content.readuntil(b"\n\n")
        assert len(streams) == 2
        ended = await asyncio.wait_for(streams.end_all(), 10)
        body = await asyncio.wait_for(normal.read(), 10)
    assert ended == 1
    assert _last_event(body)["error"]["code"] == SHUTDOWN_EVENT_CODE


async def test_resizing_the_pixel_budget_refuses_a_queued_job_it_can_no_longer_admit() -> None:
    """A reload that lowers max_decoded_bytes: bytes held count against the new limit, a job
    queued for more than it is refused (it would block the queue for ever), the others run."""
    from ocrproxy.admission import Budget, OverBudget

    budget = Budget(100)
    await budget.acquire(60)
    big = asyncio.ensure_future(budget.acquire(80))
    small = asyncio.ensure_future(budget.acquire(10))
    await asyncio.sleep(0)
    budget.resize(50)
    with pytest.raises(OverBudget):
        await big
    assert not small.done()  # 60 held of 50: it waits for the release
    budget.release(60)
    await asyncio.wait_for(small, 5)
    assert budget.free == 40 and budget.limit == 50

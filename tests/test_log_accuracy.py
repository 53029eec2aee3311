"""What the log lines say is what happened: a ``/v1/models`` line names the upstreams it asked;
a client that leaves while its images are read leaves a 499 line with the images found; the
loop-stall watchdog logs under ``ocrproxy.stall``, routed and filtered like the proxy's other
lines; ``ocrproxy describe`` does not tell its user to restart a proxy. Asserted on real
records and on the CLI's stderr."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ocrproxy import cli, local, logs
from ocrproxy.app import create_app
from tests.conftest import ProxyFactory, chat, make_config
from tests.fakes import FakeOpenAI, data_url, image_part, png
from tests.test_logs import Stderr

URL = "/v1/chat/completions"
UPSTREAM = {"name": "fake", "api_key": "sk-upstream-secret"}


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The access lines' fields, as records (no ``logs.setup`` handler in the way)."""
    monkeypatch.setattr(logs, "_handler", None)
    monkeypatch.setattr(logging.getLogger("ocrproxy"), "propagate", True)
    caplog.set_level(logging.INFO, logger="ocrproxy")

    def lines() -> list[dict[str, Any]]:
        return [r.fields for r in caplog.records if r.name == "ocrproxy.access"]

    return lines


async def _line(lines: Any, status: int) -> dict[str, Any]:
    """The access line of status ``status``, once the request has ended."""
    for _ in range(500):
        found = [line for line in lines() if line["status"] == status]
        if found:
            return found[-1]  # type: ignore[no-any-return]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no access line with status {status}: {lines()}")


async def _serve(aiohttp_server: Any, app: web.Application) -> str:
    server: TestServer = await aiohttp_server(app)
    return str(server.make_url("/v1"))


async def fail_500(request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": "no list"}}, status=500)


async def test_a_models_line_names_the_upstreams_asked(
    make_proxy: ProxyFactory, fake: FakeOpenAI, aiohttp_server: Any, records: Any
) -> None:
    other = FakeOpenAI(models_list=["llama3"])
    other.url = await _serve(aiohttp_server, other.app())
    failing = web.Application()
    failing.router.add_get("/v1/models", fail_500)
    failing_url = await _serve(aiohttp_server, failing)
    dead = {"name": "dead", "base_url": "http://127.0.0.1:9/v1"}  # nothing listens there
    ups = [
        {**UPSTREAM, "base_url": fake.url},
        {"name": "other", "base_url": other.url},
        {"name": "failing", "base_url": failing_url},
        dead,
    ]
    proxy = await make_proxy(upstreams=ups)
    assert (await proxy.get("/v1/models")).status == 200
    line = records()[-1]
    assert (line["upstream"], line["upstream_status"]) == ("fake,other,failing,dead", 200)

    proxy = await make_proxy(upstreams=[{"name": "failing", "base_url": failing_url}, dead])
    assert (await proxy.get("/v1/models")).status == 500  # the first failure is the answer
    line = records()[-1]
    assert (line["upstream"], line["upstream_status"]) == ("failing,dead", 500)

    proxy = await make_proxy(upstreams=[dead])
    assert (await proxy.get("/v1/models")).status == 502
    line = records()[-1]
    assert (line["upstream"], line["upstream_status"]) == ("dead", None)  # it never answered


async def test_a_client_that_leaves_a_stream_during_ocr_logs_the_images_found(
    make_proxy: ProxyFactory, fake: FakeOpenAI, records: Any
) -> None:
    proxy = await make_proxy(ocr={"keepalive_after_s": 0.05, "keepalive_interval_s": 0.05})
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("a"))))
    assert r.status == 200  # `a` is in the memory cache now
    fake.ocr_delay = 1.0
    parts = [image_part(data_url(label)) for label in ("a", "b", "b")]
    r = await proxy.post(URL, json=chat("m-ocr", "read", *parts, stream=True))
    assert r.status == 200
    await r.content.readuntil(b"\n\n")  # committed early: a keep-alive came
    r.close()  # the user pressed Stop
    line = await _line(records, 499)
    assert (line["images"], line["cache_hits"]) == (2, 1)  # two distinct, one from memory
    assert line["ocr_model"] == "vision-1" and line["upstream"] == "fake"
    assert line["ocr_ms"] is None  # the OCR step never finished


async def test_a_client_that_hangs_up_during_ocr_logs_the_images_found(
    aiohttp_client: Any, fake: FakeOpenAI, records: Any
) -> None:
    app = create_app(make_config(fake))
    # As `ocrproxy serve` runs it: a client that hangs up cancels its handler.
    proxy = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    fake.ocr_delay = 1.0
    body = chat("m-ocr", "read", image_part(data_url("c")), image_part(data_url("d")))
    request = asyncio.ensure_future(proxy.post(URL, json=body))
    for _ in range(500):
        if fake.ocr_active:
            break
        await asyncio.sleep(0.01)
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)
    line = await _line(records, 499)
    assert (line["images"], line["cache_hits"]) == (2, 0)
    assert fake.chat_requests == []


@pytest.fixture
def json_stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Start ``logs.setup(level)`` writing to a stderr the test reads; undone afterwards."""
    root = logging.getLogger("ocrproxy")
    saved = root.handlers[:], root.level, root.propagate, logs._handler
    fake = Stderr()

    def start(level: str) -> Stderr:
        monkeypatch.setattr(sys, "stderr", fake)  # in the test's own phase: pytest's is over
        logs.setup(level)
        return fake

    try:
        yield start
    finally:
        root.handlers[:], root.level, root.propagate = saved[:3]
        logs._handler = saved[3]


@pytest.mark.parametrize("level", ["info", "error"])
async def test_the_stall_watchdog_logs_under_its_own_name(
    make_proxy: ProxyFactory, json_stderr: Any, level: str
) -> None:
    stderr = json_stderr(level)
    proxy = await make_proxy(server={"stall_warning_ms": 50})
    assert (await proxy.get("/healthz")).status == 200  # the app (and its watchdog) runs
    await asyncio.sleep(0.1)
    time.sleep(0.3)  # hold the event loop, as a blocking call would
    await asyncio.sleep(0.2)  # the watchdog's next turn
    assert logs._handler is not None
    logs._handler.flush()
    stalls = [line for line in stderr.lines() if line["msg"].startswith("event loop stalled")]
    if level == "error":  # a warning: filtered by the log level like every other line
        assert stalls == []
        return
    assert stalls, stderr.lines()
    for line in stalls:
        assert (line["logger"], line["level"]) == ("ocrproxy.stall", "warning")
        assert line["request_id"] == "-"  # no request's: the loop's own
        assert line["stalled_ms"] >= 100 and "cpu_ms" in line


@pytest.fixture
def without_tesserocr(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The local engine's package cannot be imported (the extra is not installed)."""
    local._tesserocr.cache_clear()
    monkeypatch.setitem(sys.modules, "tesserocr", None)  # import fails
    try:
        yield
    finally:
        local._tesserocr.cache_clear()


@pytest.mark.usefixtures("without_tesserocr", "logger_restored")
def test_describe_without_the_local_engine_says_to_run_it_again(
    tmp_path: Any, fake: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "note.png"
    picture.write_bytes(png("note"))
    cfg = tmp_path / "ocrproxy.toml"
    cfg.write_text(f'[[upstreams]]\nbase_url = "{fake.url}"\n')
    code = cli.main(["describe", str(picture), "--model", "local", "--config", str(cfg)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert "pip install 'ocrproxy[local]'" in err and err.endswith("then run the command again\n")
    assert "restart" not in err


@pytest.mark.usefixtures("without_tesserocr")
async def test_the_server_still_says_to_restart_it(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    body = chat("m-ocr", "read", image_part(data_url("e")), ocr_model="local")
    r = await proxy.post(URL, json=body)
    error = (await r.json())["error"]
    assert r.status == 400 and error["code"] == "ocr_model_unavailable"
    assert error["message"].endswith("then restart the proxy")


def test_missing_language_data_is_told_the_same_way() -> None:
    settings = local.config.OcrLocal(languages=("eng", "xx_none"))
    problem = local.Engine(settings, then=local.RUN_AGAIN).problem()
    if problem is None or "xx_none" not in problem:
        pytest.skip("the local engine's package is not installed: nothing to say of its data")
    assert problem.endswith("then run the command again") and "restart" not in problem

"""Hardening of the logs (issue 10, point 12: L5, L6).

- aiohttp's own loggers write JSON lines through ``logs.setup``'s handler, and its HTTP
  parser's errors never print a header value: a real ``ocrproxy serve`` gets malformed requests
  on raw sockets, and its log holds JSON lines only, never the client key.
- Upstream reasons lose their ``data:`` URLs and long base64 runs before they are logged.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ocrproxy import logs
from ocrproxy.app import create_app
from tests.conftest import chat, make_config, spawn_proxy
from tests.fakes import FakeOpenAI, data_url, image_part

CLIENT_KEY = "ck-CLIENTKEY-0123456789abcdef"
KEY_TAIL = "0123456789abcdef"  # what must not appear, even cut or quoted


async def raw_request(port: int, head: bytes) -> bytes:
    """Send ``head`` on a new connection; what came back before the server closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 20)
    finally:
        writer.close()


MALFORMED = {
    "nul": b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\x00\r\n",
    "del": b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\x7f\r\n",
    "obs-fold": b"X-Note: see below\r\n Bearer " + CLIENT_KEY.encode() + b"\r\n",
    "obs-fold-auth": b"Authorization: Bearer\r\n\t" + CLIENT_KEY.encode() + b"\r\n",
    "9kb": b"Authorization: Bearer " + CLIENT_KEY.encode() + b"a" * 9000 + b"\r\n",
    "9kb-other": b"X-Key: " + CLIENT_KEY.encode() + b"b" * 9000 + b"\r\n",
}


async def test_parser_errors_are_json_lines_without_the_key(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    config = f"""
[server]
log_level = "info"
[auth]
keys = ["{CLIENT_KEY}"]
[[upstreams]]
name = "fake"
base_url = "{fake.url}"
"""
    async with spawn_proxy(tmp_path, config) as (proc, base, session, log_path):
        port = int(base.rsplit(":", 1)[1])
        for name, header in MALFORMED.items():
            head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b"\r\n"
            answer = await raw_request(port, head)
            assert answer[:9] in (b"HTTP/1.0 ", b"HTTP/1.1 ") and answer[9:10] == b"4", name
        # A good request after them: the server is fine, and its own lines are there too.
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        async with session.get(base + "/v1/models", headers=headers) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    text = log_path.read_text()
    assert CLIENT_KEY not in text and KEY_TAIL not in text, text
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]  # JSON only
    assert all(isinstance(line, dict) and "request_id" in line for line in lines)
    parser = [line for line in lines if line["logger"] == "aiohttp.server"]
    assert len(parser) >= len(MALFORMED), text
    for line in parser:
        assert line["level"] == "error" and line["msg"].startswith("Error handling request")
        assert line["exc"].startswith("aiohttp.http_exceptions.")  # the type, nothing more
        assert "\n" not in line["exc"]
    assert any(line["logger"] == "ocrproxy.access" for line in lines)


def test_foreign_records_are_scrubbed_and_parser_errors_keep_only_their_type() -> None:
    from aiohttp.http_exceptions import LineTooLong

    formatter = logs.JsonFormatter()
    try:
        raise LineTooLong(b"Authorization: Bearer " + CLIENT_KEY.encode() + b"aaa", "8190")
    except LineTooLong:
        record = logging.getLogger("aiohttp.server").makeRecord(
            "aiohttp.server",
            logging.ERROR,
            "x",
            1,
            "Error handling request from %s",
            ("127.0.0.1",),
            sys.exc_info(),
        )
    line = orjson.loads(formatter.format(record))
    assert line["msg"] == "Error handling request from 127.0.0.1"
    assert line["exc"] == "aiohttp.http_exceptions.LineTooLong" and line["status"] == 400
    try:
        raise ValueError(f"bad b'Authorization: Bearer {CLIENT_KEY}\\x00' line")
    except ValueError:
        record = logging.getLogger("aiohttp.web").makeRecord(
            "aiohttp.web",
            logging.ERROR,
            "x",
            1,
            "oops: Authorization: Bearer %s",
            (CLIENT_KEY,),
            sys.exc_info(),
        )
    line = orjson.loads(formatter.format(record))
    assert KEY_TAIL not in orjson.dumps(line).decode()
    assert "Traceback" in line["exc"] and "b'[omitted]'" in line["exc"]
    # ocrproxy's own records are not touched.
    own = logging.getLogger("ocrproxy.x").makeRecord(
        "ocrproxy.x", logging.INFO, "x", 1, "b'kept'", (), None
    )
    assert orjson.loads(formatter.format(own))["msg"] == "b'kept'"


def test_setup_routes_aiohttp_loggers_through_the_json_handler() -> None:
    saved = {
        name: (lg.handlers[:], lg.propagate, lg.level)
        for name in ("ocrproxy", "aiohttp", "asyncio")
        for lg in [logging.getLogger(name)]
    }
    saved_handler = logs._handler
    try:
        logs.setup("info")
        handler = logs._handler
        for name in (
            "aiohttp.server",
            "aiohttp.access",
            "aiohttp.web",
            "aiohttp.internal",
            "aiohttp.client",
        ):
            logger = logging.getLogger(name)
            assert logger.getEffectiveLevel() <= logging.INFO
            assert logger.parent is not None and handler in logger.parent.handlers
            assert logging.getLogger("aiohttp").propagate is False
    finally:
        for name, (handlers, propagate, level) in saved.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
            logging.getLogger(name).setLevel(level)
        logs._handler = saved_handler


# --- L6: no image payload in upstream reasons ---------------------------------------------------


def test_redact_drops_data_urls_and_base64_runs() -> None:
    payload = base64.b64encode(bytes(range(256)) * 4).decode()
    text = f"bad image data:image/png;note=x;base64,{payload} and {payload[:300]} end"
    out = logs.redact(text[:600])
    assert out.startswith("bad image data:…[image omitted]")
    assert payload[:40] not in out and payload[300:340] not in out
    assert logs.redact("cut data:image/png;base64,iVBORw0KGgo") == "cut data:…[image omitted]"
    assert logs.redact("x " + "QUJD" * 16 + " y") == "x [base64 omitted] y"
    assert logs.redact("short QUJDQUJD and sk-abcdef123456") == "short QUJDQUJD and sk-abcdef…"


class EchoUrlFake(FakeOpenAI):
    """An OCR model that refuses every image, quoting its data URL in the error message."""

    async def describe(self, body: dict[str, Any]) -> web.Response:
        content = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        return web.json_response(
            {"error": {"message": f"bad image {url}", "type": "invalid_request_error"}},
            status=400,
        )


async def test_ocr_reason_with_the_data_url_is_logged_without_it(
    aiohttp_server: Any, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = EchoUrlFake()
    server: TestServer = await aiohttp_server(upstream.app())
    upstream.url = str(server.make_url("/v1"))
    proxy: TestClient[Any, Any] = await aiohttp_client(create_app(make_config(upstream)))
    url = data_url("confidential-pixels", size=3000)
    payload = url.partition(",")[2]
    with caplog.at_level(logging.DEBUG, logger="ocrproxy"):
        r = await proxy.post("/v1/chat/completions", json=chat("m-ocr", image_part(url)))
        assert r.status == 200  # a placeholder (on_error = "placeholder")
    failures = [rec for rec in caplog.records if "OCR failed" in rec.getMessage()]
    assert failures and failures[0].levelno == logging.WARNING
    assert "[image omitted]" in failures[0].getMessage()
    for record in caplog.records:
        message = record.getMessage() + str(getattr(record, "fields", ""))
        assert payload[:24] not in message and payload[100:124] not in message, message

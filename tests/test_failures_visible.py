"""A failed image is visible to the client: ``usage.ocr.failures``, ``X-OCR-Failures``, the
``: ocr ... failures=N`` comment of a stream committed early, and a reason in fixed words in
the placeholder the model reads (never the URL, its host or port, nor an upstream's message)."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ocrproxy.reasons import Reason, for_status
from ocrproxy.rewrite import placeholder_block
from tests.conftest import chat
from tests.fake_anthropic import b64, image_block
from tests.fakes import FakeOpenAI, data_url, image_part, png

URL = "/v1/chat/completions"


def placeholder(text: str, reason: Reason) -> None:
    """``text`` holds image 1's placeholder, saying ``reason``."""
    pattern = rf"\[Image 1 #[0-9a-f]{{8}}: this image could not be analysed \({reason.value}\)"
    assert re.search(pattern, text), text


def sent_text(fake: FakeOpenAI) -> str:
    """The message content the text model got (one user message)."""
    content: str = fake.chat_requests[-1].json()["messages"][0]["content"]
    return content


@pytest.fixture
async def image_host(aiohttp_server: Any) -> TestServer:
    """A loopback image host: an HTML page, a large image, a slow one; anything else is 404."""

    async def not_an_image(request: web.Request) -> web.Response:
        return web.Response(body=png("cat", 100), content_type="text/html")

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=png("big", 50_000), content_type="image/png")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)  # past the test's fetch_timeout_s
        return web.Response(body=png("late", 100), content_type="image/png")

    app = web.Application()
    app.router.add_get("/page.html", not_an_image)
    app.router.add_get("/large.png", large)
    app.router.add_get("/slow.png", slow)
    server: TestServer = await aiohttp_server(app)
    return server


@pytest.mark.parametrize(
    ("allowed_ports", "detail"),
    [
        ([], "port is not allowed"),  # the default ports only: this one is refused
        (["port"], "non-public network address"),  # the port is allowed, the host is not
    ],
)
async def test_refused_image_url_says_refused_and_counts_as_a_failure(
    make_proxy, fake, unused_tcp_port, caplog, allowed_ports, detail
):
    ports = [80, 443] + [unused_tcp_port for _ in allowed_ports]
    proxy = await make_proxy(ocr={"allowed_ports": ports})
    url = f"http://127.0.0.1:{unused_tcp_port}/secret-path.png?key=sk-image-key"
    with caplog.at_level(logging.WARNING, logger="ocrproxy"):
        r = await proxy.post(URL, json=chat("m-ocr", "what is it?", image_part(url)))
    assert r.status == 200
    body = await r.json()
    assert body["usage"]["ocr"]["failures"] == 1 and body["usage"]["ocr"]["images"] == 1
    assert r.headers["X-OCR-Failures"] == "1" and r.headers["X-OCR-Images"] == "1"
    assert fake.ocr_calls == []
    placeholder(sent_text(fake), Reason.DOWNLOAD_REFUSED)
    # Nothing of the URL, nor the refusal's detail, reaches the text model.
    upstream = fake.chat_requests[-1].body.decode()
    for secret in ("127.0.0.1", f":{unused_tcp_port}", "secret-path", "sk-image-key", detail):
        assert secret not in upstream
    # The log keeps the detailed message, at warning level.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(detail in message for message in warnings), warnings


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/missing.png", Reason.DOWNLOAD_FAILED),
        ("/page.html", Reason.NOT_AN_IMAGE),
        ("/large.png", Reason.TOO_LARGE),
        ("/slow.png", Reason.TIMED_OUT),
    ],
)
async def test_download_failures_name_their_reason(make_proxy, fake, image_host, path, reason):
    port = image_host.port
    ocr = {"allow_private_hosts": ["127.0.0.1"], "allowed_ports": [port]}
    proxy = await make_proxy(ocr={**ocr, "max_image_bytes": 10_000, "fetch_timeout_s": 0.2})
    url = str(image_host.make_url(path))
    r = await proxy.post(URL, json=chat("m-ocr", image_part(url)))
    assert r.status == 200 and r.headers["X-OCR-Failures"] == "1"
    placeholder(sent_text(fake), reason)
    assert f":{port}" not in fake.chat_requests[-1].body.decode()


async def test_ocr_model_500_after_retries_says_the_ocr_model_failed(make_proxy, fake):
    proxy = await make_proxy(ocr={"retries": 1, "retry_backoff_s": 0.01})
    fake.ocr_fail = {"broken"}
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("broken"))))
    assert r.status == 200
    assert fake.ocr_calls == ["broken", "broken"]  # tried again, then given up
    assert (await r.json())["usage"]["ocr"]["failures"] == 1
    assert r.headers["X-OCR-Failures"] == "1"
    placeholder(sent_text(fake), Reason.OCR_FAILED)
    assert "vision backend down" not in fake.chat_requests[-1].body.decode()  # upstream's body


@pytest.mark.parametrize(
    ("statuses", "reason"),
    [([400], Reason.OCR_REFUSED), ([429, 429], Reason.OCR_BUSY)],
)
async def test_ocr_model_refusal_and_rate_limit_have_their_own_words(
    make_proxy, fake, statuses, reason
):
    proxy = await make_proxy(ocr={"retries": 1, "retry_backoff_s": 0.01})
    fake.ocr_flaky = {"x": list(statuses)}
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("x"))))
    assert r.status == 200 and r.headers["X-OCR-Failures"] == "1"
    placeholder(sent_text(fake), reason)


async def test_ocr_timeout_says_timed_out(make_proxy, fake):
    proxy = await make_proxy(ocr={"timeout_s": 0.2})
    fake.ocr_delay = 2.0
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("slow"))))
    assert r.status == 200 and r.headers["X-OCR-Failures"] == "1"
    assert (await r.json())["usage"]["ocr"]["failures"] == 1
    placeholder(sent_text(fake), Reason.TIMED_OUT)


async def test_early_committed_stream_counts_failures_in_its_ocr_comment(make_proxy, fake):
    proxy = await make_proxy(ocr={"keepalive_after_s": 0.05, "keepalive_interval_s": 0.05})
    fake.ocr_delay = 0.4  # past keepalive_after_s: committed before the failure is known
    fake.ocr_fail = {"bad"}
    request = chat(
        "m-ocr",
        image_part(data_url("bad")),
        image_part(data_url("good")),
        stream=True,
        stream_options={"include_usage": True},
    )
    r = await proxy.post(URL, json=request)
    assert r.status == 200
    assert r.headers["X-OCR-Images"] == "2"
    assert "X-OCR-Failures" not in r.headers  # unknown when the headers went out
    body = await asyncio.wait_for(r.read(), 10)
    assert re.search(rb"\n: ocr images=2 cache_hits=0 failures=1 ms=\d+\n\n", b"\n" + body)
    final = [e for e in body.split(b"\n\n") if e.startswith(b"data: {") and b'"usage":{' in e]
    assert orjson.loads(final[-1][6:])["usage"]["ocr"]["failures"] == 1
    content = sent_text(fake)
    placeholder(content, Reason.OCR_FAILED)
    assert "A picture showing good." in content


async def test_success_reports_zero_failures(make_proxy, fake):
    proxy = await make_proxy()
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("fine"))))
    assert r.status == 200
    assert r.headers["X-OCR-Failures"] == "0"  # always beside X-OCR-Images
    assert (await r.json())["usage"]["ocr"]["failures"] == 0
    stream = chat("m-ocr", image_part(data_url("fine")), stream=True)
    r = await proxy.post(URL, json=stream)
    assert r.status == 200 and r.headers["X-OCR-Failures"] == "0"
    await r.read()
    # A request without images has no OCR headers to speak of but the model and the count.
    r = await proxy.post(URL, json=chat("m-ocr", "just text"))
    assert r.headers["X-OCR-Images"] == "0" and r.headers["X-OCR-Failures"] == "0"


async def test_messages_usage_ocr_counts_failures(make_both, fake, fake_anthropic):
    proxy = await make_both()
    fake.ocr_fail = {"broken"}
    request = {
        "model": "deepseek-v4-pro-ocr",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": [image_block(b64(png("broken")))]}],
    }
    r = await proxy.post("/v1/messages", json=request)
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Failures"] == "1"
    assert (await r.json())["usage"]["ocr"]["failures"] == 1
    (sent,) = fake_anthropic.message_requests
    placeholder(sent.json()["messages"][0]["content"][0]["text"], Reason.OCR_FAILED)


async def test_responses_usage_ocr_counts_failures(make_responses, fake, fake_responses):
    proxy = await make_responses()
    fake.ocr_fail = {"broken"}
    part = {"type": "input_image", "image_url": data_url("broken")}
    request = {"model": "glm-5.2-ocr", "input": [{"role": "user", "content": [part]}]}
    r = await proxy.post("/v1/responses", json=request)
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Failures"] == "1"
    assert (await r.json())["usage"]["ocr"]["failures"] == 1
    sent = fake_responses.received[-1].json()
    placeholder(sent["input"][0]["content"][0]["text"], Reason.OCR_FAILED)


async def test_a_browser_client_may_read_the_failures_header(make_proxy, fake):
    proxy = await make_proxy(server={"cors_origins": ["https://chat.example"]})
    headers = {"Origin": "https://chat.example"}
    r = await proxy.post(URL, json=chat("m-ocr", image_part(data_url("a"))), headers=headers)
    assert "X-OCR-Failures" in r.headers["Access-Control-Expose-Headers"].split(", ")


def test_every_reason_reads_as_a_clause_of_the_placeholder():
    for reason in Reason:
        text = placeholder_block(3, "a1b2c3d4", reason)
        assert f"[Image 3 #a1b2c3d4: this image could not be analysed ({reason.value}), " in text
        assert text.endswith("tell the user the image could not be read and why.]")
    assert "(" not in placeholder_block(1)  # no reason known: the plain note


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, Reason.OCR_REFUSED),
        (403, Reason.OCR_REFUSED),
        (413, Reason.TOO_LARGE),
        (429, Reason.OCR_BUSY),
        (504, Reason.TIMED_OUT),
        (500, Reason.OCR_FAILED),
        (503, Reason.OCR_FAILED),
    ],
)
def test_an_ocr_model_status_maps_to_one_reason(status, reason):
    assert for_status(status) is reason

"""Hardening of the OCR step: cache identity, deadlines, cache privacy, hostile OCR answers and
fair remote fetching, each against real loopback servers.

``Upstream`` is an OpenAI-compatible server that, like a llama.cpp server, answers any model
name: ``text-*`` models are the text model (they record the body size they received), every
other name is an OCR model whose behaviour the name picks (``ocr-hang``, ``ocr-huge``,
``ocr-picky``...). ``ImageHost`` serves remote images, fast or at a drip, and counts the slow
downloads it serves at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ocrproxy import config, fetch, images, local, state
from ocrproxy.app import create_app
from ocrproxy.dialects import chat as chat_dialect
from tests.conftest import chat, missing, require_binary
from tests.fakes import data_url, image_part, label_of, png
from tests.servers import redis_server

URL = "/v1/chat/completions"
PLACEHOLDER = "this image could not be analysed"
HUGE = 20 * 1024 * 1024


def completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


@dataclass
class Upstream:
    """Text model and OCR model in one loopback server; records what it was sent."""

    url: str = ""
    ocr_calls: list[tuple[str, str | None, str | None, str]] = field(default_factory=list)
    text_bodies: list[bytes] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends every hanging call

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    def text_contents(self) -> list[str]:
        return [str(orjson.loads(b)["messages"][0]["content"]) for b in self.text_bodies]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        obj = orjson.loads(body)
        model = obj["model"]
        if model.startswith("text-"):
            self.text_bodies.append(body)
            return web.json_response(completion(model, "ok"))
        image_url = obj["messages"][0]["content"][1]["image_url"]
        try:
            label = label_of(image_url["url"])
        except UnicodeDecodeError:  # a real image, not one of the fakes' labelled ones
            label = "real"
        auth = request.headers.get("Authorization")
        self.ocr_calls.append((model, auth, image_url.get("detail"), label))
        if model == "ocr-hang":
            await asyncio.wait_for(self.release.wait(), 30)
        if model == "ocr-huge":
            return await self.huge(request, model)
        if model == "ocr-picky" and auth == "Bearer sk-bad":
            await asyncio.sleep(0.5)  # long enough for the good client to join
            return web.json_response({"error": {"message": "Incorrect API key"}}, status=401)
        detail = image_url.get("detail") or "none"
        return web.json_response(completion(model, f"REMOTE {label} at {detail} by {model}"))

    async def huge(self, request: web.Request, model: str) -> web.StreamResponse:
        """A valid chat completion whose content is 20 MiB."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        head = orjson.dumps(completion(model, "@@"))
        before, _, after = head.partition(b"@@")
        try:
            await response.write(before)
            piece = b"x" * (1024 * 1024)
            for _ in range(HUGE // len(piece)):
                await response.write(piece)
            await response.write(after)
        except ConnectionError:  # the proxy hung up: what it should do
            pass
        return response


ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def upstream(aiohttp_server: Any) -> AsyncIterator[Upstream]:
    state = Upstream()
    server: TestServer = await aiohttp_server(state.app())
    state.url = str(server.make_url("/v1"))
    yield state
    state.release.set()


@pytest.fixture
def make_proxy(aiohttp_client: Any, upstream: Upstream) -> ProxyFactory:
    async def factory(
        api_key: str | None = "sk-upstream", **sections: dict[str, Any]
    ) -> TestClient[Any, Any]:
        up: dict[str, Any] = {"name": "up", "base_url": upstream.url}
        if api_key:
            up["api_key"] = api_key
        raw: dict[str, Any] = {"upstreams": [up], "ocr": {"model": "ocr-1", "retries": 0}}
        for name, values in sections.items():
            raw[name] = {**raw.get(name, {}), **values}
        client: TestClient[Any, Any] = await aiohttp_client(
            create_app(config.from_mapping(raw, env={}))
        )
        return client

    return factory


def ocr_chat(ocr_model: str, *parts: Any) -> dict[str, Any]:
    return {**chat("text-1", "what is this?", *parts), "ocr_model": ocr_model}


# Point 10 (L1, L8): unambiguous keys, detail in the key.


def _real_png() -> str:
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pragma: no cover - the local extra is missing
        missing("Pillow is not installed (pip install 'ocrproxy[local]')")
    image = Image.new("RGB", (240, 60), "white")
    ImageDraw.Draw(image).text((10, 20), "HELLO 42", fill="black")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


async def test_an_ocr_model_name_spelling_the_local_key_cannot_poison_local_readings(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    engine = local.Engine(config.OcrLocal())
    if (problem := engine.problem()) is not None:
        missing(problem)
    tag = engine.cache_tag()
    engine.close()
    proxy = await make_proxy()
    image = _real_png()
    # The attacker's OCR model is routed to the upstream (glob `*`), which answers any name.
    # Such a request may also be refused at the door (control characters in `ocr_model`), so
    # the describer is driven directly too: the key must be unambiguous whatever name reaches it.
    evil_model = "local\u0000" + tag
    try:
        async with proxy.post(URL, json=ocr_chat(evil_model, image_part(image))) as r:
            await r.read()
    except aiohttp.ClientError:  # cut (base: a NUL in a response header)
        pass
    describer = proxy.server.app[state.DESCRIBER]
    messages = chat("text-1", image_part(image))["messages"]
    scan = chat_dialect.scan(msgspec.Raw(msgspec.json.encode(messages)))
    await images.identify(scan.images, config.Ocr())
    report = await describer.describe_all(scan.images, evil_model, {})
    assert report.failures == 0 and upstream.ocr_calls  # the remote answer was cached
    victim = ocr_chat("local", image_part(image))
    r = await proxy.post(URL, json=victim)
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Cache-Hits"] == "0"  # the local engine read it itself
    assert "REMOTE" not in upstream.text_contents()[-1]


async def test_detail_is_part_of_the_cache_key(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    image = data_url("detailed")

    async def ask(detail: str | None) -> str:
        r = await proxy.post(URL, json=ocr_chat("ocr-1", image_part(image, detail)))
        assert r.status == 200, await r.text()
        return str(r.headers["X-OCR-Cache-Hits"])

    assert await ask("low") == "0"
    assert await ask("high") == "0"  # a blurry `low` reading is not served to `high`
    assert await ask("high") == "1"
    assert await ask("low") == "1"
    assert await ask(None) == "0"
    assert await ask("auto") == "1"  # no detail means `auto`: one entry
    assert [call[2] for call in upstream.ocr_calls] == ["low", "high", None]
    assert "REMOTE detailed at high" in upstream.text_contents()[2]


# Point 13 (L7): one deadline per image, queue wait included.


async def test_timeout_covers_the_wait_for_a_slot_on_a_hung_ocr_model(
    make_proxy: ProxyFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(ocr={"max_concurrency": 2, "timeout_s": 1})

    async def one(n: int) -> tuple[float, int, str]:
        started = time.monotonic()
        r = await proxy.post(URL, json=ocr_chat("ocr-hang", image_part(data_url(f"hung{n}"))))
        body = await r.json()
        return time.monotonic() - started, r.status, orjson.dumps(body).decode()

    with caplog.at_level(logging.WARNING, logger="ocrproxy.describe"):
        results = await asyncio.gather(*(one(n) for n in range(7)))
    # Before: batches of two, ending at 1, 2, 3 and 4 s.
    for elapsed, status, _ in results:
        assert status == 200
        assert elapsed < 2.5, [round(r[0], 2) for r in results]
    assert len(upstream.text_bodies) == 7
    assert all(PLACEHOLDER in content for content in upstream.text_contents())
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("OCR failed")]
    assert len(failed) == 7 and all("within 1 s" in m for m in failed), failed
    # The five that waited for a slot say so: "busy", or how long of the second they waited.
    queued = [m for m in failed if "busy" in m or "waiting for a call slot" in m]
    assert len(queued) >= 5, failed
    assert len(upstream.ocr_calls) <= 7  # queued images that never got a slot were not sent


# Point 14 (L9): cache scope and flights by credential.


async def test_per_key_scope_keeps_descriptions_private_to_a_client_key(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(auth={"keys": ["key-a", "key-b"]}, cache={"scope": "per_key"})
    image = image_part(data_url("private"))

    async def ask(key: str) -> str:
        headers = {"Authorization": f"Bearer {key}"}
        r = await proxy.post(URL, json=ocr_chat("ocr-1", image), headers=headers)
        assert r.status == 200, await r.text()
        return str(r.headers["X-OCR-Cache-Hits"])

    assert await ask("key-a") == "0"
    assert await ask("key-b") == "0"  # B learns nothing of A's image
    assert await ask("key-a") == "1"
    assert await ask("key-b") == "1"
    assert len(upstream.ocr_calls) == 2
    # Concurrent requests of one key share one flight.
    second = image_part(data_url("together"))
    results = await asyncio.gather(
        *(
            proxy.post(
                URL, json=ocr_chat("ocr-1", second), headers={"Authorization": "Bearer key-a"}
            )
            for _ in range(3)
        )
    )
    assert all(r.status == 200 for r in results)
    assert len(upstream.ocr_calls) == 3


async def test_shared_scope_shares_descriptions_across_keys(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy(auth={"keys": ["key-a", "key-b"]})
    image = image_part(data_url("shared"))
    for key, hits in (("key-a", "0"), ("key-b", "1")):  # the documented oracle
        r = await proxy.post(
            URL, json=ocr_chat("ocr-1", image), headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status == 200 and r.headers["X-OCR-Cache-Hits"] == hits
    assert len(upstream.ocr_calls) == 1


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_relay_mode_a_refused_key_cannot_fail_another_clients_flight(
    make_proxy: ProxyFactory, upstream: Upstream, backend: str, tmp_path: Path
) -> None:
    cache: dict[str, Any] = {"backend": backend}
    with contextlib.ExitStack() as stack:
        if backend == "redis":  # two flights of one process for one key: the claim passes on
            binary = require_binary("redis-server")
            port = stack.enter_context(redis_server(binary, tmp_path))
            cache["redis_url"] = f"redis://127.0.0.1:{port}/0"
        await _relay_race(await make_proxy(api_key=None, cache=cache), upstream)


async def _relay_race(proxy: TestClient[Any, Any], upstream: Upstream) -> None:
    """No [auth] keys and no upstream key: each client's key is relayed to the OCR model."""
    image = image_part(data_url("raced"))
    bad = asyncio.ensure_future(
        proxy.post(
            URL, json=ocr_chat("ocr-picky", image), headers={"Authorization": "Bearer sk-bad"}
        )
    )
    while not upstream.ocr_calls:  # the bad key's flight has started
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    good = await proxy.post(
        URL, json=ocr_chat("ocr-picky", image), headers={"Authorization": "Bearer sk-good"}
    )
    assert good.status == 200, await good.text()
    assert good.headers["X-OCR-Cache-Hits"] == "0"
    bad_response = await bad
    assert bad_response.status == 200
    contents = upstream.text_contents()
    assert any("REMOTE raced at none by ocr-picky" in c for c in contents)  # the good client's
    assert any(PLACEHOLDER in c for c in contents)  # the bad client's own failure
    assert [call[1] for call in upstream.ocr_calls] == ["Bearer sk-bad", "Bearer sk-good"]
    # The shared cache still serves the good answer (the documented oracle).
    again = await proxy.post(
        URL, json=ocr_chat("ocr-picky", image), headers={"Authorization": "Bearer sk-other"}
    )
    assert again.headers["X-OCR-Cache-Hits"] == "1"
    assert len(upstream.ocr_calls) == 2


# Point 16 (L12): an OCR answer is read up to a bound.


async def test_a_huge_ocr_answer_fails_the_image_and_never_reaches_the_text_model(
    make_proxy: ProxyFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy()
    with caplog.at_level(logging.WARNING, logger="ocrproxy.describe"):
        r = await proxy.post(URL, json=ocr_chat("ocr-huge", image_part(data_url("flood"))))
    assert r.status == 200, await r.text()
    assert r.headers["X-OCR-Cache-Hits"] == "0"
    (body,) = upstream.text_bodies
    assert len(body) < 64 * 1024, len(body)
    assert PLACEHOLDER in upstream.text_contents()[0]
    assert any("the OCR model's answer is too large" in rec.getMessage() for rec in caplog.records)


# Point 7 (M5): fetches in flight per request, pool wait is not a connect failure.


@dataclass
class ImageHost:
    """Serves ``/fast.png`` at once and ``/slow/N.png`` at a drip; counts slow downloads."""

    port: int = 0
    slow_now: int = 0
    slow_peak: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/fast.png", self.fast)
        app.router.add_get("/slow/{n}", self.slow)
        return app

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def fast(self, request: web.Request) -> web.Response:
        return web.Response(body=png("fast", 200), content_type="image/png")

    async def slow(self, request: web.Request) -> web.StreamResponse:
        self.slow_now += 1
        self.slow_peak = max(self.slow_peak, self.slow_now)
        try:
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            await response.prepare(request)
            for byte in png("slow", 200):
                if self.stop.is_set():
                    break
                await response.write(bytes([byte]))
                await asyncio.sleep(0.25)
            assert request.transport is not None
            request.transport.abort()  # never a whole image: the fetch fails
            return response
        except ConnectionError:
            raise
        finally:
            self.slow_now -= 1


async def test_one_request_of_slow_urls_cannot_starve_another_requests_fetch(
    make_proxy: ProxyFactory, upstream: Upstream, aiohttp_server: Any
) -> None:
    host = ImageHost()
    server: TestServer = await aiohttp_server(host.app())
    assert server.port is not None
    host.port = server.port
    proxy = await make_proxy(
        ocr={
            "allow_private_hosts": ["127.0.0.1"],
            "allowed_ports": [host.port],
            "fetch_timeout_s": 3,
        }
    )
    slow = [image_part(host.url(f"/slow/{n}.png")) for n in range(20)]
    greedy = asyncio.ensure_future(proxy.post(URL, json=ocr_chat("ocr-1", *slow)))
    try:
        await asyncio.sleep(0.5)
        started = time.monotonic()
        r = await proxy.post(URL, json=ocr_chat("ocr-1", image_part(host.url("/fast.png"))))
        elapsed = time.monotonic() - started
        assert r.status == 200, await r.text()
        # Before: the greedy request held every connection to the host (8) and this image
        # failed after waiting for one (a pool wait counted as a connect timeout).
        assert "REMOTE fast" in upstream.text_contents()[-1]
        assert elapsed < 2.0, elapsed
        assert 1 <= host.slow_peak <= 4  # [ocr] max_fetches_per_request
    finally:
        host.stop.set()
        response = await greedy
    assert response.status == 200
    assert host.slow_peak <= 4
    assert PLACEHOLDER in upstream.text_contents()[-1]


async def test_a_wait_for_a_pool_slot_is_not_a_connect_failure(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight slow downloads fill the pool's slots for the host; a ninth waits for one instead of
    failing at the connect timeout (aiohttp's ``connect`` counts the pool wait)."""
    monkeypatch.setattr(fetch, "CONNECT_TIMEOUT_S", 0.3)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(body=png(request.match_info["name"], 200), content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}", slow)
    server: TestServer = await aiohttp_server(app)
    settings = config.Ocr(
        allow_private_hosts=("127.0.0.1",), allowed_ports=(server.port,), fetch_timeout_s=5
    )
    fetcher = fetch.Fetcher(settings)
    try:
        results = await asyncio.gather(
            *(fetcher.fetch(f"http://127.0.0.1:{server.port}/img{n}") for n in range(9)),
            return_exceptions=True,
        )
    finally:
        await fetcher.close()
    assert all(isinstance(r, fetch.Fetched) for r in results), results

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ocrproxy import config
from ocrproxy.app import create_app
from tests.fake_anthropic import FakeAnthropic
from tests.fakes import FakeOpenAI

ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeOpenAI:
    state = FakeOpenAI()
    server: TestServer = await aiohttp_server(state.app())
    state.url = str(server.make_url("/v1"))
    return state


def make_config(fake: FakeOpenAI, **sections: dict[str, Any]) -> config.Config:
    raw: dict[str, Any] = {
        "upstreams": [{"name": "fake", "base_url": fake.url, "api_key": "sk-upstream-secret"}],
        "ocr": {"model": "vision-1", "keepalive_after_s": 3.0, "retries": 0},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **values}
        else:
            raw[name] = values
    # The fakes list a few models but answer any: the model check is tested on its own
    # (tests/test_catalog.py), so elsewhere it stays off unless a test turns it on.
    raw["upstreams"] = [{"check_models": False, **up} for up in raw["upstreams"]]
    return config.from_mapping(raw, env={})


@pytest.fixture
def make_proxy(aiohttp_client: Any, fake: FakeOpenAI) -> ProxyFactory:
    async def factory(**sections: dict[str, Any]) -> TestClient[Any, Any]:
        cfg = make_config(fake, **sections)
        client: TestClient[Any, Any] = await aiohttp_client(create_app(cfg))
        return client

    return factory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> TestClient[Any, Any]:
    return await make_proxy()


@pytest.fixture
async def fake_anthropic(aiohttp_server: Any) -> FakeAnthropic:
    state = FakeAnthropic()
    server: TestServer = await aiohttp_server(state.app())
    state.url = str(server.make_url("")).rstrip("/")
    return state


def anthropic_upstream(fake: FakeAnthropic, **extra: Any) -> dict[str, Any]:
    """An ``[[upstreams]]`` entry for the fake Anthropic upstream (listed before the OpenAI
    one, so that ``claude-haiku*`` OCR calls route to it)."""
    return {
        "name": "anthropic",
        "base_url": fake.url,
        "api_key": "sk-ant-upstream-secret",
        "api": "anthropic",
        "models": ["deepseek-*", "claude-*", "fail-*"],
        **extra,
    }


@pytest.fixture
def make_both(aiohttp_client: Any, fake: FakeOpenAI, fake_anthropic: FakeAnthropic) -> ProxyFactory:
    """A proxy with two upstreams: the fake Anthropic one and the fake OpenAI one."""

    async def factory(**sections: dict[str, Any]) -> TestClient[Any, Any]:
        openai = {"name": "fake", "base_url": fake.url, "api_key": "sk-upstream-secret"}
        upstreams = sections.pop("upstreams", None) or [anthropic_upstream(fake_anthropic), openai]
        cfg = make_config(fake, upstreams=upstreams, **sections)  # type: ignore[arg-type]
        client: TestClient[Any, Any] = await aiohttp_client(create_app(cfg))
        return client

    return factory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def spawn_proxy(
    tmp_path: Path, config_text: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, aiohttp.ClientSession, Path]]:
    """Run `ocrproxy serve` as a real process on a free port; yield (process, base URL,
    client session, log file). Its stderr goes to a file, so a full pipe can never block it."""
    port = free_port()
    path = tmp_path / "ocrproxy.toml"
    path.write_text(config_text)
    log_path = tmp_path / "ocrproxy.log"
    with open(log_path, "wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ocrproxy",
            "serve",
            "--config",
            str(path),
            "--port",
            str(port),
            stderr=log_file,
            env={**os.environ, **(env or {})},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(base + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the proxy did not start: " + log_path.read_text())
            yield proc, base, session, log_path
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def chat(model: str, *content: Any, **extra: Any) -> dict[str, Any]:
    """A one-message chat request whose content is ``content`` parts (or one string)."""
    if len(content) == 1 and isinstance(content[0], str):
        message_content: Any = content[0]
    else:
        message_content = [
            {"type": "text", "text": c} if isinstance(c, str) else c for c in content
        ]
    return {"model": model, "messages": [{"role": "user", "content": message_content}], **extra}


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def missing(reason: str) -> NoReturn:
    """Skip a test that needs something this machine lacks; under CI (``$CI`` set), fail it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set: install it rather than skip")
    pytest.skip(reason)


def require_local_engine() -> None:
    """Skip (fail under CI) unless the local OCR engine can run: Pillow, tesserocr, language data."""
    from ocrproxy import local

    problem = local.Engine(config.OcrLocal()).problem()
    if problem is not None:
        missing(problem)


def require_binary(name: str) -> str:
    """The path of a system program, or skip (fail under CI) when it is not installed."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        missing(f"`{name}` is not installed (apt-get install the package that provides it)")
    return path


from tests.fake_responses import FakeResponses  # noqa: E402  (appended with its fixtures)


@pytest.fixture
async def fake_responses(aiohttp_server: Any) -> FakeResponses:
    state = FakeResponses()
    server: TestServer = await aiohttp_server(state.app())
    state.url = str(server.make_url("/v1"))
    return state


def responses_upstream(fake: FakeResponses, **extra: Any) -> dict[str, Any]:
    """An ``[[upstreams]]`` entry (``api = "openai"``) for the fake Responses upstream, listed
    before the OpenAI one, which stays the OCR model's (``vision-1``) and serves other models."""
    return {
        "name": "responses",
        "base_url": fake.url,
        "api_key": "sk-responses-secret",
        "models": ["glm-*", "codex-*", "fail-*", "incomplete-*", "plain-*"],
        **extra,
    }


@pytest.fixture
def make_responses(
    aiohttp_client: Any, fake: FakeOpenAI, fake_responses: FakeResponses
) -> ProxyFactory:
    """A proxy with two OpenAI-API upstreams: the fake Responses one, then the fake OpenAI one."""

    async def factory(**sections: dict[str, Any]) -> TestClient[Any, Any]:
        openai = {"name": "fake", "base_url": fake.url, "api_key": "sk-upstream-secret"}
        upstreams = [responses_upstream(fake_responses), openai]
        cfg = make_config(fake, upstreams=upstreams, **sections)  # type: ignore[arg-type]
        client: TestClient[Any, Any] = await aiohttp_client(create_app(cfg))
        return client

    return factory


@pytest.fixture
def logger_restored() -> Iterator[None]:
    """``ocrproxy describe`` sets up logging for the process; undo that for the other tests."""
    import logging

    from ocrproxy import logs

    logger = logging.getLogger("ocrproxy")
    saved = logger.handlers[:], logger.level, logger.propagate, logs._handler
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[:3]
    logs._handler = saved[3]

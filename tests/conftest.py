from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ocrproxy import config
from ocrproxy.app import create_app
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
        "ocr": {"model": "vision-1", "keepalive_after_s": 3.0},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **values}
        else:
            raw[name] = values
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


def require_binary(name: str) -> str:
    """The path of system binary ``name``; skip the test if it is missing, fail under CI."""
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"`{name}` is not installed (CI installs it: see .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path

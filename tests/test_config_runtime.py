"""Config values that would load fine and then break every request at run time are refused."""

from __future__ import annotations

import pytest

from ocrproxy import config
from tests.conftest import ProxyFactory, chat
from tests.fakes import FakeOpenAI


def test_api_key_with_a_stray_carriage_return_is_refused_at_start() -> None:
    """A key taken from an EnvironmentFile edited on Windows ends in "\\r"; ${VAR} expands it
    verbatim. It should be a start-up ConfigError naming the key, not a 500 on every request."""
    raw = {"upstreams": [{"name": "u", "base_url": "http://127.0.0.1:9/v1", "api_key": "${KEY}"}]}
    with pytest.raises(config.ConfigError):
        config.from_mapping(raw, env={"KEY": "sk-live-secret\r"})


async def test_api_key_with_a_stray_carriage_return_fails_every_request(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    """What happens today when such a key gets through: every chat request is a 500."""
    try:
        proxy = await make_proxy(
            upstreams=[{"name": "fake", "base_url": fake.url, "api_key": "sk-upstream-secret\r"}]
        )
    except config.ConfigError:
        return  # refused at start-up: fine
    resp = await proxy.post("/v1/chat/completions", json=chat("gpt-3.5-turbo", "hi"))
    assert resp.status != 500, await resp.text()

"""Config values that would load fine and then break every request at run time are refused."""

from __future__ import annotations

import pytest

from ocrproxy import config


def test_api_key_with_a_stray_carriage_return_is_refused_at_start() -> None:
    """A key taken from an EnvironmentFile edited on Windows ends in "\\r"; ${VAR} expands it
    verbatim. It should be a start-up ConfigError naming the key, not a 500 on every request."""
    raw = {"upstreams": [{"name": "u", "base_url": "http://127.0.0.1:9/v1", "api_key": "${KEY}"}]}
    with pytest.raises(config.ConfigError) as info:
        config.from_mapping(raw, env={"KEY": "sk-live-secret\r"})
    assert "$.upstreams[0].api_key" in str(info.value)
    assert "sk-live-secret" not in str(info.value)
    with pytest.raises(config.ConfigError, match="auth"):
        config.from_mapping({**raw, "auth": {"keys": ["ck\n"]}}, env={"KEY": "sk-ok"})

"""Config loading: defaults, TOML, environment, validation messages, secrets masked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ocrproxy import config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ocrproxy.toml"
    path.write_text(text)
    return path


def test_no_file_uses_openai_sdk_conventions():
    cfg = config.load(None, env={})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert cfg.upstreams[0].base_url == "https://api.openai.com/v1"
    assert cfg.upstreams[0].api_key == ""
    assert cfg.ocr.model == "gpt-4o-mini" and cfg.ocr.suffix == "-ocr"
    assert cfg.ocr.on_error == "placeholder" and cfg.ocr.keepalive_after_s == 15
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-env"}
    cfg = config.load(None, env=env)
    assert cfg.upstreams[0].base_url == "http://127.0.0.1:9/v1"
    assert cfg.upstreams[0].api_key == "sk-env"


def test_full_file_with_env_substitution(tmp_path):
    path = write(
        tmp_path,
        """
[server]
host = "127.0.0.1"
port = 9000
max_body_bytes = 1048576

[auth]
keys = ["${CLIENT_KEY}"]

[[upstreams]]
name = "deepseek"
base_url = "https://api.deepseek.com/v1"
api_key = "${DEEPSEEK_KEY}"
models = ["deepseek-*"]

[[upstreams]]
name = "openai"
base_url = "${BASE:-https://api.openai.com/v1}"
api_key = "${OPENAI_API_KEY}"

[ocr]
model = "gpt-4o"
on_error = "fail"
timeout_s = 30

[cache]
max_entries = 5
""",
    )
    env = {"CLIENT_KEY": "ck", "DEEPSEEK_KEY": "dk", "OPENAI_API_KEY": "ok"}
    cfg = config.load(path, env=env, port=9100)
    assert cfg.server.port == 9100  # command line wins
    assert cfg.auth.keys == ("ck",)
    assert [u.name for u in cfg.upstreams] == ["deepseek", "openai"]
    assert cfg.upstreams[0].api_key == "dk" and cfg.upstreams[0].models == ("deepseek-*",)
    assert cfg.upstreams[1].base_url == "https://api.openai.com/v1"
    assert cfg.ocr.model == "gpt-4o" and cfg.ocr.on_error == "fail"
    assert cfg.cache.max_entries == 5


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nprot = 1\n", "prot"),
        ('[ocr]\ntimeout_s = "soon"\n', "$.ocr.timeout_s"),
        ('[ocr]\non_error = "ignore"\n', "$.ocr.on_error"),
        ("[nonsense]\na = 1\n", "nonsense"),
        ('[[upstreams]]\nbase_url = "ftp://x"\n', "$.upstreams[0].base_url"),
        ("[server]\nport = 70000\n", "$.server.port"),
        ('[ocr]\nsuffix = ""\n', "$.ocr.suffix"),
        ("[ocr]\nmax_concurrency = 0\n", "$.ocr.max_concurrency"),
        ('[[upstreams]]\nbase_url = "${NOPE}"\n', "NOPE"),
        ("this is not toml", "ocrproxy.toml"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, needle):
    with pytest.raises(config.ConfigError) as info:
        config.load(write(tmp_path, text), env={})
    assert needle in str(info.value)


def test_refuses_open_proxy_on_public_address(tmp_path):
    path = write(tmp_path, '[[upstreams]]\nbase_url = "https://x/v1"\napi_key = "sk-real"\n')
    with pytest.raises(config.ConfigError, match="refusing to listen on 0.0.0.0"):
        config.load(path, env={}, host="0.0.0.0")
    # fine on loopback, with client keys, or in pure relay mode (no upstream key)
    config.load(path, env={}, host="127.0.0.1")
    config.load(path, env={}, host="::1")
    keyed = write(tmp_path, path.read_text() + '[auth]\nkeys = ["ck"]\n')
    config.load(keyed, env={}, host="0.0.0.0")
    relay = write(tmp_path, '[[upstreams]]\nbase_url = "https://x/v1"\n')
    config.load(relay, env={}, host="0.0.0.0")


def test_masked_hides_secrets():
    raw = {
        "auth": {"keys": ["sk-client-0123456789"]},
        "upstreams": [{"base_url": "https://x/v1", "api_key": "sk-upstream-0123456789"}],
    }
    data = config.masked(config.from_mapping(raw, env={}))
    text = repr(data)
    assert "0123456789" not in text
    assert data["upstreams"][0]["base_url"] == "https://x/v1"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ocrproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_check_config_prints_masked_config(tmp_path):
    path = write(
        tmp_path,
        '[[upstreams]]\nbase_url = "https://x/v1"\napi_key = "sk-abcdefghijklmnopqrstuvwxyz"\n',
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert '"base_url": "https://x/v1"' in result.stdout
    assert "sk-abcdefghijklmnopqrstuvwxyz" not in result.stdout


def test_check_config_reports_bad_key(tmp_path):
    result = run_cli("check-config", "--config", str(write(tmp_path, "[ocr]\nmodle = 1\n")))
    assert result.returncode == 2
    assert "modle" in result.stderr


def test_serve_refuses_open_proxy_with_a_reason(tmp_path):
    path = write(tmp_path, '[[upstreams]]\nbase_url = "https://x/v1"\napi_key = "sk-real"\n')
    result = run_cli("serve", "--config", str(path), "--host", "0.0.0.0", "--port", "18999")
    assert result.returncode == 2
    assert "refusing to listen" in result.stderr and "[auth] keys" in result.stderr

"""The edge hardening as shipped: real `ocrproxy serve` behind the shipped nginx site (dot
segments and encoded slashes never reach the upstream), the site's client timeouts, and
`ocrproxy check-config` masking credentials inside URLs."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import chat, require_binary
from tests.fakes import FakeOpenAI
from tests.servers import NGINX_SITE, ROOT, ProxyProcess, free_port, nginx, proxy_toml
from tests.test_hardening_edge import raw_request

KEY = "ck-client-key-0123456789"


@pytest.fixture
async def served(fake: FakeOpenAI, tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    """A real ocrproxy process with client keys and the operator's key for the fake."""
    text = proxy_toml(fake.url, free_port(), auth=f'keys = ["{KEY}"]\n')
    text = text.replace('name = "fake"\n', 'name = "fake"\napi_key = "sk-UPSTREAMSECRET-1"\n')
    proc = ProxyProcess(tmp_path, text)
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


ESCAPES = [
    "/v1/%2e%2e/admin",
    "/v1/%2E%2E/%2E%2E/internal/keys",
    "/v1/.%2e/admin",
    "/v1/models/../../admin",
    "/v1/models/%2e%2e/%2e%2e/admin",
    "/v1/../admin",
    "/v1/../../admin",
    "/v1/%2e%2e%2fadmin",
    "/v1//chat/completions",
    "/v1/./chat/completions",
    "/v1/chat/completions/",
    "/v1/a%5c..%5cadmin",
]


async def test_traversal_through_the_shipped_nginx_site_never_reaches_the_upstream(
    served: ProxyProcess, fake: FakeOpenAI, tmp_path: Path
) -> None:
    binary = require_binary("nginx")
    with nginx(binary, tmp_path / "nginx", [served.port]) as port:
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        body = orjson.dumps(chat("gpt-3.5-turbo", "hi", api_base="http://attacker.example"))
        by_nginx = set()
        for target in ESCAPES:
            for method in ("GET", "POST"):
                status, _, payload = await raw_request(port, method, target, auth, body)
                # nginx refuses a path that climbs above its root itself (its own 400 page);
                # it passes every other one as sent, and ocrproxy refuses it: none reaches
                # the upstream.
                assert status == 400, (target, payload[:200])
                assert b"sk-UPSTREAMSECRET" not in payload
                if b'"invalid_path"' not in payload:
                    assert b"nginx" in payload, (target, payload[:200])
                    by_nginx.add(target)
        # the review's three probes went through nginx to ocrproxy, which refused them
        assert not by_nginx & {"/v1/%2e%2e/admin", "/v1/models/../../admin", "/v1/../admin"}
        assert by_nginx <= {"/v1/../../admin", "/v1/%2E%2E/%2E%2E/internal/keys"}, by_nginx
        assert fake.received == []
        status, _, payload = await raw_request(port, "GET", "/v1/models", auth)
        assert status == 200 and b"gpt-3.5-turbo-ocr" in payload
    assert [r.path for r in fake.received] == ["/v1/models"]


def test_the_shipped_site_sets_client_timeouts(tmp_path: Path) -> None:
    site = NGINX_SITE.read_text()
    pattern = r"^\s*(client_header_timeout|client_body_timeout|send_timeout) (\d+)s;"
    found = {name: int(value) for name, value in re.findall(pattern, site, re.M)}
    assert found == {"client_header_timeout": 10, "client_body_timeout": 60, "send_timeout": 300}
    # `proxy_pass` without a URI: nginx passes the raw request line, which ocrproxy judges
    assert re.search(r"^\s*proxy_pass http://ocrproxy;$", site, re.M)
    with nginx(require_binary("nginx"), tmp_path / "nginx", [free_port()]):
        pass  # `nginx -t` accepted the site, and nginx started with it


def test_check_config_masks_credentials_inside_urls(tmp_path: Path) -> None:
    path = tmp_path / "ocrproxy.toml"
    path.write_text(
        "[[upstreams]]\n"
        'name = "gw"\n'
        'base_url = "https://gwuser:s3cretpass@gw.example/v1?token=abc123&api-version=2024"\n'
        'api_key = "sk-upstream-0123456789"\n'
        'headers = { "api-key" = "azure-key-0123456789" }\n'
        "[[upstreams]]\n"
        'name = "bare"\n'
        'base_url = "https://tokenonly9876@other.example/v1"\n'
        "[cache]\n"
        'redis_url = "redis://cacheuser:redispass42@redis.example:6379/0"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "ocrproxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for secret in (
        "s3cretpass",
        "abc123",
        "2024",
        "tokenonly9876",
        "redispass42",
        "0123456789",
        "sk-upstream",
        "azure-key",
    ):
        assert secret not in result.stdout, secret
    shown = orjson.loads(result.stdout)
    assert shown["upstreams"][0]["base_url"] == (
        "https://gwuser:****@gw.example/v1?token=****&api-version=****"
    )
    assert shown["upstreams"][1]["base_url"] == "https://****@other.example/v1"
    assert shown["cache"]["redis_url"] == "redis://cacheuser:****@redis.example:6379/0"

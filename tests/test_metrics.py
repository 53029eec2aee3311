"""/metrics, /readyz and the operator-endpoint restrictions, against the fake upstream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ocrproxy.metrics import FLUSH_S, Metrics, create_metrics_app
from tests.conftest import ProxyFactory, chat
from tests.fakes import FakeOpenAI, data_url, image_part
from tests.servers import free_port


async def scrape(client: TestClient[Any, Any], path: str = "/metrics") -> dict[str, float]:
    """Samples as ``name{label="v",...}`` -> value, labels sorted."""
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def ocr_request(label: str, **extra: Any) -> dict[str, Any]:
    return chat("gpt-3.5-turbo-ocr", "what is it?", image_part(data_url(label)), **extra)


async def test_requests_ocr_calls_and_cache_lookups_are_counted(
    proxy: TestClient[Any, Any], fake: FakeOpenAI
) -> None:
    fake.ocr_fail = {"broken"}
    for label in ("cat", "cat", "broken"):
        resp = await proxy.post("/v1/chat/completions", json=ocr_request(label))
        assert resp.status == 200
    m = await scrape(proxy)
    assert m['ocrproxy_requests_total{route="/v1/chat/completions",status="200"}'] == 3
    assert m['ocrproxy_request_duration_seconds_count{route="/v1/chat/completions"}'] == 3
    assert m['ocrproxy_ocr_calls_total{model="vision-1",outcome="ok"}'] == 1
    assert m['ocrproxy_ocr_calls_total{model="vision-1",outcome="error"}'] == 1
    assert m['ocrproxy_ocr_duration_seconds_count{model="vision-1"}'] == 2
    assert m['ocrproxy_cache_lookups_total{result="hit",tier="memory"}'] == 1
    assert m['ocrproxy_cache_lookups_total{result="miss",tier="memory"}'] == 2
    assert m['ocrproxy_upstream_ttfb_seconds_count{upstream="fake"}'] == 3
    assert m["ocrproxy_requests_in_flight{}"] == 1  # the scrape itself


async def test_sqlite_tier_lookups_are_counted(
    make_proxy: ProxyFactory, fake: FakeOpenAI, tmp_path: Path
) -> None:
    settings = {"backend": "sqlite", "path": str(tmp_path / "c.sqlite3")}
    first = await make_proxy(cache=settings)
    assert (await first.post("/v1/chat/completions", json=ocr_request("x"))).status == 200
    await first.close()
    second = await make_proxy(cache=settings)
    assert (await second.post("/v1/chat/completions", json=ocr_request("x"))).status == 200
    m = await scrape(second)
    assert m['ocrproxy_cache_lookups_total{result="hit",tier="sqlite"}'] == 1
    assert m['ocrproxy_cache_lookups_total{result="miss",tier="memory"}'] == 1
    assert 'ocrproxy_ocr_calls_total{model="vision-1",outcome="ok"}' not in m


async def test_upstream_errors_by_upstream(make_proxy: ProxyFactory, fake: FakeOpenAI) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    proxy = await make_proxy(
        upstreams=[
            {"name": "fake", "base_url": fake.url, "models": ["fail-*", "vision-*"]},
            {"name": "dead", "base_url": dead, "models": ["*"], "connect_timeout_s": 1},
        ]
    )
    resp = await proxy.post("/v1/chat/completions", json=chat("fail-500", "hi"))
    assert resp.status == 500
    resp = await proxy.post("/v1/chat/completions", json=chat("gpt-x", "hi"))
    assert resp.status == 502
    m = await scrape(proxy)
    assert m['ocrproxy_upstream_errors_total{kind="http_5xx",upstream="fake"}'] == 1
    assert m['ocrproxy_upstream_errors_total{kind="unreachable",upstream="dead"}'] == 1
    assert m['ocrproxy_requests_total{route="/v1/chat/completions",status="502"}'] == 1


async def test_open_streams_are_a_gauge(proxy: TestClient[Any, Any], fake: FakeOpenAI) -> None:
    resp = await proxy.post("/v1/chat/completions", json=chat("slow-stream", "hi", stream=True))
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")
    m = await scrape(proxy)
    assert m["ocrproxy_streams_in_flight{}"] == 1
    assert m["ocrproxy_requests_in_flight{}"] == 2
    resp.close()
    for _ in range(100):
        m = await scrape(proxy)
        if m["ocrproxy_streams_in_flight{}"] == 0:
            break
        await asyncio.sleep(0.02)
    assert m["ocrproxy_streams_in_flight{}"] == 0
    assert m['ocrproxy_requests_total{route="/v1/chat/completions",status="499"}'] == 1


async def test_operator_endpoints_refuse_forwarded_requests(proxy: TestClient[Any, Any]) -> None:
    for path in ("/metrics", "/readyz"):
        resp = await proxy.get(path, headers={"X-Forwarded-For": "203.0.113.9"})
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    resp = await proxy.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {
        "status": "ready",
        "cache": {"backend": "memory", "reachable": True},
    }


async def test_metrics_port_serves_operator_endpoints_apart(
    make_proxy: ProxyFactory, aiohttp_client: Any
) -> None:
    proxy = await make_proxy(server={"metrics_port": free_port()})
    for path in ("/metrics", "/readyz"):
        assert (await proxy.get(path)).status == 404
    assert (await proxy.get("/healthz")).status == 200
    side: TestClient[Any, Any] = await aiohttp_client(create_metrics_app(proxy.server.app))
    resp = await side.get("/readyz", headers={"X-Forwarded-For": "203.0.113.9"})
    assert resp.status == 200  # the separate port is not behind nginx: no guard there
    m = await scrape(side)
    assert m['ocrproxy_requests_total{route="/healthz",status="200"}'] == 1
    assert m['ocrproxy_requests_total{route="unmatched",status="404"}'] == 2


def test_counts_applied_in_bulk_read_as_one_observe_per_sample() -> None:
    # Latencies on, between and beyond the bucket bounds (0.01 and 600 are bounds).
    samples = [0.0, 0.004, 0.01, 0.0100001, 0.3, 2.5, 599.9, 600, 600.1, 10_000]
    bulk, direct = Metrics(), Metrics()
    for seconds in samples:
        bulk._observe(bulk.latency, seconds, "/v1/x")
        bulk._add(bulk.requests, "/v1/x", "200")
        direct.latency.labels("/v1/x").observe(seconds)
        direct.requests.labels("/v1/x", "200").inc()

    def samples_of(metrics: Metrics) -> dict[str, float]:
        out = {}
        for family in text_string_to_metric_families(metrics.render().decode()):
            for s in family.samples:
                if not s.name.endswith("_created"):  # when the series was made: differs
                    out[f"{s.name}{sorted(s.labels.items())}"] = s.value
        return out

    got = samples_of(bulk)
    assert got == samples_of(direct)
    assert got["ocrproxy_request_duration_seconds_count[('route', '/v1/x')]"] == 10
    assert got["ocrproxy_request_duration_seconds_bucket[('le', '0.01'), ('route', '/v1/x')]"] == 3


async def test_counts_reach_the_collectors_within_a_second_without_a_scrape() -> None:
    metrics = Metrics()
    metrics._add(metrics.requests, "/v1/x", "200")
    metrics.started()
    child = metrics.requests.labels("/v1/x", "200")
    assert child._value.get() == 0  # pending
    await asyncio.sleep(FLUSH_S + 0.2)
    assert child._value.get() == 1
    assert metrics.in_flight._value.get() == 1

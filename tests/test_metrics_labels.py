"""/metrics label values are bounded: a client-chosen ocr_model never becomes a label."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ProxyFactory, chat
from tests.fakes import FakeOpenAI, data_url, image_part


async def test_client_chosen_ocr_model_names_do_not_become_metric_labels(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    """Guards against this: `ocr_model` is the client's string; with the default upstream (`models = ["*"]`) every
    string routes, and Metrics.ocr_call() labels two collectors with it. Each new name is a
    new time series that lives until restart: one client can grow the proxy's memory and every
    scrape without bound (or fill the label with whatever it likes)."""
    proxy: TestClient[Any, Any] = await make_proxy()
    for i in range(60):
        body = chat("gpt-3.5-turbo", "hi", image_part(data_url(f"img{i}")))
        body["ocr_model"] = f"vision-{i:04d}-client-chosen"
        resp = await proxy.post("/v1/chat/completions", json=body)
        assert resp.status == 200
    resp = await proxy.get("/metrics")
    models = {
        s.labels["model"]
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
        if "model" in s.labels
    }
    assert len(models) <= 10, f"{len(models)} distinct `model` label values after 60 requests"

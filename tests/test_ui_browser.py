"""The live page in a real browser: Debian's headless Chromium, driven by playwright, against the
proxy served on a real loopback port. Screenshots are saved in the test's tmp dir."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from ocrproxy.app import create_app
from tests.conftest import chat, make_config, missing
from tests.fakes import FakeOpenAI, data_url, image_part

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ADMIN = "ui-admin-key-0123456789"
VIEWPORT = {"width": 1000, "height": 600}


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:  # pragma: no cover
        missing("playwright is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def served(aiohttp_server: Any, fake: FakeOpenAI) -> str:
    cfg = make_config(
        fake,
        ui={"enabled": True, "admin_key": ADMIN, "show_descriptions": True},
        auth={"keys": ["client-key-abcdef123456"]},
    )
    server: TestServer = await aiohttp_server(create_app(cfg))
    return str(server.make_url("")).rstrip("/")


async def send(base: str, rid: str, label: str) -> None:
    """An OCR chat request, from a plain HTTP client (not the browser)."""
    body = chat("gpt-3.5-turbo-ocr", "what is it?", image_part(data_url(label)))
    headers = {"Authorization": "Bearer client-key-abcdef123456", "X-Request-Id": rid}
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()


def expect(locator: Any) -> Any:
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(locator)


async def test_log_in_watch_rows_arrive_and_open_a_timeline(
    browser: Any, served: str, fake: FakeOpenAI, tmp_path: Path
) -> None:
    page = await browser.new_page(viewport=VIEWPORT)
    problems: list[str] = []  # script errors and CSP violations show up here
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

    await page.goto(served + "/ui")
    await page.fill("#key", "not-the-admin-key")
    await page.click("#login-form button")
    await expect(page.locator("#login-error")).to_have_text("Wrong admin key.")
    assert await page.is_hidden("#main")
    problems = [p for p in problems if "401" not in p]  # the refused call, as Chromium logs it
    await page.screenshot(path=tmp_path / "login.png")

    await page.fill("#key", ADMIN)
    await page.click("#login-form button")
    await page.wait_for_selector("#status.live")  # the feed is open
    assert await page.is_visible("#main") and await page.is_hidden("#login")

    await send(served, "browser-first", "cat")
    await send(served, "browser-again", "cat")  # a cached repeat
    await page.wait_for_selector('tr[data-id="browser-first"]')
    await page.wait_for_selector('tr[data-id="browser-again"]')
    first = await page.inner_text('tr[data-id="browser-first"]')
    again = await page.inner_text('tr[data-id="browser-again"]')
    assert "gpt-3.5-turbo-ocr → gpt-3.5-turbo" in first and "vision-1" in first
    assert "1 / 0 / 0" in first and "100 + 20" in first  # images / hits / failures, tokens
    assert "1 / 1 / 0" in again and "100 + 20" not in again
    ids = await page.eval_on_selector_all("#rows tr", "rows => rows.map(r => r.dataset.id)")
    assert ids == ["browser-again", "browser-first"]  # newest first, no reload
    # (expect polls without eval: the page's CSP forbids it, wait_for_function would need it)
    await expect(page.locator("#t-requests")).to_have_text("2")
    assert await page.text_content("#t-ocr") == "1"
    cache = await page.inner_text("#t-cache")
    assert "memory" in cache and "50% of 2" in cache
    assert "vision-1" in await page.inner_text("#t-tokens")
    assert await page.locator("#t-spark svg rect.bar:not(.empty)").count() >= 1
    await page.screenshot(path=tmp_path / "rows.png")

    await page.click('tr[data-id="browser-first"]')
    await page.wait_for_selector("#detail:not([hidden])")
    assert await page.text_content("#d-id") == "browser-first"
    kinds = await page.eval_on_selector_all(
        "#timeline li .kind", "nodes => nodes.map(n => n.textContent)"
    )
    assert kinds == [
        "scan: images found",
        "cache lookup",
        "OCR attempt",
        "OCR call",
        "image became",
        "upstream (TTFB)",
        "end",
    ]
    timeline = await page.inner_text("#timeline")
    assert "memory miss" in timeline and "vision-1 for " in timeline and ": ok in" in timeline
    assert await page.text_content("#timeline pre.description") == "A picture showing cat."
    await page.screenshot(path=tmp_path / "timeline.png", full_page=True)

    await page.click('tr[data-id="browser-again"]')
    await expect(page.locator("#d-id")).to_have_text("browser-again")
    timeline = await page.inner_text("#timeline")
    assert "memory hit" in timeline and "OCR call" not in timeline
    assert await page.text_content("#timeline pre.description") == "A picture showing cat."

    # The key stays in this tab's sessionStorage: a reload stays signed in, with the rows.
    await page.reload()
    await page.wait_for_selector('tr[data-id="browser-first"]')
    assert ADMIN not in await page.content()  # never written into the page
    await page.click("#logout")
    assert await page.is_visible("#login")
    assert await page.evaluate("sessionStorage.length") == 0
    assert fake.ocr_calls == ["cat"]
    assert problems == []

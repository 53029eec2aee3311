"""The live page's API (``ocrproxy.ui``, ``ocrproxy.timeline``): who may see it, what it
records, its feed, one request's timeline, the totals, and that nothing secret leaves it."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from ocrproxy import config, current, server, timeline, ui
from ocrproxy.metrics import create_metrics_app
from ocrproxy.state import CONFIG, Trace
from tests.conftest import ProxyFactory, chat, free_port, require_binary
from tests.fakes import FakeOpenAI, data_url, image_part, png
from tests.servers import ProxyProcess, nginx, proxy_toml

ADMIN = "ui-admin-key-0123456789"
CLIENT = "client-key-abcdef123456"
UPSTREAM = "sk-upstream-secret"  # conftest's make_config
ON = {"enabled": True, "admin_key": ADMIN}
BEARER = {"Authorization": f"Bearer {ADMIN}"}
UI_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def ocr_chat(label: str) -> dict[str, Any]:
    return chat("gpt-3.5-turbo-ocr", "what is it?", image_part(data_url(label)))


async def get_json(proxy: TestClient[Any, Any], path: str) -> Any:
    resp = await proxy.get(path, headers=BEARER)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def post(proxy: TestClient[Any, Any], body: dict[str, Any], rid: str, **headers: str) -> None:
    resp = await proxy.post(
        "/v1/chat/completions", json=body, headers={"X-Request-Id": rid, **headers}
    )
    assert resp.status == 200, await resp.text()
    await resp.read()


def kinds(steps: list[dict[str, Any]]) -> list[str]:
    return [
        s["kind"] if s["kind"] != "cache" else f"cache {s['tier']} {s['result']}" for s in steps
    ]


async def test_off_by_default_every_ui_path_is_a_404(proxy: TestClient[Any, Any]) -> None:
    for path in ("/ui", "/ui/app.js", "/ui/recent", "/ui/events", "/ui/totals", "/ui/requests/x"):
        resp = await proxy.get(path, headers=BEARER)
        assert resp.status == 404, path


async def test_the_admin_key_and_only_it_opens_the_data(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ui=ON, auth={"keys": [CLIENT]})
    for path in ("/ui/recent", "/ui/totals", "/ui/events", "/ui/requests/nope"):
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key"},
            {"Authorization": f"Bearer {CLIENT}"},  # a client key is not the admin's
            {"x-api-key": ADMIN},  # the admin key is read from Authorization only
            {"Authorization": ADMIN},  # without the Bearer scheme
        ):
            resp = await proxy.get(path, headers=headers)
            assert resp.status == 401, (path, headers)
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
            for name, value in UI_HEADERS.items():
                assert resp.headers[name] == value
    assert (await proxy.get("/ui/recent", headers=BEARER)).status == 200
    assert (await proxy.get("/ui/totals", headers=BEARER)).status == 200
    resp = await proxy.get("/ui/requests/nope", headers=BEARER)
    assert resp.status == 404  # the key is right, the request unknown
    # The admin key is no client key either.
    resp = await proxy.get("/v1/models", headers=BEARER)
    assert resp.status == 401


async def test_the_page_and_its_files_need_no_key_and_forbid_inline_code(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(ui=ON)
    for path, kind in (
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ):
        resp = await proxy.get(path)
        assert resp.status == 200, path
        assert resp.content_type == kind
        for name, value in UI_HEADERS.items():
            assert resp.headers[name] == value
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    page = await (await proxy.get("/ui")).text()
    assert '<script src="/ui/app.js"' in page and "<style" not in page
    assert "<script>" not in page and " style=" not in page  # nothing inline for CSP to allow
    assert "http://" not in page and "https://" not in page  # no CDN: it works offline


async def test_refused_through_a_reverse_proxy_like_metrics(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ui=ON)
    for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
        for path in ("/ui", "/ui/recent", "/ui/events"):
            resp = await proxy.get(path, headers={**BEARER, header: "203.0.113.9"})
            assert resp.status == 404, (header, path)


async def test_another_host_name_is_refused(make_proxy: ProxyFactory) -> None:
    """A page elsewhere whose name now points at 127.0.0.1 (DNS rebinding) gets nothing."""
    proxy = await make_proxy(ui=ON)
    for path in ("/ui", "/ui/recent"):
        resp = await proxy.get(path, headers={**BEARER, "Host": "evil.example:8080"})
        assert resp.status == 404, path
        for host in ("localhost:8080", "127.0.0.1", "[::1]:9464"):
            resp = await proxy.get(path, headers={**BEARER, "Host": host})
            assert resp.status == 200, (path, host)


def test_a_short_or_spaced_admin_key_is_refused() -> None:
    for key in ("short-key", "sixteen chars ok!", "ключ-администратора-0123"):
        raw = {"upstreams": [{"base_url": "http://127.0.0.1:1/v1"}], "ui": {**ON, "admin_key": key}}
        with pytest.raises(config.ConfigError, match="at least 16 printable ASCII"):
            config.from_mapping(raw, env={})


def test_a_secret_is_masked_also_as_json_spells_it() -> None:
    secret = 'sk-a\\b"c-0123456789'
    encoded = orjson.dumps({"model": secret + "-ocr"})
    masked = ui._masked(encoded, (secret.encode(),))
    assert orjson.dumps(secret)[1:-1] not in masked and b"sk-a" not in masked


async def test_with_a_metrics_port_the_page_is_served_there_only(
    make_proxy: ProxyFactory, aiohttp_client: Any
) -> None:
    proxy = await make_proxy(ui=ON, server={"metrics_port": free_port()})
    assert (await proxy.get("/ui")).status == 404
    assert (await proxy.get("/ui/recent", headers=BEARER)).status == 404
    await post(proxy, chat("gpt-3.5-turbo", "hi"), "via-main-port")
    side: TestClient[Any, Any] = await aiohttp_client(create_metrics_app(proxy.server.app))
    assert (await side.get("/ui")).status == 200
    resp = await side.get("/ui/recent")
    assert resp.status == 401  # the operator port still asks for the key
    assert resp.headers["Cache-Control"] == "no-store"
    rows = (await get_json(side, "/ui/recent"))["rows"]
    assert [r["request_id"] for r in rows] == ["via-main-port"]


@pytest.mark.parametrize(
    ("ui", "auth", "message"),
    [
        ({"enabled": True}, {}, "`$.ui.enabled` needs `$.ui.admin_key`"),
        (ON, {"keys": [CLIENT, ADMIN]}, "`$.ui.admin_key` must differ from every `$.auth.keys`"),
        (
            {"enabled": True, "admin_key": UPSTREAM},
            {},
            "`$.ui.admin_key` must differ from `$.upstreams[0].api_key`",
        ),
        ({**ON, "recent": 0}, {}, "`$.ui.recent` must be at least 1"),
        ({**ON, "admin_key": "a\nb"}, {}, "`$.ui.admin_key` must not contain control"),
    ],
)
def test_config_validation(
    fake: FakeOpenAI, ui: dict[str, Any], auth: dict[str, Any], message: str
) -> None:
    raw = {
        "upstreams": [{"base_url": "http://127.0.0.1:1/v1", "api_key": UPSTREAM}],
        "auth": auth,
        "ui": ui,
    }
    with pytest.raises(config.ConfigError) as caught:
        config.from_mapping(raw, env={})
    assert message in str(caught.value)
    assert ADMIN not in str(caught.value) and UPSTREAM not in str(caught.value)


def test_config_defaults_and_the_admin_key_is_a_secret() -> None:
    cfg = config.from_mapping({"upstreams": [{"base_url": "http://127.0.0.1:1/v1"}]}, env={})
    assert cfg.ui == config.Ui(enabled=False, admin_key="", recent=200, show_descriptions=False)
    upstreams = [{"base_url": "http://127.0.0.1:1/v1", "api_key": UPSTREAM}]
    cfg = config.from_mapping({"upstreams": upstreams, "ui": ON}, env={})
    assert ADMIN in config.secrets(cfg)  # masked in the page's answers, never logged
    # Relayed traffic is not searched for it (no client or upstream is ever given it); it is
    # for the upstream's key.
    assert config.secrets(cfg, admin=False) == (UPSTREAM,)
    assert ADMIN not in orjson.dumps(config.masked(cfg)).decode()


async def test_the_ring_keeps_the_last_recent_requests(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ui={**ON, "recent": 3})
    for i in range(5):
        await post(proxy, chat("gpt-3.5-turbo", "hi"), f"ring-{i}")
    for _ in range(3):  # the page's own calls and probes are not recorded
        await get_json(proxy, "/ui/totals")
        assert (await proxy.get("/healthz")).status == 200
    rows = (await get_json(proxy, "/ui/recent"))["rows"]
    assert [r["request_id"] for r in rows] == ["ring-2", "ring-3", "ring-4"]
    assert (await get_json(proxy, "/ui/totals"))["requests"] == 5  # totals count every one
    row = rows[-1]
    assert row["dialect"] == "chat" and row["route"] == "/v1/chat/completions"
    assert row["model"] == row["real_model"] == "gpt-3.5-turbo"
    assert row["status"] == 200 and row["upstream"] == "fake"
    assert row["ttfb_ms"] is not None and row["total_ms"] >= row["ttfb_ms"]
    assert (await proxy.get("/ui/requests/ring-0", headers=BEARER)).status == 404  # pushed out


async def test_a_reload_keeps_the_ring_and_the_totals(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ui={**ON, "recent": 2})
    for i in range(3):
        await post(proxy, chat("gpt-3.5-turbo", "hi"), f"before-{i}")
    old = server.Generation(proxy.server.app[CONFIG])
    old.app = proxy.server.app  # the running one, as if it were a generation
    cfg = config.from_mapping(
        {"upstreams": [{"base_url": "http://127.0.0.1:1/v1"}], "ui": {**ON, "recent": 5}},
        env={},
    )
    new = server.Generation(cfg, old)
    recorder = new.app[timeline.RECORDER]
    assert [trace.request_id for trace in recorder.rows] == ["before-1", "before-2"]
    assert recorder.rows.maxlen == 5
    assert recorder.totals.requests == 3


async def test_a_reload_that_hides_descriptions_drops_the_kept_ones(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(ui={**ON, "show_descriptions": True})
    await post(proxy, ocr_chat("private"), "seen")
    old = server.Generation(proxy.server.app[CONFIG])
    old.app = proxy.server.app
    cfg = config.from_mapping({"upstreams": [{"base_url": "http://127.0.0.1:1/v1"}], "ui": ON}, {})
    recorder = server.Generation(cfg, old).app[timeline.RECORDER]
    found = recorder.find("seen")
    assert found is not None and "image" in kinds(timeline.steps(found))
    assert b"A picture showing private" not in orjson.dumps(timeline.steps(found))


def test_an_ocr_call_that_outlives_its_request_still_counts() -> None:
    """A shared OCR flight runs in the context of the request that started it; when that
    request has finished, its call counts in the totals, and its timeline stays as it ended."""
    recorder = timeline.Recorder(config.Ui(enabled=True, admin_key=ADMIN))

    async def request() -> contextvars.Context:
        trace = Trace("r1")
        current.request.set(trace)  # as the middleware does
        recording = recorder.begin(Dummy(), trace)  # type: ignore[arg-type]
        timeline.step("scan", images=1)
        flight = contextvars.copy_context()  # as a task created now would get it
        recorder.finish(trace, recording, 200)
        return flight

    flight = asyncio.run(request())
    flight.run(timeline.step, "ocr", model="m", ok=True, took_ms=5.0, input_tokens=3)
    assert recorder.totals.ocr_calls == 1 and recorder.totals.tokens["other"]["input"] == 3
    assert [s["kind"] for s in timeline.steps(recorder.rows[0])] == ["scan", "end"]


def test_requests_are_counted_per_minute_of_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = timeline.Recorder(config.Ui(enabled=True, admin_key=ADMIN))
    for wall, status in ((60.0, 200), (119.9, 404), (120.0, 200), (305.5, 502)):
        monkeypatch.setattr(timeline.time, "time", lambda wall=wall: wall)
        trace = Trace("r")
        recorder.finish(trace, recorder.begin(Dummy(), trace), status)  # type: ignore[arg-type]
    totals = recorder.totals.as_dict()
    assert totals["per_minute"] == [[1, 2, 0], [2, 1, 0], [5, 1, 0]]
    assert totals["statuses"] == {"2xx": 2, "4xx": 1, "5xx": 1}
    assert [timeline.row(t)["status"] for t in recorder.rows] == [200, 404, 200, 502]


def begun(recorder: timeline.Recorder, request_id: str) -> tuple[Trace, timeline.Timeline]:
    """A request begun on ``recorder``, its trace the one being served, as the middleware does
    (call inside ``contextvars.copy_context().run``)."""
    trace = Trace(request_id)
    current.request.set(trace)
    return trace, recorder.begin(Dummy(), trace)  # type: ignore[arg-type]


def described(trace: Trace) -> list[str | None]:
    return [s.get("description") for s in timeline.steps(trace) if s["kind"] == "image"]


def test_a_reload_hands_the_ring_and_the_kept_descriptions_on() -> None:
    """Requests the old generation still serves at a reload finish into the one ring and keep
    their descriptions in the one account; a reload that hides descriptions drops them all,
    in flight too; the requests a recorder had recorded point to the one that took over."""
    shown = config.Ui(enabled=True, admin_key=ADMIN, show_descriptions=True)
    old = timeline.Recorder(shown)

    def request(recorder: timeline.Recorder, rid: str, text: str, end: bool = True) -> Any:
        trace, recording = begun(recorder, rid)
        timeline.image(1, b"\x01" * 32, text, None)
        if end:
            recorder.finish(trace, recording, 200)
        return trace, recording

    contextvars.copy_context().run(request, old, "done", "first text")
    flight = contextvars.copy_context()
    in_flight, recording = flight.run(request, old, "in-flight", "second text", end=False)
    new = timeline.Recorder(shown)
    new.adopt(old)
    old.finish(in_flight, recording, 200)  # the old app's middleware ends it
    assert [t.request_id for t in new.rows] == ["done", "in-flight"]
    assert new.kept.chars == len("first text") + len("second text") and len(new.kept.steps) == 2
    assert new.rows[0].timeline is not None and new.rows[0].timeline.recorder is new

    flight = contextvars.copy_context()
    late, late_recording = flight.run(begun, new, "late")
    hidden = timeline.Recorder(config.Ui(enabled=True, admin_key=ADMIN))
    hidden.adopt(new)
    flight.run(timeline.image, 1, b"\x02" * 32, "third text", None)
    new.finish(late, late_recording, 200)
    assert [described(t) for t in hidden.rows] == [[None], [None], [None]]
    assert hidden.kept.chars == 0 and not hidden.kept.steps
    assert all(
        t.timeline is not None and t.timeline.recorder is hidden for t in list(hidden.rows)[:2]
    )


def test_late_ocr_calls_count_in_the_minute_they_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = timeline.Recorder(config.Ui(enabled=True, admin_key=ADMIN))
    monkeypatch.setattr(time, "time", lambda: 120.0)

    def request() -> contextvars.Context:
        trace, recording = begun(recorder, "r")
        timeline.step("ocr", model="m", ok=True, took_ms=5.0)
        recorder.finish(trace, recording, 200)
        return contextvars.copy_context()

    flight = contextvars.copy_context().run(request)
    monkeypatch.setattr(time, "time", lambda: 420.0)  # five minutes later the flight ends
    flight.run(timeline.step, "ocr", model="m", ok=True, took_ms=5.0)
    assert recorder.totals.as_dict()["per_minute"] == [[2, 1, 1], [7, 0, 1]]
    assert recorder.totals.ocr_calls == 2


class Dummy:
    method = "POST"
    path = "/v1/chat/completions"


async def read_event(resp: Any) -> dict[str, Any]:
    """The next ``data:`` event of a feed (comments skipped)."""
    async with asyncio.timeout(10):
        while True:
            line = await resp.content.readline()
            assert line, "the feed ended"
            if line.startswith(b"data: "):
                assert await resp.content.readline() == b"\n"
                event: dict[str, Any] = orjson.loads(line[6:])
                return event


async def test_the_feed_delivers_each_new_row(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ui=ON)
    feed = await proxy.get("/ui/events", headers=BEARER)
    assert feed.status == 200
    assert feed.content_type == "text/event-stream"
    assert feed.headers["Cache-Control"] == "no-store"
    assert (await feed.content.readline()).startswith(b": worker ")  # sent at once
    await post(proxy, ocr_chat("cat"), "fed-1")
    row = await read_event(feed)
    assert row["request_id"] == "fed-1"
    assert row["model"] == "gpt-3.5-turbo-ocr" and row["real_model"] == "gpt-3.5-turbo"
    assert row["ocr_model"] == "vision-1"
    assert (row["images"], row["cache_hits"], row["failures"]) == (1, 0, 0)
    assert row["ocr_tokens"] == {"input": 100, "output": 20}
    await post(proxy, ocr_chat("cat"), "fed-2")
    row = await read_event(feed)
    assert row["request_id"] == "fed-2" and row["cache_hits"] == 1
    assert row["ocr_tokens"] == {"input": 0, "output": 0}  # a cache hit costs nothing
    feed.close()


async def test_a_request_timeline_in_order_and_a_cached_repeat(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(ui=ON)
    await post(proxy, ocr_chat("cat"), "first")
    await post(proxy, ocr_chat("cat"), "again")
    first = await get_json(proxy, "/ui/requests/first")
    assert first["row"]["request_id"] == "first"
    assert kinds(first["steps"]) == [
        "scan",
        "cache memory miss",
        "ocr_attempt",
        "ocr",
        "image",
        "upstream",
        "end",
    ]
    steps = {s["kind"]: s for s in first["steps"]}
    assert steps["scan"]["images"] == 1
    assert steps["ocr_attempt"] == {**steps["ocr_attempt"], "attempt": 1, "status": 200}
    ocr = steps["ocr"]
    assert ocr["model"] == "vision-1" and ocr["ok"] is True
    assert ocr["image"] == steps["image"]["image"]  # the image's digest, shortened
    assert (ocr["input_tokens"], ocr["output_tokens"]) == (100, 20)
    assert steps["upstream"]["upstream"] == "fake" and steps["upstream"]["status"] == 200
    assert steps["image"]["ok"] is True and steps["image"]["number"] == 1
    assert "description" not in steps["image"]  # show_descriptions is off
    assert steps["end"]["status"] == 200
    at = [s["at_ms"] for s in first["steps"]]
    assert at == sorted(at)
    again = await get_json(proxy, "/ui/requests/again")
    assert kinds(again["steps"]) == ["scan", "cache memory hit", "image", "upstream", "end"]
    assert fake.ocr_calls == ["cat"]
    blob = orjson.dumps([first, again])
    assert b"A picture showing" not in blob  # no description anywhere without the setting


async def test_descriptions_are_shown_with_show_descriptions(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ui={**ON, "show_descriptions": True})
    body = chat(
        "gpt-3.5-turbo-ocr", "two?", image_part(data_url("cat")), image_part(data_url("dog"))
    )
    await post(proxy, body, "two")
    steps = (await get_json(proxy, "/ui/requests/two"))["steps"]
    described = {s["number"]: s["description"] for s in steps if s["kind"] == "image"}
    assert described == {1: "A picture showing cat.", 2: "A picture showing dog."}
    assert sum(1 for s in steps if s["kind"] == "ocr") == 2


async def test_only_the_newest_descriptions_are_kept(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However long the ring and however many images, the descriptions kept are bounded: the
    oldest are dropped first, and their steps say so."""
    text = len("A picture showing cat.")
    monkeypatch.setattr(timeline, "DESCRIPTION_CHARS", 2 * text + 1)
    proxy = await make_proxy(ui={**ON, "show_descriptions": True})
    for label in ("cat", "dog", "owl"):  # each description as long as the first
        await post(proxy, ocr_chat(label), label)
    kept = {}
    for label in ("cat", "dog", "owl"):
        image = next(
            s
            for s in (await get_json(proxy, f"/ui/requests/{label}"))["steps"]
            if s["kind"] == "image"
        )
        kept[label] = "dropped" if image.get("description_dropped") else image["description"]
    assert kept == {
        "cat": "dropped",
        "dog": "A picture showing dog.",
        "owl": "A picture showing owl.",
    }
    kept = proxy.server.app[timeline.RECORDER].kept
    assert kept.chars == 2 * text and len(kept.steps) == 2
    monkeypatch.setattr(timeline, "DESCRIPTION_STEPS", 1)  # the count bounds them too
    await post(proxy, ocr_chat("cat"), "cat-again")  # a cache hit: its description is kept too
    assert len(kept.steps) == 1 and kept.chars == text
    steps = (await get_json(proxy, "/ui/requests/cat-again"))["steps"]
    assert next(s for s in steps if s["kind"] == "image")["description"] == "A picture showing cat."


async def test_fetch_retries_and_failures_on_the_timeline_and_in_the_totals(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(ui=ON, ocr={"retries": 1, "retry_backoff_s": 0.01})
    fake.ocr_flaky = {"flaky": [503]}
    fake.ocr_fail = {"broken"}
    await post(proxy, ocr_chat("flaky"), "flaky")
    await post(proxy, ocr_chat("broken"), "broken")
    await post(proxy, ocr_chat("flaky"), "hit")
    steps = (await get_json(proxy, "/ui/requests/flaky"))["steps"]
    attempts = [(s["attempt"], s["status"]) for s in steps if s["kind"] == "ocr_attempt"]
    assert attempts == [(1, 503), (2, 200)]
    steps = (await get_json(proxy, "/ui/requests/broken"))["steps"]
    image = next(s for s in steps if s["kind"] == "image")
    assert image["ok"] is False and image["reason"] == "OCR_FAILED"
    ocr = next(s for s in steps if s["kind"] == "ocr")
    assert ocr["ok"] is False and ocr["reason"] == "OCR_FAILED"
    totals = await get_json(proxy, "/ui/totals")
    assert totals["requests"] == 3
    assert totals["statuses"] == {"2xx": 3}
    assert (totals["ocr_calls"], totals["ocr_errors"]) == (2, 1)
    assert totals["cache"]["memory"] == {"miss": 2, "hit": 1}
    assert totals["cache_hit_ratio"]["memory"] == pytest.approx(1 / 3)
    assert totals["ocr_tokens"] == {"vision-1": {"input": 100, "output": 20}}
    assert totals["failures"] == {"OCR_FAILED": 1}
    assert totals["ocr_ms"]["sample"] == 1 and totals["ocr_ms"]["p50"] is not None
    assert totals["ocr_ms"]["p95"] >= totals["ocr_ms"]["p50"]
    assert sum(m[1] for m in totals["per_minute"]) == 3
    assert sum(m[2] for m in totals["per_minute"]) == 2


async def test_no_secret_and_no_image_bytes_in_any_answer_or_event(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(ui={**ON, "show_descriptions": True}, auth={"keys": [CLIENT]})
    client = {"Authorization": f"Bearer {CLIENT}"}
    feed = await proxy.get("/ui/events", headers=BEARER)
    picture = data_url("secret-picture", 3000)
    # A client may type any secret into what it controls: the model, the request id.
    await post(
        proxy,
        chat(f"{UPSTREAM}-ocr", "what?", image_part(picture)),
        ADMIN,  # the admin key as X-Request-Id (a valid id's characters)
        **client,
    )
    await post(proxy, chat(f"{CLIENT}-ocr", "what?", image_part(picture)), "plain", **client)
    events = [await read_event(feed), await read_event(feed)]
    feed.close()
    answers = [orjson.dumps(events)]
    for path in ("/ui", "/ui/app.js", "/ui/recent", "/ui/totals", "/ui/requests/plain"):
        answers.append(await (await proxy.get(path, headers=BEARER)).read())
    blob = b"\n".join(answers)
    for secret in (ADMIN, CLIENT, UPSTREAM):
        assert secret.encode() not in blob, secret
    assert b"[redacted]" in blob  # they were there, masked
    payload = base64.b64encode(png("secret-picture", 3000))
    assert payload[:40] not in blob and b"base64," not in blob
    assert b"A picture showing secret-picture." in blob  # descriptions are on: they are shown


@pytest.fixture
async def served_ui(fake: FakeOpenAI, tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    """A real ocrproxy process with the page on, on its main port (no metrics port)."""
    ui = f'enabled = true\nadmin_key = "{ADMIN}"\n'
    proc = ProxyProcess(tmp_path, proxy_toml(fake.url, free_port(), ui=ui))
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


async def test_the_shipped_nginx_site_refuses_the_page(
    served_ui: ProxyProcess, tmp_path: Path
) -> None:
    binary = require_binary("nginx")
    direct = f"http://127.0.0.1:{served_ui.port}"
    with nginx(binary, tmp_path / "nginx", [served_ui.port]) as port:
        site = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(direct + "/ui/totals", headers=BEARER) as resp:
                assert resp.status == 200  # on, and open to a direct loopback client
            for path in ("/ui", "/ui/", "/ui/app.js", "/ui/recent", "/ui/events", "/%75i/totals"):
                async with session.get(site + path, headers=BEARER) as resp:
                    assert resp.status == 404, path
                    assert "nginx" in await resp.text()  # nginx's own page: never passed on
            async with session.get(site + "/v1/models") as resp:
                assert resp.status == 200  # the rest of the site works
    await asyncio.sleep(0.2)
    routes = [line.get("route") for line in served_ui.log_lines() if line.get("msg") == "request"]
    assert "/v1/models" in routes
    assert not [r for r in routes if r and r.startswith("/ui")]  # refused by nginx itself

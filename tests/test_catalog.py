"""The model check (``catalog.py``): an OCR request for a model its upstream does not list is a
404 naming the model as the user typed it, before any OCR call; a model that is listed (also as
an alias of a dated id) goes through; an upstream whose list is unknown (an error, too slow,
empty) is not checked; one list fetch serves concurrent requests, and a list is kept for a while
only; ``check_models = false`` turns it off; a relay-mode client's list is its own key's; an
upstream's own 404 after OCR names the typed model too (``notes``). Against real loopback fakes,
and once through the openai SDK."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ocrproxy import catalog, config
from ocrproxy.app import create_app
from ocrproxy.notes import with_message_note
from ocrproxy.state import CATALOG
from tests.conftest import anthropic_upstream, chat
from tests.fake_anthropic import FakeAnthropic, b64, image_block
from tests.fakes import FakeOpenAI, data_url, image_part, png

URL = "/v1/chat/completions"
IMG = image_part(data_url("note"))
MISSING = "The model `gone` does not exist or you do not have access to it."


@dataclass
class ListingFake(FakeOpenAI):
    """The fake upstream with a ``/v1/models`` that can be slow or fail, lists per client key
    (``by_key``), and a text model ``gone`` it answers 404 for, as OpenAI does."""

    models_delay: float = 0.0
    models_status: int = 200
    by_key: dict[str, list[str]] | None = None
    not_json_404: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_or_404)
        return app

    async def models(self, request: web.Request) -> web.Response:
        await self._record(request)  # on arrival: a slow answer is counted too
        if self.models_delay:
            await asyncio.sleep(self.models_delay)
        if self.models_status != 200:
            return web.json_response({"error": {"message": "no list"}}, status=self.models_status)
        ids = self.models_list
        if self.by_key is not None:
            key = request.headers.get("Authorization", "").removeprefix("Bearer ")
            ids = self.by_key.get(key, [])
        return web.json_response({"object": "list", "data": [{"id": m} for m in ids]})

    async def chat_or_404(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") != "gone":
            return await self.chat(request)
        await self._record(request)
        if self.not_json_404:
            return web.Response(status=404, text="no such model", content_type="text/plain")
        error = {"message": MISSING, "type": "invalid_request_error", "code": "model_not_found"}
        return web.json_response({"error": error}, status=404)

    @property
    def list_fetches(self) -> int:
        return sum(r.path.startswith("/v1/models") for r in self.received)


@pytest.fixture
async def upstream(aiohttp_server: Any) -> ListingFake:
    state = ListingFake(models_list=["gpt-3.5-turbo", "claude-sonnet-4-5-20250929"])
    server: TestServer = await aiohttp_server(state.app())
    state.url = str(server.make_url("/v1"))
    return state


def _config(up: ListingFake, *, entry: dict[str, Any] | None = None, **raw: Any) -> config.Config:
    first = {"name": "fake", "base_url": up.url, "api_key": "sk-upstream-secret", **(entry or {})}
    return config.from_mapping(
        {
            "upstreams": raw.pop("upstreams", [first]),
            "ocr": {"model": "vision-1", "retries": 0, **raw.pop("ocr", {})},
            **raw,
        },
        env={},
    )


@pytest.fixture
def make(aiohttp_client: Any, upstream: ListingFake) -> Any:
    async def factory(**raw: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(create_app(_config(upstream, **raw)))
        return client

    return factory


async def test_an_unlisted_model_is_a_404_naming_it_as_typed_before_any_ocr(
    make: Any, upstream: ListingFake
) -> None:
    proxy = await make()
    for stream in (False, True):  # a stream too: refused before anything is committed
        r = await proxy.post(URL, json=chat("nope-ocr", "read", IMG, stream=stream))
        assert r.status == 404 and r.content_type == "application/json"
        error = (await r.json())["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith("The model `nope-ocr` does not exist: `nope` is not")
        assert "its upstream lists" in error["message"] and "`-ocr`" in error["message"]
        assert "fake" not in error["message"]  # the operator's upstream names stay private
    assert upstream.ocr_calls == [] and upstream.chat_requests == []
    assert upstream.list_fetches == 1  # the second request used the kept list


async def test_a_model_no_upstream_serves_is_a_404_naming_it_as_typed(
    make: Any, upstream: ListingFake
) -> None:
    entry = {"name": "fake", "base_url": upstream.url, "api_key": "k", "models": ["gpt-*"]}
    proxy = await make(upstreams=[entry])
    r = await proxy.post(URL, json=chat("nope-ocr", "read", IMG))
    error = (await r.json())["error"]
    assert r.status == 404 and error["code"] == "model_not_found"
    assert error["message"].startswith("The model `nope-ocr` (`nope` once the OCR suffix is off)")
    r = await proxy.post(URL, json=chat("nope", "read"))  # no OCR: named as typed, once
    assert (await r.json())["error"]["message"].startswith("The model `nope` is not served")
    assert upstream.ocr_calls == [] and upstream.chat_requests == []


async def test_a_model_named_by_header_is_named_once(make: Any, upstream: ListingFake) -> None:
    proxy = await make()
    r = await proxy.post(URL, json=chat("nope", "read", IMG), headers={"X-OCR-Model": "vision-1"})
    message = (await r.json())["error"]["message"]
    assert r.status == 404 and message.startswith("The model `nope` does not exist: it is not")
    assert upstream.ocr_calls == []


async def test_listed_models_and_aliases_of_dated_ids_go_through(
    make: Any, upstream: ListingFake
) -> None:
    proxy = await make()
    for model in ("gpt-3.5-turbo-ocr", "GPT-3.5-Turbo-ocr", "claude-sonnet-4-5-ocr"):
        r = await proxy.post(URL, json=chat(model, "read", IMG))
        assert r.status == 200, await r.text()
    assert [r.json()["model"] for r in upstream.chat_requests] == [
        "gpt-3.5-turbo",
        "GPT-3.5-Turbo",
        "claude-sonnet-4-5",
    ]


@pytest.mark.parametrize(
    ("listed", "model", "known"),
    [
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5", True),  # Anthropic's dated ids
        ("llama3:latest", "llama3", True),  # Ollama's tags
        ("models/gemini-2.5-flash", "gemini-2.5-flash", True),  # Gemini's namespace
        ("DeepSeek-Chat", "deepseek-chat", True),
        ("gpt-4o", "gpt-4", False),  # a prefix that is not a whole name part
        ("gpt-4o", "gpt-4o-mini", False),
        ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929", False),
        ("claude-sonnet-4-20250514", "claude-sonnet-4-0", True),  # Anthropic's release aliases
        ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet-latest", True),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku-latest", True),
        ("deepseek/deepseek-chat", "deepseek/deepseek-chat:nitro", True),  # OpenRouter's tags
        ("deepseek/deepseek-chat", "deepseek/deepseek-chat:floor", True),
        ("gpt-4o", "gpt-4-latest", False),  # still a whole name part
        ("gpt-4o", "nope:nitro", False),
    ],
)
def test_what_counts_as_listed(listed: str, model: str, known: bool) -> None:
    listing = catalog.Listing.of([listed, "other"])
    assert listing is not None and listing.has(model) is known


def test_an_empty_list_is_unknown() -> None:
    assert catalog.Listing.of([]) is None and catalog.Listing.of([""]) is None


async def test_the_messages_dialect_gets_its_own_404_shape(
    aiohttp_client: Any, upstream: ListingFake, aiohttp_server: Any
) -> None:
    anthropic = FakeAnthropic(models_list=["claude-sonnet-4-5-20250929"])
    server: TestServer = await aiohttp_server(anthropic.app())
    anthropic.url = str(server.make_url("")).rstrip("/")
    openai_up = {"name": "fake", "base_url": upstream.url, "api_key": "sk-upstream-secret"}
    cfg = _config(upstream, upstreams=[anthropic_upstream(anthropic), openai_up])
    proxy = await aiohttp_client(create_app(cfg))
    headers = {"anthropic-version": "2023-06-01"}
    image = image_block(b64(png("note")))
    body = {
        "model": "claude-nope-ocr",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "read"}]}],
    }
    r = await proxy.post("/v1/messages", json=body, headers=headers)
    answer = await r.json()
    assert r.status == 404 and answer["type"] == "error"
    assert answer["error"]["type"] == "not_found_error"
    assert "`claude-nope-ocr` does not exist" in answer["error"]["message"]
    assert upstream.ocr_calls == [] and not any(
        r.path.startswith("/v1/messages") for r in anthropic.received
    )
    (asked,) = anthropic.received  # its list, asked as models.serve asks: largest page, its key
    assert asked.path == "/v1/models?limit=1000"
    assert asked.headers["x-api-key"] == "sk-ant-upstream-secret"
    r = await proxy.post("/v1/messages/count_tokens", json=body, headers=headers)
    assert r.status == 404 and "`claude-nope-ocr`" in (await r.json())["error"]["message"]
    body["model"] = "claude-sonnet-4-5-ocr"  # the alias of the dated id it lists
    r = await proxy.post("/v1/messages", json=body, headers=headers)
    assert r.status == 200, await r.text()
    assert upstream.ocr_calls == ["note"]
    assert len(anthropic.received) == 2  # the list (kept) and the request


@pytest.mark.parametrize("failure", ["http-500", "slow", "empty"])
async def test_an_unknown_list_lets_the_request_through_and_is_not_asked_again_at_once(
    make: Any, upstream: ListingFake, failure: str
) -> None:
    if failure == "http-500":
        upstream.models_status = 500
    elif failure == "slow":
        upstream.models_delay = 2.0
    else:
        upstream.models_list = []
    proxy = await make()
    proxy.app[CATALOG].timeout_s = 0.2  # instead of FETCH_TIMEOUT_S: a test waits less
    for _ in range(2):
        r = await proxy.post(URL, json=chat("nope-ocr", "read", IMG))
        assert r.status == 200, await r.text()
    assert upstream.ocr_calls == ["note"]  # the second was a cache hit
    assert upstream.list_fetches == 1  # the failure is kept: the second did not ask again


async def test_a_fetch_that_fails_unexpectedly_means_unknown(
    make: Any, upstream: ListingFake
) -> None:
    proxy = await make()

    async def broken(up: Any, incoming: Any) -> None:
        raise RuntimeError("Session is closed")

    proxy.app[CATALOG]._fetch = broken
    r = await proxy.post(URL, json=chat("nope-ocr", "read", IMG))
    assert r.status == 200, await r.text()  # unchecked, not a 500
    assert upstream.ocr_calls == ["note"]


async def test_the_list_is_asked_with_the_credentials_only(
    make: Any, upstream: ListingFake
) -> None:
    """The check's GET carries what decides the list, none of the POST's own headers."""
    proxy = await make()
    own = {"Idempotency-Key": "idem-1", "X-Stainless-Retry-Count": "0", "traceparent": "00-ab"}
    r = await proxy.post(URL, json=chat("gpt-3.5-turbo-ocr", "read", IMG), headers=own)
    assert r.status == 200
    (fetch,) = [r for r in upstream.received if r.path.startswith("/v1/models")]
    assert fetch.headers["Authorization"] == "Bearer sk-upstream-secret"
    assert not set(own) & set(fetch.headers)
    chat_call = upstream.chat_requests[0]
    assert chat_call.headers["Idempotency-Key"] == "idem-1"  # the POST itself keeps them


async def test_concurrent_requests_share_one_fetch(make: Any, upstream: ListingFake) -> None:
    upstream.models_delay = 0.3
    proxy = await make()
    bodies = [chat("nope-ocr", "read", IMG) for _ in range(4)]
    bodies += [chat("gpt-3.5-turbo-ocr", "read", IMG) for _ in range(4)]
    answers = await asyncio.gather(*(proxy.post(URL, json=body) for body in bodies))
    assert [r.status for r in answers] == [404] * 4 + [200] * 4
    assert upstream.list_fetches == 1


async def test_a_request_that_goes_away_leaves_the_fetch_to_the_others(
    aiohttp_client: Any, upstream: ListingFake
) -> None:
    upstream.models_delay = 0.3
    # As `ocrproxy serve` runs it: a client that hangs up cancels its handler.
    server_kwargs = {"handler_cancellation": True}
    proxy = await aiohttp_client(create_app(_config(upstream)), server_kwargs=server_kwargs)
    gone = asyncio.ensure_future(proxy.post(URL, json=chat("nope-ocr", "read", IMG)))
    await asyncio.sleep(0.1)
    gone.cancel()  # the client hangs up while the list is being fetched
    await asyncio.gather(gone, return_exceptions=True)
    r = await proxy.post(URL, json=chat("nope-ocr", "read", IMG))
    assert r.status == 404
    assert upstream.list_fetches == 1 and upstream.ocr_calls == []


async def test_a_list_is_kept_for_its_ttl_then_fetched_again(
    make: Any, upstream: ListingFake
) -> None:
    proxy = await make()
    now = [1000.0]
    proxy.app[CATALOG].clock = lambda: now[0]
    assert (await proxy.get("/v1/models")).status == 200  # the model list fills the catalog
    upstream.models_list = ["gpt-3.5-turbo", "nope"]  # the upstream adds a model
    r = await proxy.post(URL, json=chat("nope-ocr", "read", IMG))
    assert r.status == 404 and upstream.list_fetches == 1  # the kept list still decides
    now[0] += catalog.MODEL_LIST_TTL_S + 1
    r = await proxy.post(URL, json=chat("nope-ocr", "read", IMG))
    assert r.status == 200 and upstream.list_fetches == 2


async def test_check_models_false_checks_nothing(make: Any, upstream: ListingFake) -> None:
    proxy = await make(entry={"check_models": False})
    r = await proxy.post(URL, json=chat("nope-ocr", "read", IMG))
    assert r.status == 200
    assert upstream.list_fetches == 0 and upstream.ocr_calls == ["note"]


async def test_in_relay_mode_each_client_key_is_checked_against_its_own_list(
    make: Any, upstream: ListingFake
) -> None:
    upstream.by_key = {"sk-alice": ["alpha"], "sk-bob": ["beta"]}
    proxy = await make(entry={"api_key": ""})  # no [auth] keys: the client's key is relayed

    async def status(key: str, model: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        r = await proxy.post(URL, json=chat(model, "read", IMG), headers=headers)
        return r.status

    assert await status("sk-alice", "alpha-ocr") == 200
    assert await status("sk-bob", "alpha-ocr") == 404  # alice's list does not decide for bob
    assert await status("sk-bob", "beta-ocr") == 200
    assert await status("sk-alice", "alpha-ocr") == 200
    asked = [r.headers["Authorization"] for r in upstream.received if r.path == "/v1/models"]
    assert asked == ["Bearer sk-alice", "Bearer sk-bob"]  # each key's list, asked once


async def test_with_client_keys_the_list_is_asked_with_the_upstreams_key(
    make: Any, upstream: ListingFake
) -> None:
    proxy = await make(auth={"keys": ["ck-one", "ck-two"]})
    for key in ("ck-one", "ck-two"):
        headers = {"Authorization": f"Bearer {key}"}
        r = await proxy.post(URL, json=chat("nope-ocr", "read", IMG), headers=headers)
        assert r.status == 404
    (asked,) = [r for r in upstream.received if r.path == "/v1/models"]  # one list for both
    assert asked.headers["Authorization"] == "Bearer sk-upstream-secret"


async def test_an_upstreams_404_after_ocr_names_the_model_as_typed(
    make: Any, upstream: ListingFake
) -> None:
    upstream.models_status = 503  # the list is unknown: the request goes on
    proxy = await make()
    r = await proxy.post(URL, json=chat("gone-ocr", "read", IMG))
    raw = await r.read()
    assert r.status == 404 and int(r.headers["Content-Length"]) == len(raw)
    error = (await r.json())["error"]
    assert error["message"] == MISSING + " (requested as `gone-ocr`)"
    assert error["code"] == "model_not_found"  # the rest as the upstream sent it
    assert upstream.ocr_calls == ["note"]
    upstream.not_json_404 = True  # not JSON: relayed as it came
    r = await proxy.post(URL, json=chat("gone-ocr", "read", IMG))
    assert r.status == 404 and await r.text() == "no such model"


async def test_an_upstreams_404_in_an_early_committed_stream_names_the_model_as_typed(
    make: Any, upstream: ListingFake
) -> None:
    upstream.models_status = 503
    upstream.ocr_delay = 0.3
    proxy = await make(ocr={"keepalive_after_s": 0.05})
    r = await proxy.post(URL, json=chat("gone-ocr", "read", IMG, stream=True))
    body = await r.text()
    assert r.status == 200 and body.startswith(": keep-alive")
    assert "(requested as `gone-ocr`)" in body and "does not exist" in body


def test_a_note_goes_only_into_an_error_message() -> None:
    note = " (requested as `x-ocr`)"
    anthropic = b'{"type":"error","error":{"type":"not_found_error","message":"model: x"}}'
    noted = with_message_note(anthropic, note)
    assert noted == (
        b'{"type":"error","error":{"type":"not_found_error",'
        b'"message":"model: x (requested as `x-ocr`)"}}'
    )
    assert with_message_note(b'{"error":{"message":"m","code":null}}', note) == (
        b'{"error":{"message":"m (requested as `x-ocr`)","code":null}}'
    )
    for other in (b"not json", b"[1]", b'{"error":"flat"}', b'{"error":{"message":3}}', b"\xff"):
        assert with_message_note(other, note) is None


async def test_the_openai_sdk_gets_a_not_found_error_naming_the_typed_model(
    make: Any, upstream: ListingFake
) -> None:
    proxy = await make()
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="sk-client", max_retries=0
    )
    try:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(
                model="nope-ocr",
                messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, IMG]}],
            )
    finally:
        await client.close()
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    assert "The model `nope-ocr` does not exist" in caught.value.message
    assert upstream.ocr_calls == []


async def test_closing_the_catalog_cancels_a_fetch_under_way() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def fetch(up: config.Upstream, incoming: Any) -> list[str]:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return []

    kept = catalog.Catalog(fetch, relay_auth=False, timeout_s=3600)
    up = config.Upstream(base_url="http://127.0.0.1:9/v1")
    waiter = asyncio.ensure_future(kept.listing(up, {}))
    await started.wait()
    await kept.close()
    assert cancelled.is_set()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_upstreams_of_one_name_keep_their_own_lists(
    make: Any, upstream: ListingFake, aiohttp_server: Any
) -> None:
    other = ListingFake(models_list=["llama3:latest"])
    server: TestServer = await aiohttp_server(other.app())
    other.url = str(server.make_url("/v1"))
    ups = [  # both named "default", as upstreams with no name are
        {"base_url": upstream.url, "api_key": "sk-a", "models": ["gpt-*", "nope"]},
        {"base_url": other.url, "api_key": "sk-b"},
    ]
    proxy = await make(upstreams=ups)
    for model, status in (("gpt-3.5-turbo-ocr", 200), ("llama3-ocr", 200), ("nope-ocr", 404)):
        r = await proxy.post(URL, json=chat(model, "read", IMG))
        assert r.status == status, (model, await r.text())
    assert (upstream.list_fetches, other.list_fetches) == (1, 1)

"""Hardening at the proxy's edge: canonical paths only, the pass-through's route list and chat
rules, account headers, bounded names and JSON, compressed uploads, base URLs with a query.

Every request that must be refused is sent as raw bytes (aiohttp's client would normalise the
path) to a real loopback proxy, and the fake upstream must have received nothing.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import zlib
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import ProxyFactory, chat
from tests.fakes import FakeOpenAI, data_url, image_part

KEY = "ck-client-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"


async def raw_request(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    raw_headers: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request written byte for byte (the path exactly as given); the status,
    headers and body of the answer, read until the server closes."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n").encode() + raw_headers + b"\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    if found.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return int(status_line.split()[1]), found, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def port_of(client: Any) -> int:
    port: int = client.server.port
    return port


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --- H1, M3: canonical paths only ------------------------------------------------------------

TRAVERSALS = [
    "/v1/../admin",
    "/v1/%2e%2e/admin",
    "/v1/%2E%2E/%2E%2E/internal/keys",
    "/v1/.%2E/admin",
    "/v1/%2E%2e/admin",
    "/v1/%2e./admin",
    "/v1/%2e%2e%2f%2e%2e%2fadmin",
    "/v1/models/../../admin",
    "/v1/models/%2e%2e/%2e%2e/admin",
    "/v1/..;/admin",
    "/v1/models/.",
    "/v1/models/..",
    "/v1/a%2Fb",
    "/v1/a%2fb",
    "/v1/a%5Cb",
    "/v1/a%5cb",
    "/v1/a\\b",
    "/v1/..\\admin",
    "/v1/%00/x",
    "/%76%31/models",
    "http://127.0.0.1/v1/../admin",  # absolute form
]
# Every spelling of the chat route but the one: refused, never sent to the upstream's chat.
CHAT_ALIASES = [
    "/v1//chat/completions",
    "/v1/./chat/completions",
    "/v1/chat//completions",
    "/v1/chat/completions/",
    "/v1/chat/completions%2F",
    "/v1/chat/./completions",
    "/v1/x/../chat/completions",
    "/v1/%2e/chat/completions",
]


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_non_canonical_paths_are_400_and_never_forwarded(
    make_proxy: ProxyFactory, fake: FakeOpenAI, method: str
) -> None:
    # Even with every route listed for the pass-through, these never leave the proxy.
    proxy = await make_proxy(auth={"keys": [KEY]}, server={"passthrough_routes": ["*"]})
    body = orjson.dumps(chat("gpt-3.5-turbo", "hi", api_base="http://attacker.example/v1"))
    headers = {**AUTH, "Content-Type": "application/json"}
    for target in TRAVERSALS + CHAT_ALIASES:
        status, _, payload = await raw_request(port_of(proxy), method, target, headers, body)
        assert status == 400, (target, payload)
        error = error_of(payload)
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_path"), target
        assert KEY not in payload.decode()
    # without a key, too: the path is judged first, and still nothing goes upstream
    status, _, payload = await raw_request(port_of(proxy), method, "/v1/%2e%2e/admin")
    assert status == 400 and error_of(payload)["code"] == "invalid_path"
    assert fake.received == []


async def test_trailing_slash_is_refused_and_canonical_paths_pass(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    # `/v1/chat/completions/` is refused (invalid_path), not routed to the chat handler: one
    # spelling per route, whatever the pass-through lists.
    proxy = await make_proxy(auth={"keys": [KEY]}, server={"passthrough_routes": ["chat/*", "*"]})
    port = port_of(proxy)
    body = orjson.dumps(chat("gpt-3.5-turbo", "hi", api_key="sk-attacker"))
    for target in (CHAT + "/", "/v1/models/", "/v1/"):
        status, _, payload = await raw_request(
            port, "POST", target, {**AUTH, "Content-Type": "application/json"}, body
        )
        assert status == 400 and error_of(payload)["code"] == "invalid_path", target
    assert fake.received == []
    for target, upstream_path in [
        ("/v1/models/gpt-3.5-turbo", "/v1/models/gpt-3.5-turbo"),
        ("/v1/models/ft%3Agpt-4o%3Aacme", "/v1/models/ft%3Agpt-4o%3Aacme"),
        (
            "/v1/models/gpt-3.5-turbo?after=a%2Fb&x=/../",
            "/v1/models/gpt-3.5-turbo?after=a%2Fb&x=/../",
        ),
        ("/v1/responses/resp_1.json", "/v1/responses/resp_1.json"),
    ]:
        status, _, payload = await raw_request(port, "GET", target, AUTH)
        assert status == 200, (target, payload)
        assert fake.received[-1].path == upstream_path
    status, _, payload = await raw_request(port, "GET", "/v1/models", AUTH)
    assert status == 200 and b"gpt-3.5-turbo-ocr" in payload
    status, _, _ = await raw_request(port, "GET", "/healthz")
    assert status == 200


# --- M3: the chat route's refusals on every JSON body the pass-through reads ----------------


async def test_passthrough_refuses_redirecting_fields_in_any_readable_body(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy()
    port = port_of(proxy)
    for field in ("api_base", "base_url", "api_key", "azure_endpoint", "api_version"):
        body = orjson.dumps({"model": "text-embedding-3-small", "input": "hi", field: "x"})
        for content_type in ("application/json", "application/json; charset=utf-8", "text/plain"):
            status, _, payload = await raw_request(
                port, "POST", "/v1/embeddings", {"Content-Type": content_type}, body
            )
            assert status == 400, (field, content_type, payload)
            assert error_of(payload)["param"] == field
        status, _, payload = await raw_request(port, "POST", "/v1/completions", {}, body)
        assert status == 400 and error_of(payload)["param"] == field  # no Content-Type at all
        escaped = body.replace(field.encode(), field.replace("_", "\\u005f").encode())
        if escaped != body:
            status, _, payload = await raw_request(
                port, "POST", "/v1/responses", {"Content-Type": "application/json"}, escaped
            )
            assert status == 400, escaped
    assert fake.received == []
    ok = orjson.dumps({"model": "text-embedding-3-small", "input": "hi"})
    status, _, _ = await raw_request(
        port, "POST", "/v1/embeddings", {"Content-Type": "application/json"}, ok
    )
    assert status == 200 and fake.received[-1].json() == orjson.loads(ok)


# --- M6: the pass-through's route list, account headers, upstream headers -------------------


ACCOUNT_ROUTES = [
    ("GET", "/v1/files"),
    ("GET", "/v1/files/file-1/content"),
    ("DELETE", "/v1/files/file-1"),
    ("GET", "/v1/batches"),
    ("GET", "/v1/messages/batches"),  # Anthropic's Message Batches: stored in the account
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/vector_stores"),
    ("GET", "/v1/assistants"),
    ("POST", "/v1/threads/thread_1/runs"),
    ("POST", "/v1/uploads"),
    ("GET", "/v1/organization/users"),
    ("GET", "/v1/Models"),
    ("GET", "/v1/anything"),
]
MODEL_ROUTES = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/moderations"),
    ("GET", "/v1/models/gpt-3.5-turbo"),
    ("POST", "/v1/audio/speech"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/resp_1"),
]  # /v1/messages is a dialect of its own, routed to Anthropic upstreams (test_messages.py)


async def test_passthrough_relays_only_the_listed_routes(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy()
    body = {"model": "gpt-3.5-turbo", "input": "hi"}
    for method, path in ACCOUNT_ROUTES:
        r = await proxy.request(method, path, json=body)
        assert r.status == 404, path
        anthropic = path.startswith("/v1/messages/")  # answered in that API's error shape
        kind = "not_found_error" if anthropic else "invalid_request_error"
        assert (await r.json())["error"]["type"] == kind
    assert fake.received == []
    for method, path in MODEL_ROUTES:
        r = await proxy.request(method, path, json=body)
        assert r.status == 200, path
        assert fake.received[-1].path == path
    # what the operator lists is relayed; chat and the model list work whatever the list says
    proxy = await make_proxy(server={"passthrough_routes": ["files", "files/*"]})
    assert (await proxy.get("/v1/files")).status == 200
    assert fake.received[-1].path == "/v1/files"
    assert (await proxy.delete("/v1/files/file-1")).status == 200
    assert (await proxy.post("/v1/embeddings", json=body)).status == 404
    assert (await proxy.post(CHAT, json=chat("gpt-3.5-turbo", "hi"))).status == 200
    assert (await proxy.get("/v1/models")).status == 200
    proxy = await make_proxy(server={"passthrough_routes": []})
    assert (
        await proxy.post(CHAT, json=chat("gpt-3.5-turbo-ocr", image_part(data_url("n"))))
    ).status == 200
    assert (await proxy.get("/v1/models")).status == 200
    assert (await proxy.get("/v1/models/gpt-3.5-turbo")).status == 404


async def test_account_headers_dropped_and_upstream_headers_on_every_request(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(
        upstreams=[
            {
                "name": "fake",
                "base_url": fake.url,
                "api_key": "sk-upstream-secret",
                "headers": {"OpenAI-Organization": "org-OPERATOR", "X-Tenant": "t1"},
            }
        ]
    )
    client = {
        "OpenAI-Organization": "org-VICTIM",
        "OpenAI-Project": "proj_other",
        "Cookie": "session=victim",
        "X-Tenant": "forged",
    }
    sent = [
        await proxy.post(CHAT, json=chat("gpt-3.5-turbo", "hi"), headers=client),
        await proxy.post(
            CHAT, json=chat("gpt-3.5-turbo-ocr", image_part(data_url("h"))), headers=client
        ),
        await proxy.post(
            CHAT,
            json=chat("gpt-3.5-turbo-ocr", image_part(data_url("s")), stream=True),
            headers=client,
        ),
        await proxy.get("/v1/models", headers=client),
        await proxy.post("/v1/embeddings", json={"model": "e", "input": "x"}, headers=client),
        await proxy.post(
            "/v1/audio/transcriptions",
            data=b"--x--",
            headers={**client, "Content-Type": "multipart/form-data; boundary=x"},
        ),
    ]
    for r in sent:
        assert r.status == 200, await r.text()
        await r.read()
    assert len(fake.ocr_calls) == 2  # the OCR model's calls are among the requests checked
    assert len(fake.received) == 8
    for received in fake.received:
        headers = {k.lower(): v for k, v in received.headers.items()}
        assert headers["openai-organization"] == "org-OPERATOR", received.path
        assert headers["x-tenant"] == "t1", received.path
        assert "openai-project" not in headers and "cookie" not in headers, received.path
        assert headers["authorization"] == "Bearer sk-upstream-secret"
    # relay mode: the client's own key goes upstream, and its account headers with it
    proxy = await make_proxy(upstreams=[{"name": "fake", "base_url": fake.url}])
    own = {"Authorization": "Bearer sk-clients-own", "OpenAI-Project": "proj_mine"}
    r = await proxy.post(CHAT, json=chat("gpt-3.5-turbo", "hi"), headers=own)
    assert r.status == 200
    assert fake.received[-1].headers["OpenAI-Project"] == "proj_mine"


# --- L3, L4: names, depth, numbers, Authorization -------------------------------------------


def nested(depth: int) -> Any:
    """A JSON value nested ``depth`` levels deep (arrays and objects in turn)."""
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


BAD_NAMES = ["gpt-3.5-turbo\r\nX-Injected: 1", "gpt\x00local", "gpt\x7f", "gpt\t4", "m" * 257]


async def test_bad_model_names_are_400_before_any_upstream_call(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy()
    image = image_part(data_url("named"))
    for name in BAD_NAMES:
        for body in (
            chat(name, "hi"),
            chat(name + "-ocr", image),
            chat("gpt-3.5-turbo", image, ocr_model=name),
            chat("gpt-3.5-turbo", image, ocr_model=name, stream=True),
        ):
            r = await proxy.post(CHAT, json=body)
            assert r.status == 400, (name, body)
            assert (await r.json())["error"]["param"] in ("model", "ocr_model")
        r = await proxy.post("/v1/embeddings", json={"model": name, "input": "x"})
        assert r.status == 400 and (await r.json())["error"]["param"] == "model"
    assert fake.received == []
    r = await proxy.post(CHAT, json=chat("m" * 256, "hi"))
    assert r.status == 200  # the limit itself is fine


HOSTILE = {
    "deep tools ocr": lambda: chat(
        "m", image_part(data_url("t")), ocr_model="vision-1", tools=[nested(70)]
    ),
    "deep 1000": lambda: chat("gpt-3.5-turbo", "hi", tools=["__DEEP__"]),
    "deep 1000 ocr": lambda: chat("gpt-3.5-turbo-ocr", "hi", tools=["__DEEP__"]),
    "deep in a message ocr": lambda: {
        "model": "gpt-3.5-turbo-ocr",
        "messages": [{"role": "user", "content": "hi", "x": nested(80)}],
    },
    "deep ocr": lambda: chat("gpt-3.5-turbo-ocr", image_part(data_url("d")), extra=nested(65)),
    "stream 1e999": lambda: chat("gpt-3.5-turbo-ocr", image_part(data_url("a")), stream=1e999),
    "stream 5000 digits": lambda: chat(
        "gpt-3.5-turbo-ocr", image_part(data_url("b")), stream=10**4999
    ),
    "ocr_model 1e999": lambda: chat("gpt-3.5-turbo", image_part(data_url("c")), ocr_model=1e999),
    "ocr_model 5000 digits": lambda: chat("gpt-3.5-turbo", "x", ocr_model=-(10**4999)),
    "stream_options 1e999": lambda: chat(
        "gpt-3.5-turbo-ocr", image_part(data_url("e")), stream=True, stream_options=1e999
    ),
}


def hostile_body(name: str) -> bytes:
    """The body of ``HOSTILE[name]`` as JSON text (orjson refuses to write 1e999, 5000-digit
    integers and 1000 levels: they are written here by hand)."""

    def dump(value: Any) -> str:
        if isinstance(value, dict):
            items = (orjson.dumps(k).decode() + ":" + dump(v) for k, v in value.items())
            return "{" + ",".join(items) + "}"
        if isinstance(value, list):
            return "[" + ",".join(dump(v) for v in value) + "]"
        if isinstance(value, float) and value == float("inf"):
            return "1e999"
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**64:
            return ("-" if value < 0 else "") + "9" * 5000
        return orjson.dumps(value).decode()

    deep = "[" * 1000 + "]" * 1000  # past the decoder's own recursion limit
    return dump(HOSTILE[name]()).replace('"__DEEP__"', deep).encode()


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_json_on_the_chat_route_is_400_never_500(
    make_proxy: ProxyFactory, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    proxy = await make_proxy()
    with caplog.at_level(logging.INFO):
        r = await proxy.post(
            CHAT, data=hostile_body(name), headers={"Content-Type": "application/json"}
        )
        assert r.status == 400, await r.text()
        assert (await r.json())["error"]["type"] == "invalid_request_error"
    assert fake.received == []
    assert not [rec for rec in caplog.records if rec.exc_info or "unhandled" in rec.getMessage()]


async def test_hostile_json_on_the_passthrough_is_400(
    make_proxy: ProxyFactory, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy()
    bodies = [
        b'{"model":"e","input":' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}",
        b'{"model":"e","input":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model":"e","input":' + b"[" * 5000,  # unbalanced: the decoder's own recursion limit
        b'{"model":1e999,"input":"x"}',
        b'{"model":' + b"9" * 5000 + b',"input":"x"}',
    ]
    with caplog.at_level(logging.INFO):
        for body in bodies:
            r = await proxy.post(
                "/v1/embeddings", data=body, headers={"Content-Type": "application/json"}
            )
            assert r.status == 400, (body[:40], await r.text())
    assert fake.received == []
    assert not [rec for rec in caplog.records if rec.exc_info or "unhandled" in rec.getMessage()]


async def test_64_levels_on_ocr_requests_and_deeper_forwards_as_sent(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy()
    # the request object is level 1, `tools` 2: 62 more levels make 64
    text = 'a [string] with {brackets} and \\" quotes'
    body = chat("gpt-3.5-turbo-ocr", image_part(data_url("deep-ok")), text, tools=[nested(62)])
    assert (await proxy.post(CHAT, json=body)).status == 200
    assert fake.ocr_calls == ["deep-ok"]
    body = chat("gpt-3.5-turbo-ocr", image_part(data_url("deep-no")), text, tools=[nested(63)])
    r = await proxy.post(CHAT, json=body)
    assert r.status == 400 and "64 levels" in (await r.json())["error"]["message"]
    assert fake.ocr_calls == ["deep-ok"]
    # A body forwarded byte for byte (no OCR, pass-through) is read at its top level only:
    # deeper than 64 levels it goes on as sent, the upstream judges it (past msgspec's own
    # limit of ~1000 levels it is a 400: test_hostile_json_*).
    sent = orjson.dumps(chat("gpt-3.5-turbo", text, tools=[nested(200)]))
    r = await proxy.post(CHAT, data=sent, headers={"Content-Type": "application/json"})
    assert r.status == 200 and fake.received[-1].body == sent
    sent = orjson.dumps({"model": "e", "input": [nested(200)]})
    r = await proxy.post("/v1/embeddings", data=sent, headers={"Content-Type": "application/json"})
    assert r.status == 200 and fake.received[-1].body == sent


@pytest.mark.parametrize("keys", [[KEY], []])
async def test_non_ascii_authorization_is_400(
    make_proxy: ProxyFactory, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture, keys: list[str]
) -> None:
    sections: dict[str, Any] = {"auth": {"keys": keys}}
    if not keys:  # relay mode: the client's header would be sent on
        sections["upstreams"] = [{"name": "fake", "base_url": fake.url}]
    proxy = await make_proxy(**sections)
    body = orjson.dumps(chat("gpt-3.5-turbo", "hi"))
    for value in (
        b"Bearer \xff\xfe" + KEY.encode(),
        "Bearer ké".encode(),
        b"Bearer " + KEY.encode() + b"\xc3\xa9",
    ):
        with caplog.at_level(logging.INFO):
            status, _, payload = await raw_request(
                port_of(proxy),
                "POST",
                CHAT,
                {"Content-Type": "application/json"},
                body,
                raw_headers=b"Authorization: " + value + b"\r\n",
            )
        assert status == 400, payload
        assert error_of(payload)["type"] == "invalid_request_error"
    assert fake.received == []
    assert not [rec for rec in caplog.records if rec.exc_info or "unhandled" in rec.getMessage()]


def test_depth_scan_agrees_with_a_parser() -> None:
    import random

    from ocrproxy.guard import MAX_DEPTH, too_deep

    def depth(value: Any) -> int:
        if isinstance(value, list):
            return 1 + max((depth(v) for v in value), default=0)
        if isinstance(value, dict):
            return 1 + max((depth(v) for v in value.values()), default=0)
        return 0

    rng = random.Random(7)
    tricky = ['"', "\\", '\\"', "[", "]", "{", "}", '"]', '\\\\"', "x", "\n", "é"]

    def make(level: int, target: int) -> Any:
        if level >= target:
            return "".join(rng.choice(tricky) for _ in range(rng.randrange(4)))
        children = [make(level + 1, target) for _ in range(1 if rng.random() < 0.95 else 2)]
        if rng.random() < 0.5:
            return children + ["".join(rng.choice(tricky) for _ in range(3))]
        return {
            "".join(rng.choice(tricky) for _ in range(2)) + str(i): c
            for i, c in enumerate(children)
        }

    for _ in range(200):
        value = make(0, rng.randrange(58, 70))
        text = orjson.dumps(value)
        assert too_deep(text) == (depth(value) > MAX_DEPTH), text[:200]
        assert too_deep(bytearray(text)) == (depth(value) > MAX_DEPTH)
        padded = orjson.dumps({"pad": "A" * 70_000, "v": value})  # the large-body path
        assert too_deep(padded) == (depth(value) + 1 > MAX_DEPTH)


# --- L10: compressed uploads ------------------------------------------------------------------


class CountingUpstream:
    """An upstream that reads an upload piece by piece and remembers how much arrived."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.done = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v1/{tail:.*}", self.count)
        return app

    async def count(self, request: web.Request) -> web.Response:
        total = 0
        try:
            async for piece in request.content.iter_any():
                total += len(piece)
        finally:
            self.received.append(total)
            self.done.set()
        return web.json_response({"length": total})


@functools.cache
def gzip_of_zeros(size: int, *, deflate: bool = False) -> bytes:
    """``size`` zero bytes compressed (a thousand to one): gzip, or zlib's deflate framing."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 15 if deflate else 31)
    block = bytes(1024 * 1024)
    out = [packer.compress(block) for _ in range(size // len(block))]
    return b"".join(out) + packer.flush()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_upload_is_cut_at_max_body_bytes_inflated(
    make_proxy: ProxyFactory, aiohttp_server: Any, encoding: str
) -> None:
    counting = CountingUpstream()
    server = await aiohttp_server(counting.app())
    limit = 1024 * 1024
    proxy = await make_proxy(
        server={"max_body_bytes": limit},
        upstreams=[{"name": "count", "base_url": str(server.make_url("/v1")), "api_key": "sk-x"}],
    )
    bomb = gzip_of_zeros(64 * 1024 * 1024, deflate=encoding == "deflate")
    assert len(bomb) < limit  # far less than the limit is sent
    headers = {"Content-Type": "application/octet-stream", "Content-Encoding": encoding}
    r = await proxy.post("/v1/audio/transcriptions", data=bomb, headers=headers)
    assert r.status == 413, await r.text()
    assert (await r.json())["error"]["code"] == "payload_too_large"
    await asyncio.wait_for(counting.done.wait(), 10)
    assert counting.received and max(counting.received) <= limit
    # a compressed upload under the limit goes through, inflated
    small = gzip.compress(b"z" * 10_000)
    r = await proxy.post(
        "/v1/audio/transcriptions", data=small, headers={**headers, "Content-Encoding": "gzip"}
    )
    assert r.status == 200 and (await r.json())["length"] == 10_000


async def test_a_streamed_upload_that_stalls_gets_408_after_the_body_timeout(
    make_proxy: ProxyFactory, aiohttp_server: Any
) -> None:
    """A streamed upload (audio, multipart) is bounded in time like a buffered body: a client
    dripping it no longer holds a connection to the upstream as long as the upstream allows."""
    counting = CountingUpstream()
    server = await aiohttp_server(counting.app())
    proxy = await make_proxy(
        server={"body_timeout_s": 1.0},
        upstreams=[{"name": "count", "base_url": str(server.make_url("/v1")), "api_key": "sk-x"}],
    )
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    try:
        writer.write(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
            + b"a"
            * 1000
        )
        await writer.drain()
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert asyncio.get_running_loop().time() - started < 5
        await asyncio.wait_for(counting.done.wait(), 10)  # the upstream's request ended
        assert counting.received == [1000]
    finally:
        writer.close()
    # An upload that arrives in time still goes through whole, its length kept.
    r = await proxy.post(
        "/v1/audio/transcriptions",
        data=b"b" * 50_000,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status == 200 and (await r.json())["length"] == 50_000


# --- I3, point 17: base URLs with a query, check-config masking, the nginx site -------------


async def test_base_url_with_a_query_is_joined_on_every_route(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(
        upstreams=[
            {"name": "fake", "base_url": fake.url + "?api-version=2024-10-21", "api_key": "k"}
        ]
    )
    assert (await proxy.post(CHAT, json=chat("gpt-3.5-turbo", "hi"))).status == 200
    assert (
        await proxy.post(CHAT, json=chat("gpt-3.5-turbo-ocr", image_part(data_url("q"))))
    ).status == 200
    assert (await proxy.get("/v1/models")).status == 200
    assert (
        await proxy.post("/v1/embeddings?user=u1", json={"model": "e", "input": "x"})
    ).status == 200
    assert (await proxy.get("/v1/models/gpt-3.5-turbo")).status == 200
    paths = [r.path for r in fake.received]
    assert paths == [
        "/v1/chat/completions?api-version=2024-10-21",
        "/v1/chat/completions?api-version=2024-10-21",  # the OCR call
        "/v1/chat/completions?api-version=2024-10-21",
        "/v1/models?api-version=2024-10-21",
        "/v1/embeddings?api-version=2024-10-21&user=u1",
        "/v1/models/gpt-3.5-turbo?api-version=2024-10-21",
    ]

"""The OCR step: one chat-completions call to the OCR model per distinct image, all at once.

Theory of operation: the images of a request are grouped by identity, so an image sent twice is
described once (at the ``detail`` of its first appearance). Each distinct image goes through the
description cache (memory LRU, shared tier, single-flight), and only a miss calls the OCR model:
a non-streaming request with the analysis prompt and the image, bounded ``max_tokens``, under a
global semaphore (``max_concurrency``). One deadline, ``timeout_s``, covers everything a miss
does for its image: the wait for a slot, every attempt and the pauses between retries; an image
whose slot does not come free in time fails at its deadline instead of queueing behind a hung
model. The answer is read up to ``answer_limit`` bytes, never whole. A failure never escapes as
an exception unless the policy is ``fail``: under ``placeholder`` the image gets a short note
saying it could not be analysed.

A cache key is a hash of length-prefixed fields: the kind of reader (the OCR model over HTTP, or
the local engine and its version), the model name, the prompt, the image, the ``detail`` the
OCR model is asked for (absent and ``auto`` are one), and under ``[cache] scope = "per_key"`` a
hash of the client's ``Authorization``. No field's text can stand for another field, so no
``ocr_model`` string can reach the local engine's entries. Under the default ``shared`` scope a
cache hit tells any client that someone sent the image within the TTL. Single-flight joins
callers of one key; when the OCR call carries the client's own key (relay mode), only callers
with the same key share a flight, so a client the upstream refuses fails nobody else's image
(a successful answer is still cached for everyone).

The OCR model named by ``[ocr] local_alias`` is not called over HTTP: the built-in Tesseract
engine (``local.py``) reads the image's text instead, through the same cache (its key names the
engine, its version and languages) and into the same reference block, at no token cost.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import msgspec

from . import config, local, upstream
from .cache import Description, DescriptionCache
from .errors import BadRequest, OcrFailed
from .images import Image, decode_data_url, validate
from .logs import redact
from .schema import OcrUsage, encoder, ocr_response_decoder

log = logging.getLogger("ocrproxy.describe")


# The encoded body up to the image URL's characters: the URL comes first in its object, and a `"`
# inside an encoded string is always escaped, so this occurs once, in the image part.
_URL_MARK = b'{"url":""'

# Statuses worth another try: rate limits and transient server trouble.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 10.0

# An OCR answer is read up to the larger of these: max_tokens tokens of text are a few kB (a
# token is a few characters, at most six bytes each once JSON-escaped), so 1 MiB is ~100 times
# what a well-behaved model sends at the default max_tokens, and 512 bytes a token keeps that
# margin for an operator who raises max_tokens. Past it the answer is refused, not cut.
ANSWER_LIMIT = 1 << 20
ANSWER_BYTES_PER_TOKEN = 512
# An error answer is only read for its reason: this much is plenty.
ERROR_BODY_LIMIT = 64 * 1024

_KEY_VERSION = b"ocrproxy/3\0"  # 3: fields length-prefixed; detail and credential scope added


class OcrError(Exception):
    """Describing one image failed; the message is safe to log and to show."""


class _Retryable(Exception):
    """A failure before any answer (connection refused or reset): safe to try again."""


def credential_digest(value: str) -> bytes:
    """A hash standing for a client's credential in cache and flight keys (never the value)."""
    raw = value.encode("utf-8", "surrogatepass")
    return hashlib.sha256(b"ocrproxy/credential\0" + raw).digest()


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, and whether that was all of it."""
    if resp.content_length is not None and resp.content_length > limit:
        return b"", False
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]), False
    return bytes(body), True


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(slots=True)
class Outcome:
    """The result for one distinct image of a request."""

    digest: bytes
    description: Description | None
    cached: bool
    error: str | None = None


@dataclass(slots=True)
class OcrReport:
    """What the OCR step did for one request: shown in headers, logs and ``usage.ocr``."""

    model: str
    outcomes: dict[bytes, Outcome]
    ms: float

    @property
    def images(self) -> int:
        return len(self.outcomes)

    @property
    def cache_hits(self) -> int:
        return sum(1 for o in self.outcomes.values() if o.cached and o.description)

    @property
    def failures(self) -> int:
        return sum(1 for o in self.outcomes.values() if o.error)

    def usage(self) -> dict[str, int | str]:
        paid = [o.description for o in self.outcomes.values() if o.description and not o.cached]
        prompt = sum(d.prompt_tokens for d in paid)
        completion = sum(d.completion_tokens for d in paid)
        return {
            "model": self.model,
            "images": self.images,
            "cache_hits": self.cache_hits,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


@dataclass(slots=True, frozen=True)
class _Pieces:
    """An OCR request body whose long image URL is sent a piece at a time, straight from the
    client's own body (or the fetcher's data URL): the body is never held as one more copy of
    the image."""

    head: bytes  # the JSON before the URL's characters
    url: bytes | memoryview
    tail: bytes  # the JSON after them

    @property
    def size(self) -> int:
        """Of the whole body, sent as Content-Length (so the body is not chunked)."""
        return len(self.head) + len(self.url) + len(self.tail)

    def chunks(self) -> AsyncIterator[memoryview]:
        """The body's bytes; a fresh iterator for every attempt."""
        return upstream.pieces(self.head, self.url, self.tail)


class Describer:
    """Calls the OCR model for images, through the cache, with bounded concurrency."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        router: upstream.Router,
        settings: config.Ocr,
        cache: DescriptionCache,
        secrets: tuple[str, ...] = (),
        engine: local.Engine | None = None,
        *,
        client_keys: bool = False,
        scope: str = "shared",
        on_call: Callable[[str, bool, float], None] | None = None,
    ) -> None:
        self.session = session
        self.engine = engine
        self.router = router
        self.settings = settings
        self.cache = cache
        self.secrets = secrets
        self.client_keys = client_keys  # [auth] keys set: never relay the client's key
        self.per_key = scope == "per_key"  # [cache] scope: entries private to a credential
        self.answer_limit = max(ANSWER_LIMIT, ANSWER_BYTES_PER_TOKEN * settings.max_tokens)
        self.semaphore = asyncio.Semaphore(settings.max_concurrency)
        self.on_call = on_call  # (model, ok, seconds): metrics
        self._prompt_digest = hashlib.sha256(settings.prompt.encode()).digest()

    def key(
        self,
        key_model: tuple[str, ...],
        image_digest: bytes,
        detail: str | None = None,
        credential: bytes = b"",
    ) -> bytes:
        """Cache key over the reader (``_key_model``), the prompt, the image identity, the
        detail asked for and the credential scope (``b""``: shared), each field length-prefixed.
        """
        if key_model[0] == "local":
            detail = ""  # the engine reads every image at its own resolution
        elif detail is None:
            detail = "auto"  # what the OCR model assumes when none is given
        h = hashlib.sha256(_KEY_VERSION)
        fields: list[bytes] = [part.encode("utf-8", "surrogatepass") for part in key_model]
        fields += [self._prompt_digest, image_digest, detail.encode("utf-8", "surrogatepass")]
        fields.append(credential)
        for value in fields:
            h.update(len(value).to_bytes(8, "big"))
            h.update(value)
        return h.digest()

    def credential(self, client_headers: Mapping[str, str]) -> bytes:
        """The credential part of the cache key: the client's under ``per_key``, else none."""
        if not self.per_key:
            return b""
        # As ``[auth]`` compares it: the scheme's case and spaces around the key do not count.
        scheme, _, value = client_headers.get("Authorization", "").partition(" ")
        return credential_digest(f"{scheme.lower()} {value.strip()}")

    def check_model(self, model: str) -> None:
        """Refuse an OCR model before any work: 404 if unrouted, 400 if the engine can't run."""
        if model != self.settings.local_alias:
            self.router.route(model)
            return
        problem = self.engine.problem() if self.engine else local.INSTALL_HINT
        if problem is not None:
            raise BadRequest(problem, code="ocr_model_unavailable")

    def _key_model(self, model: str) -> tuple[str, ...]:
        """The reader as the cache key knows it: a remote model by name, the local engine by
        name and version (a separate kind, so no model name can spell it)."""
        if model != self.settings.local_alias:
            return ("remote", model)
        self.check_model(model)
        assert self.engine is not None
        return ("local", model, self.engine.cache_tag())

    def memory_hits(
        self, images: list[Image], model: str, client_headers: Mapping[str, str]
    ) -> dict[bytes, Outcome]:
        """The data-URL images among ``images`` whose description is in memory, by digest.

        Answered without a task each: the usual case for a chat that sends its images again
        every turn. What is not found here is looked up in the tier and described later. An
        image is looked up at its first appearance's ``detail``, as ``describe_all`` does.
        """
        key_model = self._key_model(model)
        credential = self.credential(client_headers)
        hits: dict[bytes, Outcome] = {}
        seen: set[bytes] = set()
        for image in images:
            if image.is_data and image.error is None and image.digest not in seen:
                seen.add(image.digest)
                key = self.key(key_model, image.digest, image.detail, credential)
                hit = self.cache.get_memory(key)
                if hit is not None:
                    hits[image.digest] = Outcome(image.digest, hit, True)
        return hits

    async def describe_all(
        self,
        images: list[Image],
        model: str,
        client_headers: Mapping[str, str],
        hits: dict[bytes, Outcome] | None = None,
    ) -> OcrReport:
        """Describe every distinct image concurrently; raise OcrFailed only under ``fail``.

        ``hits`` are ``memory_hits`` found earlier; images not among them are validated first.
        """
        started = time.monotonic()
        distinct: dict[bytes, Image] = {}
        for image in images:
            distinct.setdefault(image.digest, image)
        if hits is not None and all(digest in hits for digest in distinct):  # all known
            return OcrReport(model, dict(hits), (time.monotonic() - started) * 1000)
        create: Callable[[Image], Awaitable[Description]]
        key_model = self._key_model(model)
        credential = self.credential(client_headers)
        flight_scope = b""  # who may share a flight, beyond the cache key
        if model == self.settings.local_alias:
            create = functools.partial(self._read, model=model)
        else:
            up = self.router.route(model)
            auth = upstream.auth_header(client_headers, up, relay_auth=not self.client_keys)
            create = functools.partial(self._call, model=model, up=up, auth=auth)
            if auth is not None and not up.api_key and not credential:
                # The client's own key pays for the call: its refusal is its own business.
                flight_scope = credential_digest(auth)
        rest = [im for digest, im in distinct.items() if hits is None or digest not in hits]
        found = {**(hits or {}), **self.memory_hits(rest, model, client_headers)}
        pending = [image for digest, image in distinct.items() if digest not in found]
        await validate(pending, self.settings)
        if pending:
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(
                            self._one(image, model, create, key_model, credential, flight_scope)
                        )
                        for image in pending
                    ]
            except BaseExceptionGroup as group_error:
                # Under `fail` the first failure cancelled the rest: report that one.
                raise group_error.exceptions[0] from None
            for task in tasks:
                outcome = task.result()
                found[outcome.digest] = outcome
        return OcrReport(model, found, (time.monotonic() - started) * 1000)

    async def _one(
        self,
        image: Image,
        model: str,
        create: Callable[[Image], Awaitable[Description]],
        key_model: tuple[str, ...],
        credential: bytes,
        flight_scope: bytes,
    ) -> Outcome:
        if image.error is not None:  # a remote image that could not be fetched
            return Outcome(image.digest, None, False, image.error)
        key = self.key(key_model, image.digest, image.detail, credential)
        flight = hashlib.sha256(key + flight_scope).digest() if flight_scope else None
        try:
            description, cached = await self.cache.get_or_create(key, lambda: create(image), flight)
        except OcrError as exc:
            log.warning(
                "OCR failed for %s: %s",
                image.where,
                exc,
                extra={"fields": {"ocr_model": model, "image": image.digest.hex()[:16]}},
            )
            if self.settings.on_error == "fail":
                raise OcrFailed(f"Image analysis failed for `{image.where}`: {exc}") from None
            return Outcome(image.digest, None, False, str(exc))
        return Outcome(image.digest, description, cached)

    def _body(self, image: Image, model: str) -> bytes | _Pieces:
        """The OCR request body: bytes, or pieces to send one after another for a long URL.

        A data URL's characters go into the JSON as they are: they were a JSON string's
        content without escapes in the client's body (or the fetcher made them).
        """
        if not image.is_data:
            return self._encode(image, model, image.url)
        url = image.data
        if not image.json_safe:  # the client's URL had JSON escapes: encode it properly
            return self._encode(image, model, bytes(url).decode("utf-8", "replace"))
        body = self._encode(image, model, "")
        split = body.index(_URL_MARK) + len(_URL_MARK) - 1
        head, tail = body[:split], body[split:]
        if len(url) < upstream.PIECE:
            return b"".join((head, url, tail))
        return _Pieces(head, url, tail)

    def _encode(self, image: Image, model: str, url: str) -> bytes:
        image_url: dict[str, str] = {"url": url}
        if image.detail:
            image_url["detail"] = image.detail
        return encoder.encode(
            {
                "model": model,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": self.settings.prompt},
                            {"type": "image_url", "image_url": image_url},
                        ],
                    }
                ],
                "max_tokens": self.settings.max_tokens,
                "stream": False,
            }
        )

    async def _call(
        self, image: Image, model: str, up: config.Upstream, auth: str | None
    ) -> Description:
        started = time.monotonic()
        try:
            description = await self._request(image, model, up, auth)
        except OcrError:
            if self.on_call is not None:
                self.on_call(model, False, time.monotonic() - started)
            raise
        if self.on_call is not None:
            self.on_call(model, True, time.monotonic() - started)
        return description

    async def _request(
        self, image: Image, model: str, up: config.Upstream, auth: str | None
    ) -> Description:
        headers = upstream.call_headers(up, auth)
        body = self._body(image, model)
        if isinstance(body, _Pieces):
            headers["Content-Length"] = str(body.size)
        target = upstream.url(up, "chat/completions")
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        limit = self.settings.timeout_s
        deadline = loop.time() + limit
        attempt = 0
        queued = True
        waited = 0.0  # in the queue for a slot, over all attempts
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    queued, asked = True, loop.time()
                    async with self.semaphore:
                        queued = False
                        waited += loop.time() - asked
                        try:
                            status, payload, retry_after = await self._attempt(
                                target, body, headers
                            )
                        except _Retryable as exc:
                            error, retry_after = OcrError(str(exc)), None
                        else:
                            if status == 200:
                                break
                            reason = self._reason(payload)
                            error = OcrError(f"the OCR model answered HTTP {status}: {reason}")
                            if status not in RETRY_STATUSES:
                                raise error
                    if attempt >= self.settings.retries:
                        raise error
                    backoff = self.settings.retry_backoff_s * (2**attempt)
                    delay = backoff * random.uniform(0.5, 1.5)
                    if retry_after is not None:
                        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
                    if loop.time() + delay >= deadline:  # no time left for another try
                        raise error
                    attempt += 1
                    fields = {"reason": str(error), "delay": delay}
                    log.debug("OCR call retried", extra={"fields": fields})
                    await asyncio.sleep(delay)
        except TimeoutError:
            if queued:
                raise OcrError(
                    f"the OCR model is busy: no call slot came free within {limit:g} s"
                ) from None
            note = f" ({waited:.1f} s of it waiting for a call slot)" if waited >= 0.1 else ""
            raise OcrError(f"the OCR model did not answer within {limit:g} s{note}") from None
        ms = (time.monotonic() - started) * 1000
        try:
            answer = ocr_response_decoder.decode(payload)
        except msgspec.DecodeError:
            raise OcrError("the OCR model's answer is not a chat completion") from None
        text = answer.choices[0].message.content if answer.choices else None
        if not text or not text.strip():
            raise OcrError("the OCR model returned an empty description")
        usage = answer.usage or OcrUsage()
        description = Description(
            text=text.strip(),
            model=model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )
        log.debug(
            "OCR call done",
            extra={
                "fields": {
                    "ocr_model": model,
                    "image": image.digest.hex()[:16],
                    "image_bytes": image.size,
                    "ms": round(ms, 1),
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                }
            },
        )
        return description

    async def _attempt(
        self, target: str, body: bytes | _Pieces, headers: dict[str, str]
    ) -> tuple[int, bytes, float | None]:
        """One HTTP call (the caller holds a concurrency slot and the deadline): (status,
        body, Retry-After seconds). A body is read up to its bound, never whole."""
        try:
            data = body.chunks() if isinstance(body, _Pieces) else body
            async with self.session.post(
                target, data=data, headers=headers, allow_redirects=False
            ) as resp:
                ok = resp.status == 200
                payload, whole = await _read_bounded(
                    resp, self.answer_limit if ok else ERROR_BODY_LIMIT
                )
                if not whole:
                    resp.close()  # drop the connection rather than drain the rest
                    if ok:
                        raise OcrError(
                            "the OCR model's answer is too large "
                            f"(more than {self.answer_limit} bytes)"
                        )
                return resp.status, payload, _retry_after(resp.headers)
        except aiohttp.ClientConnectionError as exc:
            raise _Retryable(f"the OCR upstream is unreachable ({type(exc).__name__})") from None
        except aiohttp.ClientError as exc:
            raise OcrError(f"the OCR call failed ({type(exc).__name__})") from None

    async def _read(self, image: Image, model: str) -> Description:
        """The local engine's reading of one image (the OCR model is the local alias)."""
        assert self.engine is not None
        if not image.is_data:
            raise OcrError(
                "the local OCR engine does not fetch remote images unless [ocr] fetch_images is "
                "enabled; send the image as a data: URL"
            )
        load = functools.partial(decode_data_url, image.data, image.where)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                text = await self.engine.recognize(load, head=load)  # load(n): its first n bytes
        except TimeoutError:
            limit = self.settings.timeout_s
            raise OcrError(f"the local OCR engine did not finish within {limit:g} s") from None
        except local.RecognitionError as exc:
            raise OcrError(f"the local OCR engine failed: {exc}") from None
        except local.Unavailable as exc:
            raise BadRequest(str(exc), code="ocr_model_unavailable") from None
        log.debug(
            "local OCR done",
            extra={
                "fields": {
                    "ocr_model": model,
                    "image": image.digest.hex()[:16],
                    "image_bytes": image.size,
                    "ms": round((time.monotonic() - started) * 1000, 1),
                    "chars": len(text),
                }
            },
        )
        return Description(text=local.as_description(self.engine.name, text), model=model)

    def _reason(self, payload: bytes) -> str:
        """A short, redacted reason from an upstream error body."""
        try:
            message = msgspec.json.decode(payload)["error"]["message"]
            text = message if isinstance(message, str) else str(message)
        except (msgspec.DecodeError, KeyError, TypeError):
            text = payload[:200].decode("utf-8", "replace")
        return redact(text[:300], self.secrets)

"""The OCR model over HTTP: one call per image, in the API its upstream speaks, with retries.

Theory of operation: the request body is the OCR model's dialect's (``OcrCall.ocr_request``):
the analysis prompt, the image and a bounded ``max_tokens``, non-streaming. A long base64 text
is sent a piece at a time straight from the client's own body (or the fetcher's encoding), so
the body is never held as one more copy of the image. Calls run under one semaphore
(``max_concurrency``). One deadline, ``timeout_s``, covers everything a call does for its
image: the wait for a slot, every attempt and the pauses between retries; an image whose slot
does not come free in time fails at its deadline instead of queueing behind a hung model.
Rate limits and transient trouble are retried with jittered backoff (and ``Retry-After``, up
to MAX_RETRY_AFTER). The answer is read up to ``answer_limit`` bytes, never whole, and its
text and token counts read in the dialect's shape. Every failure names its ``reasons.Reason``
(``OcrError.reason``): the words the model reads in the image's placeholder.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from . import config, timeline, upstream
from .cache import Description
from .dialects import OcrCall, reason
from .dialects.registry import BY_API
from .images import Image
from .logs import redact
from .reasons import Reason, for_status

log = logging.getLogger("ocrproxy.describe")

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


class OcrError(Exception):
    """Describing one image failed; the message is safe to log and to show, the ``reason``
    (fixed words) to put in the image's placeholder."""

    def __init__(self, message: str, reason: Reason = Reason.OCR_FAILED) -> None:
        super().__init__(message)
        self.reason = reason


class _Retryable(Exception):
    """A failure before any answer (connection refused or reset): safe to try again."""


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


class RemoteReader:
    """Describes images with an OCR model behind an upstream, with bounded concurrency."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: config.Ocr,
        secrets: tuple[str, ...] = (),
        on_call: Callable[[str, bool, float], None] | None = None,
    ) -> None:
        self.session = session
        self.settings = settings
        self.secrets = secrets
        self.answer_limit = max(ANSWER_LIMIT, ANSWER_BYTES_PER_TOKEN * settings.max_tokens)
        self.semaphore = asyncio.Semaphore(settings.max_concurrency)
        self.on_call = on_call  # (model, ok, seconds): metrics

    def _body(self, dialect: OcrCall, image: Image, model: str) -> bytes | _Pieces:
        """The OCR request body: bytes, or pieces to send one after another for a long one."""
        head, middle, tail = dialect.ocr_request(model, self.settings, image)
        if len(middle) < upstream.PIECE:
            return b"".join((head, middle, tail))
        return _Pieces(head, middle, tail)

    async def read(
        self, image: Image, model: str, up: config.Upstream, auth: Mapping[str, str]
    ) -> Description:
        started = time.monotonic()
        try:
            description = await self._request(image, model, up, auth)
        except OcrError as exc:
            self._called(model, image, started, ok=False, reason=exc.reason.name)
            raise
        self._called(
            model,
            image,
            started,
            ok=True,
            input_tokens=description.prompt_tokens,
            output_tokens=description.completion_tokens,
        )
        return description

    def _called(
        self, model: str, image: Image, started: float, *, ok: bool, **outcome: str | int
    ) -> None:
        """One OCR call ended: to the metrics and to the live page's timeline."""
        took = time.monotonic() - started
        if self.on_call is not None:
            self.on_call(model, ok, took)
        named = image.digest.hex()[:12]  # which image, never its bytes
        timeline.step(
            "ocr", model=model, image=named, ok=ok, took_ms=round(took * 1000, 2), **outcome
        )

    async def _request(
        self, image: Image, model: str, up: config.Upstream, auth: Mapping[str, str]
    ) -> Description:
        dialect = BY_API[up.api]
        headers = upstream.call_headers(up, auth)
        body = self._body(dialect, image, model)
        if isinstance(body, _Pieces):
            headers["Content-Length"] = str(body.size)
        target = upstream.url(up, dialect.path)
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
                            timeline.step("ocr_attempt", attempt=attempt + 1, status=None)
                        else:
                            timeline.step("ocr_attempt", attempt=attempt + 1, status=status)
                            if status == 200:
                                break
                            reason = self._reason(payload)
                            error = OcrError(
                                f"the OCR model answered HTTP {status}: {reason}",
                                for_status(status),
                            )
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
                    f"the OCR model is busy: no call slot came free within {limit:g} s",
                    Reason.OCR_BUSY,
                ) from None
            note = f" ({waited:.1f} s of it waiting for a call slot)" if waited >= 0.1 else ""
            raise OcrError(
                f"the OCR model did not answer within {limit:g} s{note}", Reason.TIMED_OUT
            ) from None
        ms = (time.monotonic() - started) * 1000
        answer = dialect.ocr_answer(payload)
        if answer is None:
            raise OcrError(f"the OCR model's answer is not a {dialect.answer_name}") from None
        text, input_tokens, output_tokens = answer
        if not text.strip():
            raise OcrError("the OCR model returned an empty description")
        description = Description(
            text=text.strip(),
            model=model,
            prompt_tokens=input_tokens,
            completion_tokens=output_tokens,
        )
        log.debug(
            "OCR call done",
            extra={
                "fields": {
                    "ocr_model": model,
                    "image": image.digest.hex()[:16],
                    "image_bytes": image.size,
                    "ms": round(ms, 1),
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                }
            },
        )
        return description

    async def _attempt(
        self, target: str, body: bytes | _Pieces, headers: Mapping[str, str]
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

    def _reason(self, payload: bytes) -> str:
        """A short, redacted reason from an upstream error body."""
        return redact(reason(payload)[:300], self.secrets)

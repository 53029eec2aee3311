"""The OCR step: every distinct image of a request described at once, through the cache.

Theory of operation: the images of a request are grouped by identity, so an image sent twice is
described once (at the ``detail`` of its first appearance). Each distinct image goes through the
description cache (memory LRU, shared tier, single-flight), and only a miss asks a reader: the
OCR model over HTTP (``ocr_remote``, in the API of the upstream the model routes to) or the
built-in engine (``local``). A failure never escapes as an exception unless the policy is
``fail``: under ``placeholder`` the image gets a short note saying it could not be analysed,
and why in a few fixed words (``Outcome.reason``, named where the failure happened).

A cache key is a hash of length-prefixed fields: the kind of reader (the OCR model over HTTP, or
the local engine and its version), the model name, the prompt, the image, the ``detail`` the
OCR model is asked for (absent and ``auto`` are one), and under ``[cache] scope = "per_key"``
a hash of the client's credential (``Authorization`` or ``x-api-key``). No field's text can
stand for another field, so no ``ocr_model`` string can reach the local engine's entries.
Under the default ``shared`` scope a cache hit tells any client that someone sent the image
within the TTL. Single-flight joins callers of one key; when the OCR call carries the
client's own key (relay mode), only callers with the same key share a flight, so a client the
upstream refuses fails nobody else's image (a successful answer is still cached for everyone).

The OCR model named by ``[ocr] local_alias`` is not called over HTTP: a built-in engine
(``[ocr.local] engine``: Tesseract, ``local.py``, or RapidOCR, ``local_rapid.py``) reads the
image's text instead, through the same cache (its key names the engine, its version, its
languages or model files, and its settings) and into the same reference block, at no token cost.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from . import config, local, timeline, upstream
from .cache import Description, DescriptionCache
from .errors import BadRequest, OcrFailed
from .images import Image, decode_payload, validate
from .ocr_remote import OcrError, RemoteReader
from .reasons import Reason

log = logging.getLogger("ocrproxy.describe")


_KEY_VERSION = b"ocrproxy/3\0"  # 3: fields length-prefixed; detail and credential scope added


def credential_digest(value: str) -> bytes:
    """A hash standing for a client's credential in cache and flight keys (never the value)."""
    raw = value.encode("utf-8", "surrogatepass")
    return hashlib.sha256(b"ocrproxy/credential\0" + raw).digest()


@dataclass(slots=True)
class Outcome:
    """The result for one distinct image of a request."""

    digest: bytes
    description: Description | None
    cached: bool
    error: str | None = None  # what went wrong, for the log
    reason: Reason | None = None  # the same, in the fixed words the model reads


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
        """What the OCR step cost, in neutral words (each dialect renames them)."""
        paid = [o.description for o in self.outcomes.values() if o.description and not o.cached]
        return {
            "model": self.model,
            "images": self.images,
            "cache_hits": self.cache_hits,
            "failures": self.failures,
            "input_tokens": sum(d.prompt_tokens for d in paid),
            "output_tokens": sum(d.completion_tokens for d in paid),
        }


class Describer:
    """Calls the OCR model for images, through the cache, with bounded concurrency."""

    def __init__(
        self,
        reader: RemoteReader,
        router: upstream.Router,
        settings: config.Ocr,
        cache: DescriptionCache,
        engine: local.LocalEngine | None = None,
        *,
        client_keys: bool = False,
        scope: str = "shared",
    ) -> None:
        self.reader = reader
        self.engine = engine
        self.router = router
        self.settings = settings
        self.cache = cache
        self.client_keys = client_keys  # [auth] keys set: never relay the client's key
        self.per_key = scope == "per_key"  # [cache] scope: entries private to a credential
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
        return credential_digest(upstream.client_credential(client_headers) or "")

    def check_model(self, model: str) -> None:
        """Refuse an OCR model before any work: 404 if unrouted, 400 if the engine can't run."""
        if model != self.settings.local_alias:
            self.router.route(model, None)
            return
        problem = self.engine.problem() if self.engine else local.INSTALL_HINT
        if problem is not None:
            raise BadRequest(problem, code="ocr_model_unavailable")

    @staticmethod
    def _may_relay(up: config.Upstream, home: config.Upstream | None) -> bool:
        """Whether the client's own key may go to ``up`` (relay mode): only to the upstream the
        request is for, so a key for one vendor never reaches another; an OCR upstream of its
        own without an api_key is called with no credentials (a local model needs none)."""
        return home is None or up is home

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
        home: config.Upstream | None = None,
    ) -> OcrReport:
        """Describe every distinct image concurrently; raise OcrFailed only under ``fail``.

        ``hits`` are ``memory_hits`` found earlier; images not among them are validated first.
        ``home`` is the upstream the request is for: the only one the client's own key may go
        to (relay mode).
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
            up = self.router.route(model, None)
            relay = not self.client_keys and self._may_relay(up, home)
            auth = upstream.auth_headers(client_headers, up, relay_auth=relay)
            create = functools.partial(self.reader.read, model=model, up=up, auth=auth)
            relayed = upstream.client_credential(client_headers)
            if auth and not up.api_key and not credential and relayed:
                # The client's own key pays for the call: its refusal is its own business.
                flight_scope = credential_digest(relayed)
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
            return Outcome(image.digest, None, False, image.error, image.reason)
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
            return Outcome(image.digest, None, False, str(exc), exc.reason)
        return Outcome(image.digest, description, cached)

    async def _read(self, image: Image, model: str) -> Description:
        """The local engine's reading of one image (the OCR model is the local alias)."""
        assert self.engine is not None
        if not image.is_data:
            raise OcrError(
                "the local OCR engine does not fetch remote images unless [ocr] fetch_images is "
                "enabled; send the image as a data: URL",
                Reason.DOWNLOAD_REFUSED,
            )
        load = functools.partial(decode_payload, image.payload, image.where)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                text = await self.engine.recognize(load, head=load)  # load(n): its first n bytes
        except TimeoutError:
            limit = self.settings.timeout_s
            raise OcrError(
                f"the local OCR engine did not finish within {limit:g} s", Reason.TIMED_OUT
            ) from None
        except local.RecognitionError as exc:
            raise OcrError(f"the local OCR engine failed: {exc}") from None
        except local.Unavailable as exc:
            raise BadRequest(str(exc), code="ocr_model_unavailable") from None
        took_ms = round((time.monotonic() - started) * 1000, 2)
        named = image.digest.hex()[:12]
        timeline.step("ocr", model=model, image=named, ok=True, took_ms=took_ms, engine="local")
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

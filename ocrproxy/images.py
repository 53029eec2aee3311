"""Images, whatever dialect carried them: identity, limits, decoding, and remote fetches.

Theory of operation: a dialect module finds the images of its request and hands over neutral
records (``Image``): base64 text plus its media type, or a URL, and where the request holds
it. Nothing of a dialect's shapes is known here. Base64 is never decoded into a ``str``:
``Image.payload`` is a view of its characters inside the client's body (a copy only if the
client's JSON escaped any of them), hashed, checked and sent to the OCR model from there.

An image's identity is the sha256 of its base64 text (the payload of its data URL, without the
``data:...;base64,`` header). Canonical base64, the only kind accepted, spells given bytes one
way, so this is an identity of the bytes that needs no decoding: a cache hit never decodes its
image. Canonical means strict (the standard alphabet, no whitespace, padding only at the end),
padded to a multiple of 4 characters, and with the unused low bits of the last character zero
(``binascii`` ignores them, so ``QR==`` would decode like ``QQ==``): only the last 4
characters can break that, so it is checked for every image, cache hit or not (``identify``).
With ``fetch_images`` on (the default) a remote image is downloaded by ``fetch.Fetcher`` (SSRF
rules, size and time limits there) and becomes base64 text (``payload``), so the OCR model
never fetches anything, a signed URL that changes on every turn still hits the cache, and a
fetched image shares its description with the same bytes sent inline; with it off, a remote
image's identity is its URL string.

Every image, sent or fetched, must be a PNG, JPEG, GIF or WebP by its magic bytes, at most
``max_image_bytes`` decoded and ``max_image_pixels`` by its header; a request carries at most
``max_images`` images. The count, the data URL's header and the size (from the base64 length)
are checked for every image (``identify``); decoding, the base64 itself and the format and
dimensions are checked for every image that is not already described in memory (``validate``),
before any OCR call starts. The format and dimensions are read from the decoded pieces as they
go by (``sniff.Reader``), so a JPEG's frame header is found wherever it is, after any amount of
EXIF. A client's own bad image is its error (400/413); a remote image that
cannot be used follows ``on_error``: the image gets a placeholder, or the request fails.

Hashing and decoding megabytes would stall the event loop, so large payloads are handled in a
worker thread: ``hashlib`` releases the GIL while it hashes, and ``binascii`` (which holds it)
decodes in pieces, a short call each, so the loop takes the GIL back between pieces; no decoded
copy of a whole image is ever held.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from . import config, sniff, timeline
from .errors import BadRequest, InvalidImage, PayloadTooLarge, ProxyError, UpstreamError
from .fetch import Budget, Fetched, Fetcher, FetchError
from .reasons import Reason

# Below this many characters of base64, hashing or decoding on the loop beats a thread hop.
THREAD_THRESHOLD = 64 * 1024
# Base64 is decoded and hashed this many characters at a time (a multiple of 4).
PIECE = 256 * 1024

str_decoder = msgspec.json.Decoder(str)
_OCTET = "application/octet-stream"
_BACKSLASH = re.compile(rb"\\")
_PADDING = re.compile(rb"=")
_DEFAULTS = config.Ocr()

log = logging.getLogger("ocrproxy.images")


@dataclass(slots=True)
class Image:
    """An image a request carries, in any dialect, in order of appearance.

    Neutral: base64 text plus its media type, or a URL. Where it sits in the request is the
    dialect's business: ``where`` names it in the dialect's own terms for error messages and
    logs, and the dialect keeps its own map from its images to their places.
    """

    where: str  # e.g. ``messages[0].content[1]``
    url: str = ""  # a remote image's URL (kept after it was fetched); "" for an inline image
    is_data: bool = True  # inline base64 (sent, or fetched): ``payload`` holds it
    # The base64 text, as bytes: for an image the client sent, a view into the client's own
    # body (never copied into a str); for a fetched one, the encoding the proxy made.
    payload: bytes | memoryview = b""
    media_type: str = ""  # as declared; once decoded and checked, as its bytes say
    detail: str | None = None
    digest: bytes = b""
    size: int = 0  # decoded bytes (from the base64 length until ``validate`` decoded it)
    error: str | None = None  # why a remote image cannot be used: it gets a placeholder
    reason: Reason | None = None  # the same, in the fixed words the placeholder says
    checked: bool = False  # decoded and its format and dimensions checked (``validate``)
    json_safe: bool = True  # ``payload`` can go into a JSON string as it is (no escapes)

    def data_url_head(self) -> bytes:
        """What goes before ``payload`` to make it a data URL."""
        return b"data:" + self.media_type.encode() + b";base64,"


def decode_raw(decoder: msgspec.json.Decoder[Any], raw: msgspec.Raw | bytes, where: str) -> Any:
    """``raw`` decoded, or a 400 naming ``where``: for dialects walking a request."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError:
        raise BadRequest(f"`{where}` has the wrong type", param=where) from None
    except msgspec.DecodeError:
        raise BadRequest(f"`{where}` is not valid JSON", param=where) from None


def raw_string_bytes(raw: msgspec.Raw, where: str) -> tuple[bytes | memoryview, bool]:
    """A raw JSON string's characters, and whether they can go into JSON as they are: a view
    into the raw string, unless it has escapes (then decoded: a copy, and maybe unsafe)."""
    inner = memoryview(raw)[1:-1]
    if _BACKSLASH.search(inner) is None:
        return inner, True
    return str(decode_raw(str_decoder, raw, where)).encode(), False


def too_many(count: str, limit: int, param: str = "messages") -> BadRequest:
    return BadRequest(
        f"The request has {count} images; the limit is {limit}",
        param=param,
        code="too_many_images",
    )


def inline(where: str, payload: bytes | memoryview, media_type: str, safe: bool) -> Image:
    """An image sent as base64 with its declared media type; refused unless it is an image."""
    media_type = media_type.strip().lower()
    if media_type and not media_type.startswith("image/") and media_type != _OCTET:
        raise InvalidImage(f"`{where}` has media type {media_type!r}, not an image", param=where)
    return Image(where, payload=payload, media_type=media_type, json_safe=safe)


def from_data_url(where: str, url: bytes | memoryview, safe: bool = True) -> Image:
    """An image sent as a ``data:`` URL (its header checked here, its payload later)."""
    media_type, start = _data_url_header(url, where)
    return Image(where, payload=memoryview(url)[start:], media_type=media_type, json_safe=safe)


def _data_url_header(url: bytes | memoryview, where: str) -> tuple[str, int]:
    """A ``data:`` URL's media type and where its base64 payload begins, once its header is
    found valid for an image."""
    head = bytes(memoryview(url)[:1024])
    comma = head.find(b",")
    if comma < 0:
        raise InvalidImage(f"`{where}` is a malformed data URL (no comma)", param=where)
    params = head[5:comma].decode("utf-8", "replace").split(";")
    media_type = params[0].strip().lower()
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise InvalidImage(f"`{where}` data URL must be base64-encoded", param=where)
    if media_type and not media_type.startswith("image/") and media_type != _OCTET:
        raise InvalidImage(
            f"`{where}` data URL has media type {media_type!r}, not an image", param=where
        )
    return media_type, comma + 1


def _payload(url: str | bytes | memoryview, where: str) -> memoryview:
    """The base64 payload of a ``data:`` URL whose header is valid for an image."""
    data = url.encode() if isinstance(url, str) else url
    return memoryview(data)[_data_url_header(data, where)[1] :]


# The value of each base64 character (0xFF: not one); only the last data character is looked up.
_B64_VALUES = bytes(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".find(bytes([c])) % 256
    for c in range(256)
)


def _check_canonical_end(payload: memoryview, where: str) -> None:
    """Refuse base64 that is not padded, or whose last character has unused bits set: the two
    ways strict base64 can still spell the same bytes differently. O(1): only the end counts."""
    n = len(payload)
    if n % 4:
        raise InvalidImage(
            f"`{where}` data URL payload is not valid base64 (it must be padded with `=` to a "
            f"multiple of 4 characters)",
            param=where,
        )
    if n and payload[n - 1] == 0x3D:  # "=": the last data character has 2 or 4 unused bits
        last, unused = (payload[n - 3], 0x0F) if payload[n - 2] == 0x3D else (payload[n - 2], 0x03)
        if _B64_VALUES[last] & unused:
            raise InvalidImage(
                f"`{where}` data URL payload is not canonical base64 (the unused bits of its "
                f"last character must be zero)",
                param=where,
            )


def _text_digest(payload: bytes | memoryview) -> bytes:
    """sha256 of the base64 text (no copy; hashlib lets go of the GIL for large ones)."""
    return hashlib.sha256(payload).digest()


def decode_data_url(url: str | bytes | memoryview, where: str, limit: int | None = None) -> bytes:
    """``decode_payload`` of a ``data:`` URL's payload."""
    return decode_payload(_payload(url, where), where, limit)


def decode_payload(payload: bytes | memoryview, where: str, limit: int | None = None) -> bytes:
    """The decoded bytes of base64 text; InvalidImage naming ``where`` if malformed.

    With ``limit``: only its first ``limit`` bytes or a little more (whole 4-character groups,
    which decode alone), or all of it if it is not longer; a cut-off prefix is not checked for
    canonical padding, which only its end could break.
    """
    payload = memoryview(payload)
    if limit is not None and -(-limit // 3) * 4 < len(payload):
        payload = payload[: -(-limit // 3) * 4]
    else:
        _check_canonical_end(payload, where)
    try:
        data = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"`{where}` data URL payload is not valid base64", param=where) from None
    if not data:
        raise InvalidImage(f"`{where}` data URL is empty", param=where)
    return data


def check_data_url(url: str | bytes | memoryview, where: str) -> tuple[int, sniff.Reader]:
    """``check_payload`` of a ``data:`` URL's payload."""
    return check_payload(_payload(url, where), where)


def check_payload(payload: bytes | memoryview, where: str) -> tuple[int, sniff.Reader]:
    """(decoded size, what its bytes say) of base64 text, decoded piece by piece.

    Every decoded piece goes through a ``sniff.Reader`` (the format and dimension checks) and is
    dropped: a JPEG's frame header is found in whichever piece holds it.

    Accepts and refuses exactly what ``decode_payload`` does: every piece but the last is a
    whole number of 4-character groups, so it decodes alone; padding may only be in the last.
    """
    payload = memoryview(payload)
    _check_canonical_end(payload, where)
    size = 0
    reader = sniff.Reader()
    end = len(payload)
    while end and payload[end - 1] == 0x3D and len(payload) - end < 2:  # trailing "=" padding
        end -= 1  # always goes with the last piece
    try:
        for start in range(0, end, PIECE) or (0,):
            last = start + PIECE >= end
            piece = payload[start:] if last else payload[start : start + PIECE]
            if not last and _PADDING.search(piece):
                raise ValueError("padding before the end")
            data = binascii.a2b_base64(piece, strict_mode=True)
            reader.feed(data)
            size += len(data)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"`{where}` data URL payload is not valid base64", param=where) from None
    if not size:
        raise InvalidImage(f"`{where}` data URL is empty", param=where)
    return size, reader


def check_image(
    data: bytes | sniff.Reader, where: str, settings: config.Ocr, size: int | None = None
) -> sniff.Sniffed:
    """Apply the byte, format and dimension limits to a client's image (413 / 400).

    ``data`` is the image, or a ``sniff.Reader`` that was fed all of it (then ``size`` gives
    its decoded size).
    """
    if isinstance(data, bytes):
        size = len(data) if size is None else size
        reader = sniff.Reader()
        reader.feed(data)
    else:
        reader = data
    assert size is not None
    if size > settings.max_image_bytes:
        raise PayloadTooLarge(
            f"`{where}` is {size} bytes, more than the limit of "
            f"{settings.max_image_bytes} bytes per image",
            param=where,
        )
    try:
        return reader.inspect(settings.max_image_pixels)
    except sniff.ImageRejected as exc:
        raise InvalidImage(f"`{where}` {exc}", param=where) from None


def _identify(images: list[Image], settings: config.Ocr = _DEFAULTS) -> None:
    for image in images:
        if image.is_data:
            payload = memoryview(image.payload)
            length = len(payload)
            _check_canonical_end(payload, image.where)
            tail = bytes(payload[-2:])
            image.size = length // 4 * 3 - tail.endswith(b"=") - tail.endswith(b"==")
            if image.size > settings.max_image_bytes:
                raise PayloadTooLarge(
                    f"`{image.where}` is larger than the limit of "
                    f"{settings.max_image_bytes} bytes per image",
                    param=image.where,
                )
            image.digest = _text_digest(payload)
        else:
            image.digest = hashlib.sha256(image.url.encode()).digest()


def _check(images: list[Image], settings: config.Ocr = _DEFAULTS) -> None:
    for image in images:
        image.size, reader = check_payload(image.payload, image.where)
        sniffed = check_image(reader, image.where, settings, size=image.size)
        image.media_type, image.checked = sniffed.media_type, True


async def _small_here_large_in_thread(
    work: Callable[[list[Image], config.Ocr], None], images: list[Image], settings: config.Ocr
) -> None:
    """``work`` for the small images on the event loop, for the large ones in a worker thread."""
    small = [im for im in images if len(im.payload) < THREAD_THRESHOLD]
    large = [im for im in images if len(im.payload) >= THREAD_THRESHOLD]
    work(small, settings)
    if large:
        await asyncio.to_thread(work, large, settings)


async def validate(images: list[Image], settings: config.Ocr = _DEFAULTS) -> None:
    """Decode every data URL among ``images`` not checked yet: valid base64, not empty, a known
    format within the size and pixel limits (400/413 otherwise). Large ones off the loop."""
    todo: dict[bytes, Image] = {}
    for image in images:
        if image.is_data and not image.checked:
            todo.setdefault(image.digest, image)
    await _small_here_large_in_thread(_check, list(todo.values()), settings)
    for image in images:  # the same text decodes the same way
        if image.is_data and not image.checked:
            done = todo[image.digest]
            image.size, image.checked, image.media_type = done.size, done.checked, done.media_type


def _refusal(image: Image, exc: FetchError) -> ProxyError:
    message = f"The image at `{image.where}` could not be used: {exc}"
    if exc.status == 413:
        return PayloadTooLarge(message, param=image.where)
    if exc.status == 400:
        return InvalidImage(message, param=image.where, code="image_url_refused")
    return UpstreamError(message, param=image.where, code="image_fetch_failed")


def _adopt(image: Image, fetched: Fetched) -> None:
    image.payload = base64.b64encode(fetched.data)  # from here on, it is inline
    image.media_type, image.is_data = fetched.media_type, True
    image.size = len(fetched.data)
    image.digest = _text_digest(image.payload)
    image.checked = True  # the fetcher checked its format and dimensions


async def _fetch_all(
    images: list[Image], settings: config.Ocr, fetcher: Fetcher, budget: Budget
) -> None:
    """Download every distinct remote URL once, and adopt (or refuse) the bytes.

    At most ``max_fetches_per_request`` downloads run at once, well below the fetcher's pool, so
    one request full of slow URLs leaves connections for every other request. A URL's time
    limit starts when its download does, not while it waits for one of the request's turns.
    """
    by_url: dict[str, list[Image]] = {}
    for image in images:
        by_url.setdefault(image.url, []).append(image)
    turns = asyncio.Semaphore(settings.max_fetches_per_request)

    async def one(url: str) -> Fetched | FetchError:
        try:
            async with turns:
                return await fetcher.fetch(url, budget)
        except FetchError as exc:
            error = exc
        except Exception:  # a bug must not crash the request: treat it as a failed fetch
            log.exception("unexpected error while fetching an image")
            error = FetchError("the image could not be downloaded")
        where = by_url[url][0].where
        log.warning("image fetch failed for %s: %s", where, error)
        timeline.step("fetch", ok=False, reason=error.reason.name if error.reason else None)
        if settings.on_error == "fail":  # fail fast: the task group cancels the other fetches
            raise _refusal(by_url[url][0], error)
        return error

    try:
        async with asyncio.TaskGroup() as group:
            tasks = {url: group.create_task(one(url)) for url in by_url}
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    for url, task in tasks.items():
        result = task.result()
        first = by_url[url][0]
        if isinstance(result, FetchError):
            digest = hashlib.sha256(b"ocrproxy/unfetched\0" + url.encode()).digest()
            for image in by_url[url]:
                image.error, image.reason, image.digest = str(result), result.reason, digest
            continue
        if len(result.data) >= THREAD_THRESHOLD:
            await asyncio.to_thread(_adopt, first, result)
        else:
            _adopt(first, result)
        for image in by_url[url][1:]:
            image.payload, image.is_data, image.checked = first.payload, True, True
            image.media_type, image.json_safe = first.media_type, first.json_safe
            image.size, image.digest = first.size, first.digest


async def identify(images: list[Image], settings: config.Ocr = _DEFAULTS) -> None:
    """Check the image count and every data URL's header and size; fill in digests (a remote
    image's: of its URL). Nothing is decoded here (``validate`` does that).

    Large payloads are hashed off the event loop.
    """
    if len(images) > settings.max_images:
        raise too_many(str(len(images)), settings.max_images)
    await _small_here_large_in_thread(_identify, images, settings)


async def fetch_remote(
    images: list[Image], settings: config.Ocr, fetcher: Fetcher, total_bytes: int
) -> None:
    """Download the remote images (after ``identify``); each becomes a checked data URL.

    Together they may not exceed ``total_bytes`` (the most a client could send inline).
    """
    remote = [im for im in images if not im.is_data]
    if remote:
        await _fetch_all(remote, settings, fetcher, Budget(total_bytes))

"""Find the images of a chat request and give each one a stable identity.

Theory of operation: every message of every role whose ``content`` is an array is scanned. A
part of type ``image_url`` whose ``image_url`` is ``{"url": ...}`` or a bare string is an image;
``data:`` URLs must carry base64 and decode cleanly, ``http(s)`` URLs are taken as they are.
Everything else in the request is kept as the raw bytes the client sent, so that ``rewrite``
can splice the descriptions in without touching anything it does not understand. A data URL is
never decoded into a ``str`` either: ``Image.data`` is a view of its characters inside the
client's body (a copy only if the client's JSON escaped any of them), hashed, checked and sent
to the OCR model from there.

An image's identity is the sha256 of its base64 text (the payload of its data URL, without the
``data:...;base64,`` header). Canonical base64, the only kind accepted, spells given bytes one
way, so this is an identity of the bytes that needs no decoding: a cache hit never decodes its
image. Canonical means strict (the standard alphabet, no whitespace, padding only at the end),
padded to a multiple of 4 characters, and with the unused low bits of the last character zero
(``binascii`` ignores them, so ``QR==`` would decode like ``QQ==``): only the last 4
characters can break that, so it is checked for every image, cache hit or not (``identify``).
With ``fetch_images`` on (the default) a remote image is downloaded by ``fetch.Fetcher`` (SSRF
rules, size and time limits there) and becomes a base64 data URL (``data``), so the OCR model
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
copy of a whole image is ever held. A large request's messages are scanned in a worker thread
too.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from . import config, sniff
from .errors import BadRequest, InvalidImage, PayloadTooLarge, ProxyError, UpstreamError
from .fetch import Budget, Fetched, Fetcher, FetchError
from .schema import RawObject, array_decoder, is_json, messages_decoder, object_decoder

# Below this many characters of base64, hashing or decoding on the loop beats a thread hop.
THREAD_THRESHOLD = 64 * 1024
# Messages at least this large (bytes of JSON) are scanned in a worker thread.
SCAN_THREAD_THRESHOLD = 1024 * 1024
# Base64 is decoded and hashed this many characters at a time (a multiple of 4).
PIECE = 256 * 1024

_str_decoder = msgspec.json.Decoder(str)
_BACKSLASH = re.compile(rb"\\")
_PADDING = re.compile(rb"=")
_DEFAULTS = config.Ocr()

log = logging.getLogger("ocrproxy.images")


@dataclass(slots=True)
class Part:
    """One element of a content array: a plain text part, an image, or anything else (raw)."""

    raw: msgspec.Raw
    text: str | None = None
    image: int | None = None


@dataclass(slots=True)
class Image:
    """An image found in the request, in order of appearance."""

    message: int
    part: int
    url: str  # a remote image's URL (kept after it was fetched); "" for an inline image
    is_data: bool
    detail: str | None = None
    digest: bytes = b""
    size: int = 0  # decoded bytes (from the base64 length until ``validate`` decoded it)
    error: str | None = None  # why a remote image cannot be used: it gets a placeholder
    checked: bool = False  # decoded and its format and dimensions checked (``validate``)
    # A data: URL's characters as bytes: for an image the client sent, a view into the
    # client's own body (never copied into a str); for a fetched one, the URL the proxy made.
    data: bytes | memoryview = b""
    json_safe: bool = True  # ``data`` can go into a JSON string as it is (no escapes needed)

    @property
    def where(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


@dataclass(slots=True)
class Scan:
    """The messages of a request, decoded just far enough to find and replace images."""

    messages: list[RawObject]
    contents: dict[int, list[Part]]
    images: list[Image]


def _decode(decoder: msgspec.json.Decoder[Any], raw: msgspec.Raw | bytes, where: str) -> Any:
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError:
        raise BadRequest(f"`{where}` has the wrong type", param=where) from None
    except msgspec.DecodeError:
        raise BadRequest(f"`{where}` is not valid JSON", param=where) from None


def _image_url(part: RawObject, where: str) -> tuple[msgspec.Raw, str | None]:
    """The raw JSON string of an image part's URL (``image_url`` or ``image_url.url``), and
    its ``detail``."""
    value = part.get("image_url")
    detail = None
    if value is not None and is_json(value, b"{"):
        fields = _decode(object_decoder, value, f"{where}.image_url")
        value = fields.get("url")
        raw_detail = fields.get("detail")
        if raw_detail is not None and is_json(raw_detail, b'"'):
            detail = _decode(_str_decoder, raw_detail, f"{where}.image_url.detail")
    if value is None or not is_json(value, b'"') or len(memoryview(value)) <= 2:
        raise InvalidImage(
            f"`{where}.image_url` must be a URL string or an object with a `url` string",
            param=f"{where}.image_url",
        )
    return value, detail


def _data_url_bytes(url: msgspec.Raw, where: str) -> tuple[bytes | memoryview, bool]:
    """A data: URL's characters, and whether they can go into JSON as they are: a view into
    the raw JSON string, unless it has escapes (then decoded: a copy, and maybe unsafe)."""
    inner = memoryview(url)[1:-1]
    if _BACKSLASH.search(inner) is None:
        return inner, True
    return str(_decode(_str_decoder, url, where)).encode(), False


def _too_many(count: str, limit: int) -> BadRequest:
    return BadRequest(
        f"The request has {count} images; the limit is {limit}",
        param="messages",
        code="too_many_images",
    )


def scan(messages_raw: msgspec.Raw, max_images: int | None = None) -> Scan:
    """Decode the messages array and find every image; raise BadRequest on a malformed shape,
    or as soon as it finds image ``max_images + 1``."""
    try:
        messages: list[RawObject] = messages_decoder.decode(messages_raw)
    except msgspec.ValidationError as exc:
        where = str(exc).replace("`$", "`messages")
        raise BadRequest(f"`messages` is malformed: {where}", param="messages") from None
    if not messages:
        raise BadRequest("`messages` must not be empty", param="messages")
    contents: dict[int, list[Part]] = {}
    images: list[Image] = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if content is None or not is_json(content, b"["):
            continue
        parts: list[Part] = []
        for j, raw_part in enumerate(_decode(array_decoder, content, f"messages[{i}].content")):
            where = f"messages[{i}].content[{j}]"
            # Decoded one level only: an image's URL stays raw JSON (megabytes never become
            # a str); only small fields are decoded.
            raw_type = None
            if is_json(raw_part, b"{"):
                part = _decode(object_decoder, raw_part, where)
                raw_type = part.get("type")
            if raw_type is None or not is_json(raw_type, b'"'):
                raise BadRequest(f"`{where}` must be an object with a `type`", param=where)
            kind = _decode(_str_decoder, raw_type, where)
            if kind == "image_url":
                raw_url, detail = _image_url(part, where)
                scheme = bytes(memoryview(raw_url)[1:9]).lower()  # schemes are case-insensitive
                if scheme.startswith(b"data:"):
                    data, safe = _data_url_bytes(raw_url, where)
                    images.append(Image(i, j, "", True, detail, data=data, json_safe=safe))
                elif scheme.startswith((b"http://", b"https://")):
                    url = _decode(_str_decoder, raw_url, where)
                    images.append(Image(i, j, url, False, detail))
                else:
                    raise InvalidImage(
                        f"`{where}.image_url.url` must be a data: URL or an http(s) URL",
                        param=f"{where}.image_url",
                    )
                if max_images is not None and len(images) > max_images:
                    raise _too_many(f"more than {max_images}", max_images)
                parts.append(Part(raw_part, image=len(images) - 1))
            elif kind == "text" and len(part) == 2 and is_json(part.get("text", b"0"), b'"'):
                parts.append(Part(raw_part, text=_decode(_str_decoder, part["text"], where)))
            else:
                parts.append(Part(raw_part))
        contents[i] = parts
    return Scan(messages, contents, images)


Url = str | bytes | memoryview  # a data: URL, as text or as its ASCII bytes


def _as_bytes(url: Url) -> bytes | memoryview:
    return url.encode() if isinstance(url, str) else url


def _payload(url: bytes | memoryview, where: str) -> memoryview:
    """The base64 payload of a ``data:`` URL whose header is valid for an image."""
    return memoryview(url)[_payload_start(url, where) :]


def _payload_start(url: bytes | memoryview, where: str) -> int:
    """Where the base64 payload of a ``data:`` URL begins, once its header is found valid."""
    head = bytes(memoryview(url)[:1024])
    comma = head.find(b",")
    if comma < 0:
        raise InvalidImage(f"`{where}` is a malformed data URL (no comma)", param=where)
    params = head[5:comma].decode("utf-8", "replace").split(";")
    media_type = params[0].strip().lower()
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise InvalidImage(f"`{where}` data URL must be base64-encoded", param=where)
    if (
        media_type
        and not media_type.startswith("image/")
        and media_type != ("application/octet-stream")
    ):
        raise InvalidImage(
            f"`{where}` data URL has media type {media_type!r}, not an image", param=where
        )
    return comma + 1


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


def _text_digest(url: bytes | memoryview, start: int) -> bytes:
    """sha256 of ``url[start:]`` (no copy; hashlib lets go of the GIL for large ones)."""
    return hashlib.sha256(memoryview(url)[start:]).digest()


def decode_data_url(url: Url, where: str, limit: int | None = None) -> bytes:
    """The decoded bytes of a base64 ``data:`` URL; InvalidImage naming ``where`` if malformed.

    With ``limit``: only its first ``limit`` bytes or a little more (whole 4-character groups,
    which decode alone), or all of it if it is not longer; a cut-off prefix is not checked for
    canonical padding, which only its end could break.
    """
    payload = _payload(_as_bytes(url), where)
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


def check_data_url(url: Url, where: str) -> tuple[int, sniff.Reader]:
    """(decoded size, what its bytes say) of a ``data:`` URL, decoded piece by piece.

    Every decoded piece goes through a ``sniff.Reader`` (the format and dimension checks) and is
    dropped: a JPEG's frame header is found in whichever piece holds it.

    Accepts and refuses exactly what ``decode_data_url`` does: every piece but the last is a
    whole number of 4-character groups, so it decodes alone; padding may only be in the last.
    """
    payload = _payload(_as_bytes(url), where)
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
            url = image.data
            start = _payload_start(url, image.where)
            length = len(url) - start
            _check_canonical_end(memoryview(url)[start:], image.where)
            tail = bytes(memoryview(url)[-2:])
            image.size = length // 4 * 3 - tail.endswith(b"=") - tail.endswith(b"==")
            if image.size > settings.max_image_bytes:
                raise PayloadTooLarge(
                    f"`{image.where}` is larger than the limit of "
                    f"{settings.max_image_bytes} bytes per image",
                    param=image.where,
                )
            image.digest = _text_digest(url, start)
        else:
            image.digest = hashlib.sha256(image.url.encode()).digest()


def _check(images: list[Image], settings: config.Ocr = _DEFAULTS) -> None:
    for image in images:
        image.size, reader = check_data_url(image.data, image.where)
        check_image(reader, image.where, settings, size=image.size)
        image.checked = True


async def _small_here_large_in_thread(
    work: Callable[[list[Image], config.Ocr], None], images: list[Image], settings: config.Ocr
) -> None:
    """``work`` for the small images on the event loop, for the large ones in a worker thread."""
    small = [im for im in images if len(im.data) < THREAD_THRESHOLD]
    large = [im for im in images if len(im.data) >= THREAD_THRESHOLD]
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
            image.size, image.checked = done.size, done.checked


def _refusal(image: Image, exc: FetchError) -> ProxyError:
    message = f"The image at `{image.where}` could not be used: {exc}"
    if exc.status == 413:
        return PayloadTooLarge(message, param=image.where)
    if exc.status == 400:
        return InvalidImage(message, param=image.where, code="image_url_refused")
    return UpstreamError(message, param=image.where, code="image_fetch_failed")


def _adopt(image: Image, fetched: Fetched) -> None:
    url = fetched.data_url()
    image.data, image.is_data = url, True  # from here on, it is a data URL
    image.size = len(fetched.data)
    image.digest = _text_digest(url, url.index(b",") + 1)
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
                image.error, image.digest = str(result), digest
            continue
        if len(result.data) >= THREAD_THRESHOLD:
            await asyncio.to_thread(_adopt, first, result)
        else:
            _adopt(first, result)
        for image in by_url[url][1:]:
            image.data, image.is_data, image.checked = first.data, True, True
            image.json_safe = first.json_safe
            image.size, image.digest = first.size, first.digest


async def identify(images: list[Image], settings: config.Ocr = _DEFAULTS) -> None:
    """Check the image count and every data URL's header and size; fill in digests (a remote
    image's: of its URL). Nothing is decoded here (``validate`` does that).

    Large payloads are hashed off the event loop.
    """
    if len(images) > settings.max_images:
        raise _too_many(str(len(images)), settings.max_images)
    await _small_here_large_in_thread(_identify, images, settings)


async def scan_and_identify(messages_raw: msgspec.Raw, settings: config.Ocr = _DEFAULTS) -> Scan:
    """``scan`` then ``identify``; a large request is scanned in a worker thread."""
    if len(memoryview(messages_raw)) >= SCAN_THREAD_THRESHOLD:
        found = await asyncio.to_thread(scan, messages_raw, settings.max_images)
    else:
        found = scan(messages_raw, settings.max_images)
    await identify(found.images, settings)
    return found


async def fetch_remote(
    images: list[Image], settings: config.Ocr, fetcher: Fetcher, total_bytes: int
) -> None:
    """Download the remote images (after ``identify``); each becomes a checked data URL.

    Together they may not exceed ``total_bytes`` (the most a client could send inline).
    """
    remote = [im for im in images if not im.is_data]
    if remote:
        await _fetch_all(remote, settings, fetcher, Budget(total_bytes))

"""Find the images of a chat request and give each one a stable identity.

Theory of operation: every message of every role whose ``content`` is an array is scanned. A
part of type ``image_url`` whose ``image_url`` is ``{"url": ...}`` or a bare string is an image;
``data:`` URLs must carry base64 and decode cleanly, ``http(s)`` URLs are taken as they are.
Everything else in the request is kept as the raw bytes the client sent, so that ``rewrite``
can splice the descriptions in without touching anything it does not understand.

An image's identity is the sha256 of its decoded bytes (data URL) or of its URL string (remote
image). Decoding and hashing megabytes of base64 would stall the event loop, so large payloads
are handled in a worker thread, in pieces: ``binascii`` holds the GIL while it decodes, and a
short call per piece lets the loop take the GIL back between pieces (``hashlib`` releases it
while it hashes); no decoded copy of a whole image is ever held. A large request's messages are
scanned in a worker thread too.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
from dataclasses import dataclass
from typing import Any

import msgspec

from .errors import BadRequest, InvalidImage
from .schema import RawObject, array_decoder, is_json, messages_decoder

# Below this many characters of base64, decoding + hashing on the loop is cheaper than a thread hop.
THREAD_THRESHOLD = 64 * 1024
# Messages at least this large (bytes of JSON) are scanned in a worker thread.
SCAN_THREAD_THRESHOLD = 1024 * 1024
# Base64 is decoded and hashed this many characters at a time (a multiple of 4).
PIECE = 256 * 1024

_any_decoder = msgspec.json.Decoder()


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
    url: str
    is_data: bool
    detail: str | None = None
    digest: bytes = b""
    size: int = 0

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


def _image_url(part: dict[str, Any], where: str) -> tuple[str, str | None]:
    value = part.get("image_url")
    detail = None
    if isinstance(value, dict):
        detail = value.get("detail")
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise InvalidImage(
            f"`{where}.image_url` must be a URL string or an object with a `url` string",
            param=f"{where}.image_url",
        )
    return value, detail if isinstance(detail, str) else None


def scan(messages_raw: msgspec.Raw) -> Scan:
    """Decode the messages array and find every image; raise BadRequest on a malformed shape."""
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
            part = _decode(_any_decoder, raw_part, where)
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(f"`{where}` must be an object with a `type`", param=where)
            kind = part["type"]
            if kind == "image_url":
                url, detail = _image_url(part, where)
                if url.startswith("data:"):
                    images.append(Image(i, j, url, True, detail))
                elif url.startswith(("http://", "https://")):
                    images.append(Image(i, j, url, False, detail))
                else:
                    raise InvalidImage(
                        f"`{where}.image_url.url` must be a data: URL or an http(s) URL",
                        param=f"{where}.image_url",
                    )
                parts.append(Part(raw_part, image=len(images) - 1))
            elif kind == "text" and len(part) == 2 and isinstance(part.get("text"), str):
                parts.append(Part(raw_part, text=part["text"]))
            else:
                parts.append(Part(raw_part))
        contents[i] = parts
    return Scan(messages, contents, images)


def _payload(url: str, where: str) -> str:
    """The base64 payload of a ``data:`` URL whose header is valid for an image."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise InvalidImage(f"`{where}` is a malformed data URL (no comma)", param=where)
    params = header[5:].split(";")
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
    return payload


def decode_data_url(url: str, where: str) -> bytes:
    """The decoded bytes of a base64 ``data:`` URL; InvalidImage naming ``where`` if malformed."""
    payload = _payload(url, where)
    try:
        data = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"`{where}` data URL payload is not valid base64", param=where) from None
    if not data:
        raise InvalidImage(f"`{where}` data URL is empty", param=where)
    return data


def hash_data_url(url: str, where: str) -> tuple[int, bytes]:
    """(decoded size, sha256 of the decoded bytes) of a ``data:`` URL, decoded piece by piece.

    Accepts and refuses exactly what ``decode_data_url`` does: every piece but the last is a
    whole number of 4-character groups, so it decodes alone; padding may only be in the last.
    """
    payload = _payload(url, where)
    digest = hashlib.sha256()
    size = 0
    end = len(payload.rstrip("="))  # trailing padding always goes with the last piece
    try:
        for start in range(0, end, PIECE) or (0,):
            last = start + PIECE >= end
            piece = payload[start:] if last else payload[start : start + PIECE]
            if not last and "=" in piece:
                raise ValueError("padding before the end")
            data = binascii.a2b_base64(piece, strict_mode=True)
            size += len(data)
            digest.update(data)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"`{where}` data URL payload is not valid base64", param=where) from None
    if not size:
        raise InvalidImage(f"`{where}` data URL is empty", param=where)
    return size, digest.digest()


def _identify(images: list[Image]) -> None:
    for image in images:
        if image.is_data:
            image.size, image.digest = hash_data_url(image.url, image.where)
        else:
            image.digest = hashlib.sha256(image.url.encode()).digest()


async def identify(images: list[Image]) -> None:
    """Fill in each image's digest and decoded size, off the event loop for large payloads."""
    small = [im for im in images if len(im.url) < THREAD_THRESHOLD]
    large = [im for im in images if len(im.url) >= THREAD_THRESHOLD]
    _identify(small)
    if large:
        await asyncio.to_thread(_identify, large)


async def scan_and_identify(messages_raw: msgspec.Raw) -> Scan:
    """``scan`` then ``identify``; a large request is scanned in a worker thread."""
    if len(memoryview(messages_raw)) >= SCAN_THREAD_THRESHOLD:
        found = await asyncio.to_thread(scan, messages_raw)
    else:
        found = scan(messages_raw)
    await identify(found.images)
    return found

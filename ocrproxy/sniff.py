"""Recognise an image from its first bytes: format by magic bytes, dimensions from the header.

Theory of operation: the proxy never decodes pixels. It only needs to know that a payload is one
of the formats OCR models accept (PNG, JPEG, GIF, WebP) and how large it claims to be, so that a
60000×60000 "decompression bomb" is refused before anyone tries to decode it. Each format stores
its dimensions near the start: PNG in the IHDR chunk (bytes 16–24), GIF in the logical screen
descriptor (bytes 6–10), WebP in its first chunk (``VP8 ``, ``VP8L`` or ``VP8X``), JPEG in the
first start-of-frame segment, found by walking the segment lengths (no entropy decoding).

``sniff`` returns ``None`` for anything that is not one of those formats. A recognised format
whose header is cut short or damaged gets ``width``/``height`` of ``None``: a PNG, GIF or WebP
cut short cannot be a bomb we would decode, and the OCR model will reject it if it is truly
broken. A JPEG is different: its frame header may come after any number of segments (EXIF,
ICC profiles, ...), so "not found yet" says nothing about its size. ``inspect`` therefore
refuses a whole JPEG whose frame header it did not find, or whose height is 0 (a height "set
later by a DNL marker", after the pixel data), since either would let any size through. The
segment walk is incremental (``Reader``): an image decoded piece by piece is walked across its
pieces, never held whole, and ``inspect(..., complete=False)`` judges a first piece only by what
it already shows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...); not DHT/JPG/DAC.
_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
# Markers that stand alone, without a length field.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
# Markers and fill bytes walked before giving up on finding a frame header: real JPEGs have a
# few dozen segments before it; megabytes of 4-byte segments or fill bytes would cost seconds.
MAX_JPEG_STEPS = 4096


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What the first bytes of a payload say about it."""

    media_type: str
    width: int | None = None
    height: int | None = None

    @property
    def pixels(self) -> int | None:
        if self.width is None or self.height is None:
            return None
        return self.width * self.height


def _png(data: bytes) -> Sniffed:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return Sniffed("image/png", width, height)
    return Sniffed("image/png")


def _gif(data: bytes) -> Sniffed:
    if len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return Sniffed("image/gif", width, height)
    return Sniffed("image/gif")


def _webp(data: bytes) -> Sniffed:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return Sniffed("image/webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return Sniffed("image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return Sniffed("image/webp", width, height)
    return Sniffed("image/webp")


class _JpegFrame:
    """Walks a JPEG's marker segments, over its bytes given in pieces, to its frame header.

    Only the position of the next marker is kept (and the few bytes of a segment header cut by
    the end of a piece), so a segment of any length costs nothing to skip.
    """

    __slots__ = ("pos", "seen", "tail", "done", "steps", "width", "height")

    def __init__(self) -> None:
        self.pos = 2  # offset of the next marker, past SOI
        self.seen = 0  # bytes fed so far
        self.tail = b""  # the bytes from ``pos`` to ``seen`` when ``pos`` is inside them
        self.done = False  # a frame header was found, or the walk hit something else
        self.steps = 0
        self.width: int | None = None
        self.height: int | None = None

    def feed(self, piece: bytes | memoryview) -> None:
        if self.done:
            return
        base = self.seen
        self.seen += len(piece)
        if self.pos >= self.seen:  # still inside a segment's payload
            return
        view = memoryview(piece)
        buf = view[self.pos - base :] if self.pos >= base else memoryview(self.tail + piece)
        i = self._walk(buf)
        self.pos += i
        self.tail = bytes(buf[i:]) if i < len(buf) else b""

    def _walk(self, data: memoryview) -> int:
        """Walk ``data`` (which starts at ``pos``); return where the walk stopped in it."""
        i = 0
        end = len(data)
        while i + 1 < end:
            self.steps += 1
            if data[i] != 0xFF or self.steps > MAX_JPEG_STEPS:
                # Not at a marker: damaged (a decoder would skip to the next 0xFF and could
                # find a frame header there, so this JPEG is refused), or too long a walk.
                break
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _STANDALONE:
                i += 2
                continue
            if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
                break
            if i + 4 > end:
                return i  # the segment header goes on in the next piece
            length = struct.unpack_from(">H", data, i + 2)[0]
            if length < 2:
                break
            if marker in _SOF_MARKERS:
                if i + 9 > end:
                    return i
                self.height, self.width = struct.unpack_from(">HH", data, i + 5)
                break
            i += 2 + length
        else:
            return i
        self.done = True
        return i


def _jpeg(data: bytes) -> Sniffed:
    frame = _JpegFrame()
    frame.feed(data)
    return Sniffed("image/jpeg", frame.width, frame.height)


def sniff(data: bytes) -> Sniffed | None:
    """The format and, when the header allows, the dimensions of ``data``; None if no image."""
    if data.startswith(PNG_SIGNATURE):
        return _png(data)
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg(data)
    if data.startswith((b"GIF87a", b"GIF89a")):
        return _gif(data)
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp(data)
    return None


SUPPORTED = "PNG, JPEG, GIF or WebP"


class ImageRejected(Exception):
    """The payload is not an acceptable image; the message is safe to show to the client."""


class TooManyPixels(ImageRejected):
    """The image is an acceptable kind, but larger than the pixel limit."""


def _judge(found: Sniffed | None, max_pixels: int, complete: bool) -> Sniffed:
    if found is None:
        raise ImageRejected(f"is not a {SUPPORTED} image (its first bytes do not match)")
    if found.media_type == "image/jpeg" and complete:
        if found.height is None:
            raise ImageRejected(
                "is a JPEG whose frame header (SOF) was not found before its image data"
            )
        if found.height == 0:
            raise ImageRejected(
                "is a JPEG of height 0 (its height comes after the pixel data, in a DNL "
                "marker), whose size cannot be checked"
            )
    if found.width == 0 or found.height == 0:
        raise ImageRejected("has a zero width or height")
    pixels = found.pixels
    if pixels is not None and pixels > max_pixels:
        raise TooManyPixels(
            f"is {found.width}x{found.height} pixels, more than the limit of {max_pixels} pixels"
        )
    return found


def inspect(data: bytes, max_pixels: int, complete: bool = True) -> Sniffed:
    """Sniff ``data`` and apply the dimension limit; ImageRejected says why it is refused.

    ``complete=False``: ``data`` is only the first bytes of the image; a JPEG whose frame
    header is not among them yet is not refused for that.
    """
    return _judge(sniff(data), max_pixels, complete)


class Reader:
    """``inspect`` for an image whose bytes come in pieces, in order, none of them kept: the
    format from the first bytes, a JPEG's frame header from wherever it is."""

    HEAD = 64  # more than any format but JPEG needs for its dimensions

    def __init__(self) -> None:
        self.head = b""
        self._frame = _JpegFrame()

    def feed(self, piece: bytes) -> None:
        if len(self.head) < self.HEAD:
            self.head += piece[: self.HEAD - len(self.head)]
        self._frame.feed(piece)

    def inspect(self, max_pixels: int) -> Sniffed:
        """``inspect`` of the whole image fed so far."""
        found = sniff(self.head)
        if found is not None and found.media_type == "image/jpeg":
            found = Sniffed("image/jpeg", self._frame.width, self._frame.height)
        return _judge(found, max_pixels, complete=True)

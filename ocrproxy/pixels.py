"""Turn an image's bytes into the page the local OCR engine reads, and say first what it costs.

Theory of operation: ``read_header`` and ``decoded_bytes`` read only an image's header and work
out, without decoding a pixel, the most bytes reading it will hold (decoding it, then the
recognition after it); the engine takes that many from its budget before ``prepare`` runs. Only
PNG, JPEG, GIF and WebP are ever parsed (FORMATS), and an image of more than MAX_PIXELS is
refused before it is decoded.

The decoded image is the only full-size bitmap ``prepare`` makes (a JPEG is even decoded at a
reduced scale, in greyscale): it is flattened onto white (transparent screenshots), turned to
greyscale and scaled down a strip of rows at a time. Then the small result is rotated by its
EXIF orientation (phone photos) and inverted if it is mostly dark (dark-mode screenshots),
since Tesseract reads dark text on a light background best.

Pillow (part of the optional ``local`` extra) is imported only when an image is read. Every
failure is a ``RecognitionError`` whose message is safe to show.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import sniff

if TYPE_CHECKING:
    from PIL import Image as PILImage

# Larger images are refused before decoding, whatever the budget of decoded bytes allows.
MAX_PIXELS = 80_000_000
# Small text is enlarged at most this many times before recognition (``local.upscale_factor``).
MAX_UPSCALE = 3.0
ORIENTATION = 0x0112  # the EXIF tag of a photo's rotation
# Mean brightness (0-255) below which an image is taken for light text on dark and inverted.
DARK_MEAN = 110
# The formats images.py lets through; no other Pillow plugin ever parses a client's bytes.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
# Pillow keeps a pixel in four bytes (RGB as RGBX, LA as four too) except in these modes.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# A decoded image is flattened and turned to greyscale this many bytes of it at a time; one
# strip's copies (its crop, an RGBA conversion, greyscale ones) take this many bytes a pixel.
STRIP_BYTES = 4 * 1024 * 1024
STRIP_COPIES = 4 + 4 + 3
# Bytes Tesseract and the engine hold per pixel of the image they read (measured: 34-38 MB for
# a 2500x2500 page of small or dense text, about 6 a pixel), with room to spare.
RECOGNITION_COPIES = 8
# EXIF orientation -> the transposition that makes the image upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}
# Beside the pixels: the decoder's own buffers (zlib's window, a row or two), the allocator's
# rounding. A 7000x7000 RGBA PNG peaked 210-221 MB above the idle process for 225 MB counted.
SLACK = 16 * 1024 * 1024


class RecognitionError(Exception):
    """Reading one image failed; the message is safe to log and to show."""


class TooLarge(RecognitionError):
    """The image has more than MAX_PIXELS: refused before it is decoded."""


class CutShort(RecognitionError):
    """The header goes on past the first bytes given: measure the whole image instead."""


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled down so that its longest side is at most ``max_side``."""
    width, height = size
    longest = max(width, height)
    if longest <= max_side:
        return size
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def pixel_bytes(mode: str) -> int:
    """Bytes a pixel of ``mode`` takes in Pillow's memory (RGB is stored as RGBX: four)."""
    return _PIXEL_BYTES.get(mode, 4)


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Pillow's errors about a bad image, as RecognitionErrors that are safe to show."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise RecognitionError(f"the image could not be decoded ({type(exc).__name__})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise RecognitionError(f"the image is damaged ({type(exc).__name__})") from None


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise TooLarge(
            f"the image is too large to read ({width}x{height} pixels, "
            f"at most {MAX_PIXELS // 1_000_000} megapixels)"
        )


def _open(data: bytes, formats: tuple[str, ...] = FORMATS) -> PILImage.Image:
    """The image with its header read and nothing decoded; RecognitionError if too large."""
    from PIL import Image

    image: PILImage.Image = Image.open(io.BytesIO(data), formats=formats)
    _check_pixels(*image.size)
    return image


def _draft(image: PILImage.Image, mode: str, max_side: int) -> None:
    """Set a JPEG to decode in ``mode`` at the smallest scale (1/2, 1/4, 1/8) that still covers
    ``max_side``; a no-op for the other formats."""
    image.draft(mode, _fit(image.size, max_side))


@dataclass(frozen=True, slots=True)
class Header:
    """What an image's header says it costs to decode, before a pixel is decoded."""

    width: int  # as decoded: a JPEG's reduced scale applied
    height: int
    decoder_bytes: int  # the decoded image, and what the decoder holds beside it


def read_header(data: bytes, max_side: int, mode: str = "L", whole: bool = True) -> Header:
    """The decoded size of an image and what decoding it holds, for a reader that scales it to
    ``max_side`` (and a JPEG decoded in ``mode``). Allocates no pixel buffer.

    ``whole=False``: ``data`` is only the image's first bytes. Pillow reads a header up to the
    pixel data and no further (PNG: IDAT, JPEG: the start of scan, GIF: the first frame's
    descriptor), so a header it reads from a prefix is the whole image's; one it cannot read
    there raises ``CutShort``, since it may go on past the prefix (a JPEG's large EXIF or ICC
    segments, a PNG's large text chunks). An image too large is refused either way.

    Pillow decodes PNG, GIF and WebP at full size, so the decoded image is the floor.
    """
    found = sniff.sniff(data)
    if found is not None and found.width is not None and found.height is not None:
        _check_pixels(found.width, found.height)  # before Pillow parses anything
    if found is not None and found.media_type == "image/webp":
        # Pillow's WebP decoder allocates its canvas when the file is opened, so the header
        # is read here instead; a WebP costs four full copies (libwebp's two canvases, the
        # bytes it hands over, Pillow's image).
        if found.width is None or found.height is None:
            if not whole:
                raise CutShort("the image's header is not in its first bytes")
            raise RecognitionError("the image is damaged (its WebP header is cut short)")
        return Header(found.width, found.height, found.width * found.height * 4 * 4 + SLACK)
    try:
        with _decoding():
            image = _open(data, formats=("PNG", "JPEG", "GIF"))
            coefficients = _jpeg_coefficients(image) if image.format == "JPEG" else 0
            _draft(image, mode, max_side)
            width, height = image.size
            decoded = width * height * pixel_bytes(image.mode)
            image.close()
    except TooLarge:
        raise
    except RecognitionError:
        if whole:
            raise
        raise CutShort("the image's header is not in its first bytes") from None
    return Header(width, height, decoded + coefficients + SLACK)


def decoded_bytes(data: bytes, max_side: int, whole: bool = True) -> int:
    """The most bytes of pixels ``prepare`` and the recognition after it hold at once for this
    image, from its header alone (``whole=False``: ``data`` is only its first bytes, and
    ``CutShort`` says that the header is not all in them).

    Reading happens in two phases that do not overlap. Decoding: what the decoder holds
    (``read_header``), the greyscale canvas the rows are shrunk into, and one strip's copies.
    Recognition: the scaled image, perhaps enlarged for small text, and Tesseract's copies.
    """
    decoding, target = decoding_bytes(data, max_side, whole)
    pixels = target[0] * target[1]
    factor = min(MAX_UPSCALE, max_side / max(target))
    if factor >= 1.2:
        pixels = round(pixels * factor * factor)
    return max(decoding, pixels * RECOGNITION_COPIES)


def decoding_bytes(data: bytes, max_side: int, whole: bool = True) -> tuple[int, tuple[int, int]]:
    """The most bytes ``prepare`` holds while it decodes this image, and the size of the page
    it returns, from the image's header alone (``whole`` and ``CutShort`` as ``read_header``):
    what the decoder holds, the greyscale canvas the rows are shrunk into, one strip's copies.
    """
    header = read_header(data, max_side, whole=whole)
    width, height = header.width, header.height
    target = _fit((width, height), max_side)
    rows = min(height, _strip_rows(width))
    decoding = (
        header.decoder_bytes
        + target[0] * height  # the canvas of greyscale rows
        + rows * width * STRIP_COPIES  # one strip: its crop, RGBA and greyscale copies
    )
    return decoding, target


def _jpeg_coefficients(image: PILImage.Image) -> int:
    """The bytes libjpeg may hold for a JPEG's DCT coefficients, at its full size.

    A progressive or multi-scan JPEG keeps every coefficient of the image (two bytes each)
    while it decodes, even at a reduced scale: 147 MB for a 49-megapixel 4:2:0 photo. Which
    kind a file is, libjpeg decides at its first scan, after the header read here, so every
    JPEG is counted as one.
    """
    width, height = image.size
    layers: list[tuple[Any, int, int, Any]] = getattr(image, "layer", None) or []
    if not layers:  # sampling unknown: as if every component were full size
        return len(image.getbands()) * (width + 15) * (height + 15) * 2
    h_max = max(h for _, h, _, _ in layers) or 1
    v_max = max(v for _, _, v, _ in layers) or 1
    total = 0
    for _, h, v, _ in layers:
        # Each component is stored in whole 8x8 blocks, padded to whole MCUs.
        columns = -(-width * h // (8 * h_max)) + h
        rows = -(-height * v // (8 * v_max)) + v
        total += columns * rows * 64 * 2
    return total


def _strip_rows(width: int) -> int:
    return max(1, STRIP_BYTES // (4 * width))


def _grey(piece: PILImage.Image) -> PILImage.Image:
    """A strip of any mode as greyscale, transparency flattened onto white."""
    from PIL import Image

    if "transparency" in piece.info or piece.mode == "PA":
        piece = piece.convert("RGBA")
    if piece.mode in ("RGBA", "LA"):
        flat = Image.new("L", piece.size, 255)
        flat.paste(piece, mask=piece)  # converted to L, blended by its alpha
        return flat
    return piece if piece.mode == "L" else piece.convert("L")


def _grey_rows(image: PILImage.Image, width: int) -> PILImage.Image:
    """``image`` as greyscale on white, each row scaled to ``width``; a strip at a time, so
    no full-size copy in another mode (RGBA, greyscale) is ever made beside the decoded one.

    Scaling each row alone is exactly the first pass of Pillow's own two-pass resize.
    """
    from PIL import Image

    rows = _strip_rows(image.width)
    if image.height <= rows or (image.mode == "L" and "transparency" not in image.info):
        grey = _grey(image)  # small, or greyscale already: no other full-size copy to avoid
        if width == grey.width:
            return grey
        return grey.resize((width, grey.height), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (width, image.height))
    for top in range(0, image.height, rows):
        piece = _grey(image.crop((0, top, image.width, min(image.height, top + rows))))
        if width != image.width:
            piece = piece.resize((width, piece.height), Image.Resampling.LANCZOS)
        canvas.paste(piece, (0, top))
    return canvas


def prepare(data: bytes, max_side: int) -> PILImage.Image:
    """Decode an image and make it easy for Tesseract: greyscale, upright, dark text on light.

    Scaled down to ``max_side`` before anything else: the decoded image is the only full-size
    buffer (a JPEG is even decoded at reduced scale, in greyscale), flattening and greyscale
    conversion run on strips of it, and rotation and inversion on the small result.
    """
    from PIL import Image, ImageOps, ImageStat

    with _decoding():
        image = _open(data)
        _draft(image, "L", max_side)
        image.load()
        orientation = image.getexif().get(ORIENTATION, 1)
        width, height = _fit(image.size, max_side)
        grey = _grey_rows(image, width)
        if grey is not image:
            image.close()  # frees the decoded image before the second pass
        del image
        if grey.height != height:
            grey = grey.resize((width, height), Image.Resampling.LANCZOS)
    if orientation in _TRANSPOSE:
        grey = grey.transpose(Image.Transpose[_TRANSPOSE[orientation]])
    if ImageStat.Stat(grey).mean[0] < DARK_MEAN:
        grey = ImageOps.invert(grey)
    return grey

from __future__ import annotations

import gzip
import io

import pytest
from PIL import Image

from ocrproxy import sniff
from tests.fakes import png
from tests.imagedata import gif_header, jpeg_header, png_header, webp_vp8x_header


def encoded(fmt: str, width: int, height: int, **options: object) -> bytes:
    out = io.BytesIO()
    mode = "P" if fmt == "GIF" else "RGB"
    Image.new(mode, (width, height)).save(out, format=fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "media_type", "options"),
    [
        ("PNG", "image/png", {}),
        ("JPEG", "image/jpeg", {}),
        ("JPEG", "image/jpeg", {"progressive": True}),
        ("JPEG", "image/jpeg", {"exif": b"Exif\0\0" + b"\0" * 5000}),
        ("GIF", "image/gif", {}),
        ("WEBP", "image/webp", {}),
        ("WEBP", "image/webp", {"lossless": True}),
        ("WEBP", "image/webp", {"exif": b"Exif\0\0" + b"\0" * 100}),  # VP8X
    ],
)
@pytest.mark.parametrize(("width", "height"), [(1, 1), (37, 1203), (3000, 17)])
def test_real_images_are_recognised_with_their_dimensions(
    fmt: str, media_type: str, options: dict[str, object], width: int, height: int
) -> None:
    found = sniff.sniff(encoded(fmt, width, height, **options))
    assert found == sniff.Sniffed(media_type, width, height)


@pytest.mark.parametrize(
    "header",
    [png_header(60000, 60000), gif_header(65535, 65535), jpeg_header(60000, 60000, 60000)],
    ids=["png", "gif", "jpeg-after-big-app-segment"],
)
def test_huge_dimensions_are_read_from_the_header_and_refused(header: bytes) -> None:
    found = sniff.sniff(header)
    assert found is not None and found.pixels is not None and found.pixels > 3 * 10**9
    with pytest.raises(sniff.ImageRejected, match="more than the limit"):
        sniff.inspect(header, 50_000_000)


def test_webp_extended_header_dimensions() -> None:
    assert sniff.sniff(webp_vp8x_header(16384, 16384)) == sniff.Sniffed("image/webp", 16384, 16384)
    with pytest.raises(sniff.ImageRejected):
        sniff.inspect(webp_vp8x_header(16384, 16384), 100_000_000)


def test_image_within_the_limit_passes() -> None:
    assert sniff.inspect(png_header(8000, 6000), 50_000_000).pixels == 48_000_000


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world, not an image at all",
        b"<html><body>login</body></html>",
        gzip.compress(b"\0" * 1000),
        b"%PDF-1.7\n",
        b"BM" + b"\0" * 40,  # BMP: not a format OCR models accept
        b"RIFF\0\0\0\0WAVEfmt ",
        b"\x89PNX\r\n\x1a\n" + b"\0" * 30,
    ],
    ids=["empty", "text", "html", "gzip", "pdf", "bmp", "wav", "almost-png"],
)
def test_bad_magic_bytes_are_refused(data: bytes) -> None:
    assert sniff.sniff(data) is None
    with pytest.raises(sniff.ImageRejected, match="first bytes"):
        sniff.inspect(data, 10**9)


def test_zero_dimension_is_refused() -> None:
    with pytest.raises(sniff.ImageRejected, match="zero"):
        sniff.inspect(png_header(0, 10), 10**9)


def test_truncated_header_of_a_known_format_has_unknown_dimensions() -> None:
    # The test suite's stand-in images are a PNG signature plus a label: accepted, size unknown.
    assert sniff.sniff(png("label")) == sniff.Sniffed("image/png")
    assert sniff.inspect(png("label"), 1).media_type == "image/png"
    assert sniff.sniff(png_header(10, 10)[:20]) == sniff.Sniffed("image/png")
    assert sniff.sniff(b"\xff\xd8\xff\xe0\x00") == sniff.Sniffed("image/jpeg")


def test_damaged_jpeg_segment_walk_stops_without_error() -> None:
    # Segment length pointing past the end, then garbage instead of a marker.
    assert sniff.sniff(b"\xff\xd8\xff\xe1\xff\xff" + b"\0" * 10) == sniff.Sniffed("image/jpeg")
    assert sniff.sniff(b"\xff\xd8\xff\xe1\x00\x04ab\x12\x34") == sniff.Sniffed("image/jpeg")

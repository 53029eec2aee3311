"""The built-in OCR engine: Tesseract through ``tesserocr``, on the proxy's own CPUs.

Theory of operation: ``Engine.recognize`` takes a function that returns the image's bytes and
gives back the text Tesseract reads in it, lines and paragraphs kept. All the work (base64
decoding, Pillow decoding and resizing, recognition) runs in a thread pool sized to the CPU count;
``tesserocr`` releases the GIL while Tesseract works, so the event loop keeps serving. A Tesseract
API object must never be shared between threads, so each pool thread lazily builds its own and
keeps it for the life of the thread (loading the language data once per thread, not per image).

Work is admitted by threads and by memory (``admission``): a slot per thread, and a ``Budget`` of
decoded bytes in flight (``max_decoded_bytes``) shared by every engine thread, because a small
file can decode to hundreds of megabytes (a 190 KB PNG of 7000x7000 transparent pixels is 196 MB
in Pillow). First a short job reads the image's header and works out, without decoding a pixel,
the most bytes reading it will hold (``decoded_bytes``); then that many bytes are taken from the
budget, waiting on the event loop if need be, and only then is the image decoded in a thread.
An image that needs more than the whole budget is refused. Slots and bytes are given back when
the *thread* finishes, not when the caller stops waiting: a recognition cannot be cancelled
once started, so a client that went away must not let more work pile onto busy threads. A
request waiting for either holds only the bytes it already had, never a decoded bitmap, and
its wait counts against its deadline. What bounds a running recognition is Tesseract's own
deadline (``timeout_s``); layout analysis runs before that clock is checked, so the real bound
is a little longer on huge pages, which is why images are first scaled down to ``max_side``
pixels on their longest side.

The decoded image is the only full-size bitmap ``prepare`` makes (a JPEG is even decoded at a
reduced scale, in greyscale): it is flattened onto white (transparent screenshots), turned to
greyscale and scaled down a strip of rows at a time. Then the small result is rotated by its
EXIF orientation (phone photos) and inverted if it is mostly dark (dark-mode screenshots),
since Tesseract reads dark text on a light background best. Then a layout pass measures its
text lines, and small text (a screenshot at 1x) is scaled up to the height Tesseract reads
best before the real recognition.

``tesserocr`` and Pillow are an optional extra: nothing here imports them until the engine is
used, and ``Engine.problem`` says, in words an operator can act on, why the engine cannot run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import config, sniff
from .admission import Budget, MiB, OverBudget, Workers

if TYPE_CHECKING:
    from PIL import Image as PILImage

log = logging.getLogger("ocrproxy.local")

INSTALL_HINT = (
    "The local OCR engine is not installed on this proxy: install it with "
    "`pip install 'ocrproxy[local]'` (tesserocr and Pillow) and the Tesseract language data "
    "(Debian: `apt-get install tesseract-ocr-eng`), then restart the proxy"
)
# Where Debian (and Ubuntu) put the data of their tesseract-ocr-LANG packages.
SYSTEM_TESSDATA = (
    "/usr/share/tesseract-ocr/5/tessdata",
    "/usr/share/tesseract-ocr/4.00/tessdata",
    "/usr/share/tessdata",
)
# Larger images are refused before decoding, whatever the budget of decoded bytes allows.
MAX_PIXELS = 80_000_000
# Tesseract reads lines about this tall (in pixels) best. Screenshots at 1x have 13-20 px lines,
# which it misreads; a quick layout pass measures the median line, and smaller text is scaled up
# to this height (at most MAX_UPSCALE times). Scaling everything up would not do: large letters
# on a small photo then stop looking like text to Tesseract's page segmentation.
LINE_HEIGHT = 44
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
PILLOW_BLOCK_BYTES = 64 * MiB
# Beside the pixels: the decoder's own buffers (zlib's window, a row or two), the allocator's
# rounding. A 7000x7000 RGBA PNG peaked 210-221 MB above the idle process for 225 MB counted.
SLACK = 16 * MiB


class Unavailable(Exception):
    """The engine cannot run on this machine; the message says how to fix that."""


class RecognitionError(Exception):
    """Reading one image failed; the message is safe to log and to show."""


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def tessdata_dir(configured: str, env: Mapping[str, str] = os.environ) -> str:
    """The language data directory: configured, else ``$TESSDATA_PREFIX``, else the system's.

    Empty when none is found, which leaves the choice to the Tesseract library itself.
    """
    if configured:
        return configured
    if env.get("TESSDATA_PREFIX"):
        return env["TESSDATA_PREFIX"]
    return next((d for d in SYSTEM_TESSDATA if os.path.isdir(d)), "")


@functools.cache
def _tesserocr() -> Any:
    """Import tesserocr once (it ships no typing); ImportError if the extra is not installed."""
    # A Tesseract built with OpenMP (Debian's libtesseract, if tesserocr was compiled against it)
    # spreads every recognition over all cores; with one engine per thread that oversubscribes
    # the CPU and runs 4-6x slower. The PyPI wheel has no OpenMP, so this is a no-op there.
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    import tesserocr
    from PIL import _imaging  # part of the extra; fail here, not in a worker thread

    if "PILLOW_BLOCK_SIZE" not in os.environ:
        # Pillow allocates a large image in blocks (16 MiB by default). glibc serves blocks
        # that size from per-thread heaps once a first one is freed, and keeps them: each
        # engine thread then held on to ~200 MB after a 49-megapixel image. Blocks above
        # glibc's largest mmap threshold (32 MiB) are always mapped alone and unmapped when
        # freed, so memory the budget gave back is given back to the system too.
        _imaging.set_block_size(PILLOW_BLOCK_BYTES)  # what PIL.Image.core is
    return tesserocr


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
        raise RecognitionError(
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


def read_header(data: bytes, max_side: int, mode: str = "L") -> Header:
    """The decoded size of an image and what decoding it holds, for a reader that scales it to
    ``max_side`` (and a JPEG decoded in ``mode``). Allocates no pixel buffer.

    Pillow decodes PNG, GIF and WebP at full size, so the decoded image is the floor.
    """
    found = sniff.sniff(data)
    if found is not None and found.media_type == "image/webp":
        # Pillow's WebP decoder allocates its canvas when the file is opened, so the header
        # is read here instead; a WebP costs four full copies (libwebp's two canvases, the
        # bytes it hands over, Pillow's image).
        if found.width is None or found.height is None:
            raise RecognitionError("the image is damaged (its WebP header is cut short)")
        _check_pixels(found.width, found.height)
        return Header(found.width, found.height, found.width * found.height * 4 * 4 + SLACK)
    with _decoding():
        image = _open(data, formats=("PNG", "JPEG", "GIF"))
        coefficients = _jpeg_coefficients(image) if image.format == "JPEG" else 0
        _draft(image, mode, max_side)
        width, height = image.size
        decoded = width * height * pixel_bytes(image.mode)
        image.close()
    return Header(width, height, decoded + coefficients + SLACK)


def decoded_bytes(data: bytes, max_side: int) -> int:
    """The most bytes of pixels ``prepare`` and the recognition after it hold at once for this
    image, from its header alone.

    Reading happens in two phases that do not overlap. Decoding: what the decoder holds
    (``read_header``), the greyscale canvas the rows are shrunk into, and one strip's copies.
    Recognition: the scaled image, perhaps enlarged for small text, and Tesseract's copies.
    """
    header = read_header(data, max_side)
    width, height = header.width, header.height
    target = _fit((width, height), max_side)
    rows = min(height, _strip_rows(width))
    decoding = (
        header.decoder_bytes
        + target[0] * height  # the canvas of greyscale rows
        + rows * width * STRIP_COPIES  # one strip: its crop, RGBA and greyscale copies
    )
    pixels = target[0] * target[1]
    factor = min(MAX_UPSCALE, max_side / max(target))
    if factor >= 1.2:
        pixels = round(pixels * factor * factor)
    return max(decoding, pixels * RECOGNITION_COPIES)


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


def upscale_factor(line_heights: list[int], longest: int, max_side: int) -> float:
    """How much to enlarge an image whose text lines measure ``line_heights`` pixels (1: not)."""
    if not line_heights:
        return 1.0
    median = sorted(line_heights)[len(line_heights) // 2]
    factor = min(LINE_HEIGHT / max(median, 1), MAX_UPSCALE, max_side / longest)
    return factor if factor >= 1.2 else 1.0


_BLANK_RUN = re.compile(r"\n{3,}")


def tidy(text: str) -> str:
    """Tesseract's text with trailing spaces, page breaks and runs of blank lines removed."""
    lines = (line.rstrip() for line in text.replace("\f", "\n").splitlines())
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip("\n")


def as_description(engine_name: str, text: str) -> str:
    """What stands in for the image: its text, and a plain statement of what OCR cannot tell."""
    return (
        f"TEXT:\n{text or '(no text found)'}\n"
        f"DESCRIPTION:\n(none: this is OCR text only, read by {engine_name} on the proxy; "
        "there is no description of the image's visual content)"
    )


def _set_image(api: Any, image: PILImage.Image) -> bytes:
    """Hand a greyscale image to Tesseract as raw pixels, which it reads without a copy.

    ``api.SetImage`` would first encode the image to a file format, holding the GIL for tens of
    milliseconds on a large page. The caller keeps the returned buffer alive until ``Clear``.
    """
    pixels = image.tobytes()
    api.SetImageBytes(pixels, image.width, image.height, 1, image.width)
    return pixels


class Engine:
    """Tesseract in a thread pool, one API object per thread, admitted by threads and bytes."""

    def __init__(
        self,
        settings: config.OcrLocal,
        env: Mapping[str, str] = os.environ,
        budget: Budget | None = None,
    ) -> None:
        self.settings = settings
        self.threads = settings.threads or _cpu_count()
        self.tessdata = tessdata_dir(settings.tessdata_path, env)
        self.language = "+".join(settings.languages)
        # Shared with any other engine given the same budget: one bound for the process.
        self.budget = budget or Budget(settings.max_decoded_bytes)
        self.workers = Workers(self.threads, self.budget, "ocrproxy-tesseract")
        self._local = threading.local()
        self._problem: str | None = None
        self._checked = False
        self._lock = threading.Lock()

    def problem(self) -> str | None:
        """Why the engine cannot run here (missing package or language data), or None."""
        with self._lock:
            if not self._checked:
                self._problem = self._check()
                self._checked = True
            return self._problem

    def _check(self) -> str | None:
        try:
            tesserocr = _tesserocr()
        except ImportError:
            return INSTALL_HINT
        path, available = tesserocr.get_languages(*([self.tessdata] if self.tessdata else []))
        missing = [lang for lang in self.settings.languages if lang not in available]
        if missing:
            packages = " ".join("tesseract-ocr-" + m.lower().replace("_", "-") for m in missing)
            return (
                f"The local OCR engine has no language data for {', '.join(missing)} in "
                f"{path or 'its default data path'}: install it (Debian: `apt-get install "
                f"{packages}`) or set [ocr.local] tessdata_path, then restart the proxy"
            )
        return None

    @functools.cached_property
    def version(self) -> str:
        """Tesseract's version, e.g. ``5.5.4``."""
        first: str = _tesserocr().tesseract_version().splitlines()[0]
        return first.removeprefix("tesseract").strip()

    @property
    def name(self) -> str:
        return f"Tesseract {self.version}"

    def cache_tag(self) -> str:
        """Everything that changes what the engine reads: part of the description cache key."""
        tesserocr = _tesserocr()
        return (
            f"tesseract {self.version}; tesserocr {tesserocr.__version__}; "
            f"lang {self.language}; max_side {self.settings.max_side}"
        )

    async def recognize(self, load: Callable[[], bytes]) -> str:
        """The text of the image whose bytes ``load`` returns (called in a worker thread).

        Raises Unavailable if the engine cannot run here, RecognitionError if this image failed.
        """
        problem = self.problem()
        if problem is not None:
            raise Unavailable(problem)
        size = await self.workers.call(functools.partial(self._measure, load))
        try:
            return await self.workers.run(size, functools.partial(self._work, load))
        except OverBudget as exc:
            raise RecognitionError(str(exc)) from None

    def _measure(self, load: Callable[[], bytes]) -> int:
        """In a pool thread: the bytes reading this image will hold (its bytes are dropped: a
        job waiting for budget holds only what its request already had)."""
        return decoded_bytes(load(), self.settings.max_side)

    def _api(self) -> Any:
        api = getattr(self._local, "api", None)
        if api is None:
            tesserocr = _tesserocr()
            options: dict[str, Any] = {
                "lang": self.language,
                "psm": tesserocr.PSM.AUTO,
                # Keep the spacing of columns and tables; keep Tesseract's warnings off stderr.
                "variables": {"preserve_interword_spaces": "1", "debug_file": "/dev/null"},
            }
            if self.tessdata:
                options["path"] = self.tessdata
            try:
                api = tesserocr.PyTessBaseAPI(**options)
            except RuntimeError as exc:
                raise RecognitionError(f"Tesseract could not start: {exc}") from None
            self._local.api = api
        return api

    def _work(self, load: Callable[[], bytes]) -> str:
        image = prepare(load(), self.settings.max_side)
        api = self._api()
        deadline_ms = int(self.settings.timeout_s * 1000)
        try:
            pixels = _set_image(api, image)
            longest = max(image.size)
            factor = upscale_factor(self._line_heights(api), longest, self.settings.max_side)
            if factor > 1:
                from PIL import Image

                size = (round(image.width * factor), round(image.height * factor))
                pixels = _set_image(api, image.resize(size, Image.Resampling.BICUBIC))
            started = time.monotonic()
            finished = api.Recognize(timeout=deadline_ms)
            if not finished and (time.monotonic() - started) * 1000 >= deadline_ms:
                raise RecognitionError(
                    f"recognition was stopped after {self.settings.timeout_s:g} s "
                    "([ocr.local] timeout_s)"
                )
            text: str = api.GetUTF8Text() if finished else ""
        finally:
            api.Clear()
        del pixels  # Tesseract read from this buffer until Clear()
        return tidy(text)

    def _line_heights(self, api: Any) -> list[int]:
        """The heights of the text lines a layout pass finds in the current image."""
        tesserocr = _tesserocr()
        level = tesserocr.RIL.TEXTLINE
        heights: list[int] = []
        layout = api.AnalyseLayout()
        if layout is None:
            return heights
        for line in tesserocr.iterate_level(layout, level):
            box = line.BoundingBox(level)
            if box:
                heights.append(box[3] - box[1])
        return heights

    def close(self) -> None:
        """Stop taking work; a recognition already running ends by its own deadline."""
        self.workers.close()

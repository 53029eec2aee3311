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
the most bytes reading it will hold (``pixels.decoded_bytes``); then that many bytes are taken
from the budget, waiting on the event loop if need be, and only then is the image decoded in a
thread. An image that needs more than the whole budget is refused. Slots and bytes are given
back when the *thread* finishes, not when the caller stops waiting: a recognition cannot be
cancelled once started, so a client that went away must not let more work pile onto busy
threads. A request waiting for either holds only the bytes it already had, never a decoded
bitmap, and its wait counts against its deadline. What bounds a running recognition is
Tesseract's own deadline (``timeout_s``); layout analysis runs before that clock is checked, so
the real bound is a little longer on huge pages, which is why images are first scaled down to
``max_side`` pixels on their longest side.

The header is read from the image's first HEADER_BYTES when the caller can give just those
(``recognize``'s ``head``), since decoding base64 holds the GIL and the image is decoded whole
for reading anyway; a header that goes on past them (a JPEG's large EXIF or ICC segments) is read
from the whole image.

The image it reads comes from ``pixels.prepare``: scaled down, greyscale, upright, dark text on
light. Then a layout pass measures its text lines, and small text (a screenshot at 1x) is scaled
up to the height Tesseract reads best before the real recognition.

``tesserocr`` and Pillow are an optional extra: nothing here imports them until the engine is
used, and ``Engine.problem`` says, in words an operator can act on, why the engine cannot run.

``open_engine`` builds the engine ``[ocr.local] engine`` names: this one, or RapidOCR
(``local_rapid``), which shares its admission (``measure``, ``admission.Workers`` and the budget)
and its reference text (``as_description``). Both are what ``LocalEngine`` describes.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from . import config
from .admission import Budget, MiB, OverBudget, Workers
from .pixels import MAX_UPSCALE, CutShort, decoded_bytes, prepare
from .pixels import RecognitionError as RecognitionError  # what Engine.recognize raises

if TYPE_CHECKING:
    from PIL import Image as PILImage

log = logging.getLogger("ocrproxy.local")

# What the user does once the engine's package or data is installed: the server's operator
# restarts it; ``ocrproxy describe``, a one-shot command, is simply run again.
RESTART = "then restart the proxy"
RUN_AGAIN = "then run the command again"


def install_hint(then: str = RESTART) -> str:
    """Why the engine cannot run when its package is missing, and how to fix that."""
    return (
        "The local OCR engine is not installed on this proxy: install it with "
        "`pip install 'ocrproxy[local]'` (tesserocr and Pillow) and the Tesseract language data "
        f"(Debian: `apt-get install tesseract-ocr-eng`), {then}"
    )


INSTALL_HINT = install_hint()
# Where Debian (and Ubuntu) put the data of their tesseract-ocr-LANG packages.
SYSTEM_TESSDATA = (
    "/usr/share/tesseract-ocr/5/tessdata",
    "/usr/share/tesseract-ocr/4.00/tessdata",
    "/usr/share/tessdata",
)
# Tesseract reads lines about this tall (in pixels) best. Screenshots at 1x have 13-20 px lines,
# which it misreads; a quick layout pass measures the median line, and smaller text is scaled up
# to this height (at most MAX_UPSCALE times). Scaling everything up would not do: large letters
# on a small photo then stop looking like text to Tesseract's page segmentation.
LINE_HEIGHT = 44
# An image is measured from this many of its first bytes (256 KiB of base64): every header
# is there but a JPEG's with large EXIF or ICC segments, which is then measured whole.
HEADER_BYTES = 192 * 1024
PILLOW_BLOCK_BYTES = 64 * MiB


class Unavailable(Exception):
    """The engine cannot run on this machine; the message says how to fix that."""


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


def measure(
    load: Callable[[], bytes],
    head: Callable[[int], bytes] | None,
    estimate: Callable[..., int],
) -> int:
    """In a pool thread: the bytes reading this image will hold, by ``estimate(data, whole=)``
    (``pixels.decoded_bytes`` or an engine's own). The image's bytes are dropped: a job waiting
    for budget holds only what its request already had.

    Only the image's first HEADER_BYTES are decoded when ``head`` gives them: decoding base64
    holds the GIL (about 150 ms for 20 MiB), and the work decodes it all anyway.
    """
    if head is not None:
        first = head(HEADER_BYTES)
        try:
            return estimate(first, whole=len(first) < HEADER_BYTES)
        except CutShort:
            pass  # rare: a header longer than that (large EXIF, ICC or text segments)
    return estimate(load(), whole=True)


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


class Problem:
    """Why an engine cannot run: found by ``check`` at the first ``get`` (from any thread),
    then kept; ``set`` records one found later (models that fail to load)."""

    def __init__(self, check: Callable[[], str | None]) -> None:
        self._check = check
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._checked = False

    def get(self) -> str | None:
        with self._lock:
            if not self._checked:
                self._problem = self._check()
                self._checked = True
            return self._problem

    def set(self, problem: str) -> None:
        with self._lock:
            self._problem, self._checked = problem, True


class Engine:
    """Tesseract in a thread pool, one API object per thread, admitted by threads and bytes."""

    def __init__(
        self,
        settings: config.OcrLocal,
        env: Mapping[str, str] = os.environ,
        budget: Budget | None = None,
        then: str = RESTART,
    ) -> None:
        self.settings = settings
        self.then = then  # the last words of ``problem``: what to do once it is installed
        self.threads = settings.threads or _cpu_count()
        self.tessdata = tessdata_dir(settings.tessdata_path, env)
        self.language = "+".join(settings.languages)
        # Shared with any other engine given the same budget: one bound for the process.
        self.budget = budget or Budget(settings.max_decoded_bytes)
        self.workers = Workers(self.threads, self.budget, "ocrproxy-tesseract")
        self._local = threading.local()
        self._problem = Problem(self._check)

    def problem(self) -> str | None:
        """Why the engine cannot run here (missing package or language data), or None."""
        return self._problem.get()

    def _check(self) -> str | None:
        try:
            tesserocr = _tesserocr()
        except ImportError:
            return install_hint(self.then)
        path, available = tesserocr.get_languages(*([self.tessdata] if self.tessdata else []))
        missing = [lang for lang in self.settings.languages if lang not in available]
        if missing:
            packages = " ".join("tesseract-ocr-" + m.lower().replace("_", "-") for m in missing)
            return (
                f"The local OCR engine has no language data for {', '.join(missing)} in "
                f"{path or 'its default data path'}: install it (Debian: `apt-get install "
                f"{packages}`) or set [ocr.local] tessdata_path, {self.then}"
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

    async def recognize(
        self, load: Callable[[], bytes], head: Callable[[int], bytes] | None = None
    ) -> str:
        """The text of the image whose bytes ``load`` returns (called in a worker thread).

        ``head(n)``, if given, returns at least the first ``n`` of those bytes (all of them if
        there are no more): enough to measure most images without decoding all of them twice.
        Raises Unavailable if the engine cannot run here, RecognitionError if this image failed.
        """
        problem = self.problem()
        if problem is not None:
            raise Unavailable(problem)
        size = await self.workers.call(functools.partial(self._measure, load, head))
        try:
            return await self.workers.run(size, functools.partial(self._work, load))
        except OverBudget as exc:
            raise RecognitionError(str(exc)) from None

    def _measure(self, load: Callable[[], bytes], head: Callable[[int], bytes] | None) -> int:
        return measure(
            load, head, functools.partial(decoded_bytes, max_side=self.settings.max_side)
        )

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

    async def start(self) -> None:
        """Nothing to warm: each thread loads its language data on its first image (~0.1 s)."""

    def close(self) -> None:
        """Stop taking work; a recognition already running ends by its own deadline."""
        self.workers.close()


class LocalEngine(Protocol):
    """What the proxy needs of a local engine (``Engine``, ``local_rapid.RapidEngine``)."""

    settings: config.OcrLocal
    threads: int

    @property
    def name(self) -> str: ...

    def problem(self) -> str | None: ...

    def cache_tag(self) -> str: ...

    async def start(self) -> None: ...

    async def recognize(
        self, load: Callable[[], bytes], head: Callable[[int], bytes] | None = None
    ) -> str: ...

    def close(self) -> None: ...


def open_engine(
    settings: config.OcrLocal,
    env: Mapping[str, str] = os.environ,
    budget: Budget | None = None,
    then: str = RESTART,
) -> LocalEngine:
    """The engine ``[ocr.local] engine`` names; nothing of its package is imported yet."""
    if settings.engine == "rapidocr":
        from .local_rapid import RapidEngine

        return RapidEngine(settings, budget=budget, then=then)
    return Engine(settings, env, budget, then)

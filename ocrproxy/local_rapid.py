"""The second local OCR engine: RapidOCR (PP-OCR models on ONNX Runtime), on the proxy's CPUs.

Theory of operation: ``RapidEngine`` is a drop-in for the Tesseract ``local.Engine`` (the same
``recognize``, ``problem``, ``cache_tag``), chosen by ``[ocr.local] engine = "rapidocr"``. It
reads Chinese, mixed Chinese and English, and screenshots far better than Tesseract, at about
four times its CPU per image and ten times its memory (the ``rapidocr`` extra).

The rules it keeps, each a pitfall of the library:

- It is only ever given decoded pixels: a numpy array of the greyscale page ``pixels.prepare``
  made (EXIF orientation applied, transparency flattened, scaled to ``max_side``). Given a
  string, RapidOCR fetches anything that looks like a URL itself; given bytes, it skips the
  EXIF rotation.
- Every ONNX Runtime session runs on one thread (``intra_op_num_threads = 1``): the engine's own
  pool (``threads``, one per CPU) is the parallelism, and sessions as wide as the machine would
  oversubscribe it. One RapidOCR instance is shared by the pool's threads: ``InferenceSession.run``
  is thread-safe, and the instance is never given per-call arguments (which RapidOCR writes into
  the shared instance). A second instance would cost about 100 MB for the same throughput.
- Nothing is downloaded, ever: every model file is named by path (the ones bundled in the wheel,
  or ``[ocr.local] model_dir``'s), and a missing one is a ``problem`` naming it.
- The models load lazily, 1.5-6 s on the first image: ``start`` loads and warms them at start-up.
- Lines are rebuilt from the boxes by ``layout.lines`` (deskew, columns, rows).

Work is admitted exactly as Tesseract's (``admission``): a slot per thread and the shared budget
of decoded bytes, here counting ONNX Runtime's buffers for the detector's input
(``reading_bytes``). A running call has no deadline of its own: the request's OCR timeout ends
the wait, and the slot stays taken until the thread finishes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import math
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import config, layout
from .admission import Budget, OverBudget, Workers
from .local import RESTART, Problem, Unavailable, _cpu_count, measure
from .pixels import RecognitionError, decoding_bytes, prepare

# The wheel's own models (rapidocr 3.10: PP-OCRv6 small); the recogniser carries its
# dictionary in the ONNX metadata. The wheel's text direction classifier is not used: it turned
# 3 of the 27 long lines of a scanned page upside down (9 % CER instead of 0), and a screenshot's
# lines are upright (a photo's EXIF orientation is applied before).
BUNDLED = {"det": "PP-OCRv6_det_small.onnx", "rec": "PP-OCRv6_rec_small.onnx"}
# The detector reads the page scaled down to this longest side (RapidOCR's default enlarges it
# to 736 px on its *short* side, up to 2000 px long: 4 megapixels for a square page, whose
# activations alone took 500 MB); the recogniser still reads the text at full resolution.
# The reference measurement found the same CER on its corpus with this cap, and less time.
DET_LIMIT = 1280
# Bytes per pixel of the detector's input counted against the budget: its float32 tensor and
# normaliser copies (24) and the first layers' feature maps. The models themselves and their
# working memory for the recogniser's batches are the process's fixed cost (about 450 MB more
# at peak with the bundled small model), not the image's.
DET_BYTES_PER_PIXEL = 96

log = logging.getLogger("ocrproxy.local")


def install_hint(then: str = RESTART) -> str:
    """Why the engine cannot run when its packages are missing, and how to fix that."""
    return (
        'The local OCR engine RapidOCR ([ocr.local] engine = "rapidocr") is not installed on '
        "this proxy: install it with `pip install 'ocrproxy[rapidocr]'` (rapidocr and "
        f"onnxruntime), {then}"
    )


@functools.cache
def _modules() -> tuple[Any, Any]:
    """Import rapidocr and onnxruntime once; ImportError if the extra is not installed."""
    import onnxruntime
    import rapidocr

    logging.getLogger("RapidOCR").setLevel(logging.WARNING)  # it logs every model path
    return rapidocr, onnxruntime


@functools.cache
def _rapidocr_version() -> str:
    return importlib.metadata.version("rapidocr")  # its module has no __version__


def reading_bytes(width: int, height: int) -> int:
    """The most bytes recognising a ``width`` x ``height`` page holds beyond the page itself.

    ONNX Runtime's activations for the detector's input (the page scaled down to DET_LIMIT,
    rounded up to multiples of 32) dominate; then the page as BGR, which RapidOCR makes.
    """
    scale = min(1.0, DET_LIMIT / max(width, height))
    w, h = math.ceil(width * scale / 32) * 32, math.ceil(height * scale / 32) * 32
    return w * h * DET_BYTES_PER_PIXEL + width * height * 3


def model_files(settings: config.OcrLocal) -> dict[str, Path]:
    """The model files the engine reads: det, rec and (``model_dir``) dict."""
    rapidocr, _ = _modules()
    bundled = Path(rapidocr.__file__).parent / "models"
    files = {role: bundled / name for role, name in BUNDLED.items()}
    if settings.model_dir:
        own = Path(settings.model_dir)
        files = {name.partition(".")[0]: own / name for name in config.RAPIDOCR_MODEL_FILES}
    return files


def _digest(files: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for role in sorted(files):
        with files[role].open("rb") as f:
            h.update(role.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


def _params(settings: config.OcrLocal) -> tuple[tuple[str, Any], ...]:
    """RapidOCR's settings for ``settings``: every model by path, one thread per session."""
    files = model_files(settings)
    params: dict[str, Any] = {
        "Global.log_level": "warning",
        "Global.use_cls": False,  # see BUNDLED
        "Global.max_side_len": settings.max_side,  # prepare scaled the page already
        "Det.limit_type": "max",
        "Det.limit_side_len": DET_LIMIT,
        "EngineConfig.onnxruntime.intra_op_num_threads": 1,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        "Det.model_path": str(files["det"]),
        "Rec.model_path": str(files["rec"]),
    }
    if "dict" in files:
        params["Rec.rec_keys_path"] = str(files["dict"])
    return tuple(params.items())


_loading = threading.Lock()
# The loaded RapidOCR instances by their settings, each alive while an engine holds it.
_instances: weakref.WeakValueDictionary[tuple[tuple[str, Any], ...], Any] = (
    weakref.WeakValueDictionary()
)


def _loaded(params: tuple[tuple[str, Any], ...]) -> Any:
    """The RapidOCR instance for ``params``, loaded once for every engine that uses the same
    models: a reload that keeps them (or a second engine, as the bench makes) reuses the loaded
    ones instead of loading another 500 MB; they are freed with the last engine using them."""
    with _loading:
        ocr = _instances.get(params)
        if ocr is None:
            rapidocr, _ = _modules()
            try:
                ocr = rapidocr.RapidOCR(params=dict(params))
            except Exception as exc:  # a damaged model file, an unknown ONNX opset
                raise RecognitionError(f"RapidOCR could not start: {exc}") from None
            _instances[params] = ocr
        return ocr


class RapidEngine:
    """RapidOCR in the local engine's thread pool, one shared instance, admitted by bytes."""

    def __init__(
        self, settings: config.OcrLocal, budget: Budget | None = None, then: str = RESTART
    ) -> None:
        self.settings = settings
        self.then = then
        self.threads = settings.threads or _cpu_count()
        self.budget = budget or Budget(settings.max_decoded_bytes)
        self.workers = Workers(self.threads, self.budget, "ocrproxy-rapidocr")
        self._ocr: Any = None
        self._problem = Problem(self._check)

    def problem(self) -> str | None:
        """Why the engine cannot run here (missing packages or model files), or None."""
        return self._problem.get()

    def _check(self) -> str | None:
        try:
            _modules()
        except ImportError:
            return install_hint(self.then)
        for path in model_files(self.settings).values():
            if not path.is_file():
                return (
                    f"The local OCR engine RapidOCR has no model file {path}: put it there "
                    f"(see [ocr.local] model_dir), {self.then}"
                )
        return None

    @functools.cached_property
    def version(self) -> str:
        """RapidOCR's version and ONNX Runtime's, e.g. ``3.10.0 (onnxruntime 1.32.0)``."""
        _, onnxruntime = _modules()
        return f"{_rapidocr_version()} (onnxruntime {onnxruntime.__version__})"

    @property
    def name(self) -> str:
        return f"RapidOCR {_rapidocr_version()}"

    @functools.cached_property
    def models_digest(self) -> str:
        """A digest of every model file's content (computed at ``start``, off the loop)."""
        return _digest(model_files(self.settings))

    def cache_tag(self) -> str:
        """Everything that changes what the engine reads: part of the description cache key."""
        return (
            f"rapidocr {self.version}; models {self.models_digest}; "
            f"max_side {self.settings.max_side}; layout 1"
        )

    async def start(self) -> None:
        """Load the models and read a small image once, so that no request pays for it; a
        no-op when the engine cannot run (``problem`` says why, to every request). Models that
        fail to load (a damaged file) make the engine one that cannot run, saying which
        files: the proxy still starts, for the requests that do not need it."""
        if self.problem() is not None:
            return
        try:
            await self.workers.call(self._warm)
        except Exception as exc:  # onnxruntime's errors have no common base worth naming
            files = ", ".join(str(p) for p in model_files(self.settings).values())
            problem = (
                f"The local OCR engine RapidOCR could not load its models ({files}: "
                f"{type(exc).__name__}); check [ocr.local] model_dir, {self.then}"
            )
            self._problem.set(problem)
            log.warning("%s", problem)

    def _warm(self) -> None:
        from PIL import Image, ImageDraw, ImageFont

        self.models_digest  # noqa: B018  (hashing 30 MB: here, not on the event loop)
        image = Image.new("L", (240, 240), 255)
        ImageDraw.Draw(image).text((10, 100), "ocrproxy 1", font=ImageFont.load_default(30))
        self._recognise(image)

    def _engine(self) -> Any:
        if self._ocr is None:  # held until close: models shared with other engines stay loaded
            self._ocr = _loaded(_params(self.settings))
        return self._ocr

    async def recognize(
        self, load: Callable[[], bytes], head: Callable[[int], bytes] | None = None
    ) -> str:
        """The text of the image whose bytes ``load`` returns (called in a worker thread);
        as ``local.Engine.recognize``."""
        problem = self.problem()
        if problem is not None:
            raise Unavailable(problem)
        size = await self.workers.call(functools.partial(measure, load, head, self._estimate))
        try:
            return await self.workers.run(size, functools.partial(self._work, load))
        except OverBudget as exc:
            raise RecognitionError(str(exc)) from None

    def _estimate(self, data: bytes, whole: bool = True) -> int:
        decoding, (width, height) = decoding_bytes(data, self.settings.max_side, whole)
        return max(decoding, width * height + reading_bytes(width, height))

    def _work(self, load: Callable[[], bytes]) -> str:
        return self._recognise(prepare(load(), self.settings.max_side))

    def _recognise(self, image: Any) -> str:
        import numpy

        pixels = numpy.asarray(image)  # greyscale, 2-D: RapidOCR makes it BGR itself
        try:
            result = self._engine()(pixels)
        except RecognitionError:
            raise
        except Exception as exc:  # ONNX Runtime's errors carry no client data
            raise RecognitionError(f"RapidOCR failed ({type(exc).__name__})") from None
        boxes, texts = getattr(result, "boxes", None), getattr(result, "txts", None)
        if boxes is None or not texts:
            return ""
        return layout.lines(boxes.tolist(), list(texts))

    def close(self) -> None:
        """Stop taking work (a recognition already running finishes on its own) and let go of
        the models, which are freed once no engine holds them."""
        self.workers.close()
        self._ocr = None

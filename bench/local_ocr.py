"""Local OCR benchmark: how fast and how well the local engines (Tesseract, RapidOCR) read.

Every image is rendered with Pillow at start-up from known text, so accuracy is measured too:

  screenshot    1280x720 light UI, 20 px text
  dark          1280x720 dark-mode code editor with a sidebar
  photo         a tilted notice on a textured table, blurred, JPEG quality 70
  page          4000x3000 scanned page (read at 2500 px, the default max_side)
  en-ui         1280x720 console: sidebar and a two-column invoice table (tests/cjkimages.py)
  zh-chat       750x1000 Chinese group chat, bubbles left and right
  zh-paragraph  1000x700 Chinese notice
  zh-mixed      1080x640 order card: Chinese, English, prices, phone and version numbers

Engines, side by side (each that can run here): ``tesseract`` (the default, eng),
``tesseract eng+chi_sim`` (when its language data is installed) and ``rapidocr`` (the
``rapidocr`` extra, its bundled PP-OCRv6 small model). Latency: each image read alone on a
one-thread engine, median of ``--repeat`` runs, with its character error rate (CER, as
``tests/cjkimages.cer``: whitespace and full-width forms normalised). Throughput, per image
class (English screens, Chinese screens, documents): a batch of each class's images, twice
over, submitted at once to an engine with one thread, then two, best of ``--repeat`` runs,
interleaved: images per second and the speed-up, which shows whether the threads really run in
parallel. Images go through ``recognize`` exactly as the proxy calls it (decoding, scaling,
recognition), without HTTP around it. On a shared machine, read the load average it prints.

    python bench/local_ocr.py [--json] [--repeat 3] [--model-dir DIR]

``--model-dir`` adds RapidOCR with other PP-OCR files (det.onnx, rec.onnx, dict.txt: the
PP-OCRv6 tiny ones, say), as ``[ocr.local] model_dir`` would give them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from msgspec.structs import replace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402

from ocrproxy import config, local  # noqa: E402
from tests import cjkimages  # noqa: E402

SCREEN_TEXT = (
    "Settings\n"
    "Account name: Maria Lopez\n"
    "Email notifications are turned on for new invoices.\n"
    "Storage used: 18.4 GB of 50 GB\n"
    "Last backup: 24 November 2026 at 06:15"
)
CODE_TEXT = (
    "def total_price(items, tax_rate):\n"
    "    subtotal = sum(item.price for item in items)\n"
    "    return round(subtotal * (1 + tax_rate), 2)\n"
    "\n"
    "print(total_price(basket, 0.2))"
)
NOTICE_TEXT = (
    "NOTICE TO RESIDENTS\n\nThe water supply will be off\n"
    "on Tuesday from 9 am to 3 pm\nfor repairs to the main pipe."
)


def font(size: int) -> Any:
    return ImageFont.load_default(size=size)


def encode(image: Image.Image, kind: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def screenshot() -> tuple[bytes, str]:
    image = Image.new("RGB", (1280, 720), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 1280, 48), fill=(230, 232, 236))
    draw.multiline_text((60, 90), SCREEN_TEXT, font=font(20), fill=(30, 30, 30), spacing=18)
    return encode(image), SCREEN_TEXT


def dark() -> tuple[bytes, str]:
    image = Image.new("RGB", (1280, 720), (30, 30, 30))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 220, 720), fill=(37, 37, 38))
    draw.multiline_text((260, 80), CODE_TEXT, font=font(20), fill=(212, 212, 212), spacing=12)
    return encode(image), CODE_TEXT


def photo() -> tuple[bytes, str]:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box = probe.multiline_textbbox((0, 0), NOTICE_TEXT, font=font(34), spacing=8)
    page = Image.new("RGB", (box[2] + 120, box[3] + 120), (245, 240, 228))
    ImageDraw.Draw(page).multiline_text(
        (60, 60), NOTICE_TEXT, font=font(34), fill=(25, 25, 35), spacing=8
    )
    table = Image.new("RGB", (page.width + 300, page.height + 300), (120, 90, 60))
    rng = random.Random(6)
    draw = ImageDraw.Draw(table)
    for _ in range(2500):
        shade = rng.randrange(80, 150)
        xy = (rng.randrange(table.width), rng.randrange(table.height))
        draw.point(xy, fill=(shade, shade - 30, shade - 60))
    mask = Image.new("L", page.size, 255).rotate(4, expand=True)
    table.paste(page.rotate(4, resample=Image.Resampling.BICUBIC, expand=True), (150, 150), mask)
    return encode(table.filter(ImageFilter.GaussianBlur(1.2)), "JPEG", quality=70), NOTICE_TEXT


def page() -> tuple[bytes, str]:
    image = Image.new("RGB", (4000, 3000), "white")
    draw = ImageDraw.Draw(image)
    lines = []
    for n in range(1, 28):
        line = f"Line {n}: the committee approved item {n * 7} of the budget on day {n % 28 + 1}."
        draw.text((150, 120 + (n - 1) * 102), line, font=font(64), fill="black")
        lines.append(line)
    return encode(image), "\n".join(lines)


SCENARIOS = {"screenshot": screenshot, "dark": dark, "photo": photo, "page": page}
SCENARIOS.update(cjkimages.IMAGES)
CLASSES = {
    "English screens": ("screenshot", "dark", "en-ui"),
    "Chinese screens": ("zh-chat", "zh-paragraph", "zh-mixed"),
    "documents": ("photo", "page"),
}
ENGINES = {
    "tesseract": config.OcrLocal(),
    "tesseract eng+chi_sim": config.OcrLocal(languages=("eng", "chi_sim")),
    "rapidocr": config.OcrLocal(engine="rapidocr"),
}


def engines(
    names: tuple[str, ...] = tuple(ENGINES),
) -> tuple[dict[str, config.OcrLocal], dict[str, str]]:
    """The engines among ``names`` that can run here, and why each other one cannot."""
    ready, skipped = {}, {}
    for name in names:
        problem = local.open_engine(ENGINES[name]).problem()
        if problem is None:
            ready[name] = ENGINES[name]
        else:
            skipped[name] = problem
    return ready, skipped


def cer(expected: str, got: str) -> float:
    """Edit distance over the expected length, whitespace runs counted as one space (the
    Latin-only rate of tests/test_local.py; the images here are scored by ``cjkimages.cer``)."""
    return cjkimages.error_rate(" ".join(expected.split()), " ".join(got.split()))


async def latency(
    settings: config.OcrLocal, images: dict[str, tuple[bytes, str]], repeat: int
) -> dict[str, Any]:
    engine = local.open_engine(replace(settings, threads=1))
    results: dict[str, Any] = {}
    try:
        await engine.start()
        first = next(iter(images.values()))[0]
        await engine.recognize(lambda: first)  # Tesseract loads its language data here
        for name, (data, text) in images.items():
            times, got = [], ""
            for _ in range(repeat):
                started = time.perf_counter()
                got = await engine.recognize(lambda data=data: data)  # type: ignore[misc]
                times.append(time.perf_counter() - started)
            results[name] = {
                "bytes": len(data),
                "s_per_image": round(statistics.median(times), 4),
                "s_min": round(min(times), 4),
                "cer": round(cjkimages.cer(text, got), 4),
            }
    finally:
        engine.close()
    return results


async def throughput(
    settings: config.OcrLocal, images: list[bytes], repeat: int
) -> list[dict[str, Any]]:
    """Images/s with one and with two threads, best of ``repeat`` runs each, interleaved so
    that a change in the machine's load hits both alike."""
    engines = {n: local.open_engine(replace(settings, threads=n)) for n in (1, 2)}
    best = dict.fromkeys(engines, float("inf"))
    try:
        for threads, engine in engines.items():
            await engine.start()
            # Each Tesseract thread loads its language data on its first image: not measured.
            await asyncio.gather(*(engine.recognize(lambda: images[0]) for _ in range(threads)))
        for _ in range(repeat):
            for threads, engine in engines.items():
                started = time.perf_counter()
                await asyncio.gather(*(engine.recognize(lambda d=d: d) for d in images))  # type: ignore[misc]
                best[threads] = min(best[threads], time.perf_counter() - started)
    finally:
        for engine in engines.values():
            engine.close()
    return [
        {
            "threads": threads,
            "images": len(images),
            "seconds": round(elapsed, 3),
            "images_per_s": round(len(images) / elapsed, 2),
        }
        for threads, elapsed in best.items()
    ]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024, 1)


async def measure(
    settings: config.OcrLocal,
    images: dict[str, tuple[bytes, str]],
    classes: dict[str, tuple[str, ...]],
    repeat: int,
) -> dict[str, Any]:
    """One engine: latency and CER per image, then images/s per class at 1 and 2 threads."""
    engine = local.open_engine(settings)
    result: dict[str, Any] = {"name": engine.name, "cache_tag": engine.cache_tag()}
    result["latency"] = await latency(settings, images, repeat)
    result["throughput"] = {}
    for name, members in classes.items():
        batch = [images[m][0] for m in members] * 2
        one, two = await throughput(settings, batch, repeat)
        result["throughput"][name] = {
            "rows": [one, two],
            "speedup_2_threads": round(two["images_per_s"] / one["images_per_s"], 2),
        }
    return result


async def run(repeat: int, model_dir: str = "") -> dict[str, Any]:
    ready, skipped = engines()
    if model_dir:  # other PP-OCR files, e.g. PP-OCRv6 tiny ([ocr.local] model_dir)
        own = config.OcrLocal(engine="rapidocr", model_dir=model_dir)
        problem = local.open_engine(own).problem()
        if problem is None:
            ready["rapidocr model_dir"] = own
        else:
            skipped["rapidocr model_dir"] = problem
    if not ready:
        raise SystemExit(f"local OCR engine unavailable: {skipped}")
    load_before = os.getloadavg()[0]
    images = {name: make() for name, make in SCENARIOS.items()}
    return await compare(ready, skipped, images, CLASSES, repeat, load_before)


async def compare(
    ready: dict[str, config.OcrLocal],
    skipped: dict[str, str],
    images: dict[str, tuple[bytes, str]],
    classes: dict[str, tuple[str, ...]],
    repeat: int,
    load_before: float,
) -> dict[str, Any]:
    """Each engine in turn (Tesseract first: RapidOCR's memory stays with the process), and the
    process's peak RSS after each."""
    result: dict[str, Any] = {
        "cpus": local.open_engine(config.OcrLocal()).threads,
        "load_average_before": round(load_before, 2),
        "omp_thread_limit": os.environ.get("OMP_THREAD_LIMIT"),
        "skipped": skipped,
        "engines": {},
    }
    for name, settings in ready.items():
        measured = await measure(settings, images, classes, repeat)
        measured["peak_rss_mb_after"] = peak_rss_mb()
        result["engines"][name] = measured
    return result


def table(result: dict[str, Any]) -> str:
    engines = result["engines"]
    names = list(engines)
    lines = [
        f"{result['cpus']} CPU(s), load average {result['load_average_before']} before the run",
        *(f"  {n}: {e['name']}; {e['cache_tag']}" for n, e in engines.items()),
        *(f"  {n}: skipped ({why})" for n, why in result["skipped"].items()),
        "",
        f"{'CER / s per image':<16}" + "".join(f"{n:>26}" for n in names),
    ]
    images = next(iter(engines.values()))["latency"]
    for image in images:
        cells = [engines[n]["latency"][image] for n in names]
        lines.append(
            f"{image:<16}" + "".join(f"{c['cer']:>14.1%} {c['s_per_image']:>9.3f} s" for c in cells)
        )
    lines += ["", f"{'images/s':<16}" + "".join(f"{n:>26}" for n in names)]
    for cls in next(iter(engines.values()))["throughput"]:
        for i, threads in enumerate((1, 2)):
            row = [engines[n]["throughput"][cls]["rows"][i]["images_per_s"] for n in names]
            label = f"{cls}, {threads}t"
            lines.append(f"{label:<24}"[:24] + "".join(f"{v:>26.2f}" for v in row))
    lines.append(
        "peak RSS after each (MB): "
        + ", ".join(f"{n} {e['peak_rss_mb_after']}" for n, e in engines.items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeat", type=int, default=3, help="latency runs per image")
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # older callers
    parser.add_argument(
        "--model-dir", default="", help="also RapidOCR with these files ([ocr.local] model_dir)"
    )
    args = parser.parse_args()
    result = asyncio.run(run(args.repeat, args.model_dir))
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()

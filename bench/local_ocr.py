"""Local OCR benchmark: how fast and how well the built-in Tesseract engine reads images.

Every image is rendered with Pillow at start-up from known text, so accuracy is measured too:

  screenshot  1280x720 light UI, 20 px text
  dark        1280x720 dark-mode code editor with a sidebar
  photo       a tilted notice on a textured table, blurred, JPEG quality 70
  page        4000x3000 scanned page (read at 2500 px, the default max_side)

Latency: each image read alone on a one-thread engine, median of ``--repeat`` runs, with its
character error rate (CER). Throughput: a mixed batch of ``--batch`` images (screenshot, dark,
photo) submitted at once to an engine with one thread, then two, best of ``--repeat`` runs,
interleaved: images per second and the speed-up, which shows whether the engines on different
threads really run in parallel (an OpenMP build of Tesseract without OMP_THREAD_LIMIT=1 does
not). Images go through ``Engine.recognize`` exactly as the proxy calls it (decoding, scaling,
recognition), without HTTP around it. On a shared machine, read the load average it prints.

    python bench/local_ocr.py [--json] [--repeat 3] [--batch 12]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402

from ocrproxy import config, local  # noqa: E402

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


def cer(expected: str, got: str) -> float:
    """Edit distance over the expected length, whitespace runs counted as one space."""
    a, b = " ".join(expected.split()), " ".join(got.split())
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1] / max(1, len(a))


async def latency(images: dict[str, tuple[bytes, str]], repeat: int) -> dict[str, Any]:
    engine = local.Engine(config.OcrLocal(threads=1))
    results: dict[str, Any] = {}
    try:
        await engine.recognize(lambda: images["screenshot"][0])  # load the language data
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
                "cer": round(cer(text, got), 4),
            }
    finally:
        engine.close()
    return results


async def throughput(images: list[bytes], repeat: int) -> list[dict[str, Any]]:
    """Images/s with one and with two threads, best of ``repeat`` runs each, interleaved so
    that a change in the machine's load hits both alike."""
    engines = {threads: local.Engine(config.OcrLocal(threads=threads)) for threads in (1, 2)}
    best = dict.fromkeys(engines, float("inf"))
    try:
        for threads, engine in engines.items():
            # Each thread loads its language data on its first image: not part of the measure.
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


async def run(repeat: int, batch: int) -> dict[str, Any]:
    problem = local.Engine(config.OcrLocal()).problem()
    if problem is not None:
        raise SystemExit(f"local OCR engine unavailable: {problem}")
    load_before = os.getloadavg()[0]
    images = {name: make() for name, make in SCENARIOS.items()}
    lat = await latency(images, repeat)
    mix = [images[n][0] for n in ("screenshot", "dark", "photo")]
    batch_images = [mix[i % len(mix)] for i in range(batch)]
    one, two = await throughput(batch_images, repeat)
    tesseract = local.Engine(config.OcrLocal())
    return {
        "engine": tesseract.name,
        "cache_tag": tesseract.cache_tag(),
        "cpus": tesseract.threads,
        "load_average_before": round(load_before, 2),
        "omp_thread_limit": os.environ.get("OMP_THREAD_LIMIT"),
        "latency": lat,
        "throughput": [one, two],
        "speedup_2_threads": round(two["images_per_s"] / one["images_per_s"], 2),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['engine']} on {result['cpus']} CPU(s), "
        f"load average {result['load_average_before']} before the run",
        "",
        f"{'image':<12}{'bytes':>10}{'s/image':>10}{'CER':>8}",
    ]
    for name, row in result["latency"].items():
        lines.append(f"{name:<12}{row['bytes']:>10}{row['s_per_image']:>10.3f}{row['cer']:>8.1%}")
    lines += ["", f"{'threads':<12}{'images':>10}{'seconds':>10}{'img/s':>8}"]
    for row in result["throughput"]:
        lines.append(
            f"{row['threads']:<12}{row['images']:>10}{row['seconds']:>10.2f}"
            f"{row['images_per_s']:>8.2f}"
        )
    lines.append(f"speed-up with 2 threads: {result['speedup_2_threads']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeat", type=int, default=3, help="latency runs per image")
    parser.add_argument("--batch", type=int, default=12, help="images per throughput run")
    args = parser.parse_args()
    result = asyncio.run(run(args.repeat, args.batch))
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()

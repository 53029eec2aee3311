"""Scenario 7 for the smoke run: ``bench/local_ocr.py``'s two measures, on two small images.

The same functions as the full run (``latency`` and ``throughput``, the engine as the proxy
calls it) and the same JSON shape, but the latency and error rate of the 1280x720 screenshot
only, and the throughput of two copies of the small photo: the 4000x3000 page alone takes
seconds. Run: ``python -m bench.local_ocr_smoke``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from . import local_ocr
from .local_ocr import config, local


async def run() -> dict[str, Any]:
    engine = local.Engine(config.OcrLocal())
    problem = engine.problem()
    if problem is not None:
        raise SystemExit(f"local OCR engine unavailable: {problem}")
    lat = await local_ocr.latency({"screenshot": local_ocr.screenshot()}, 1)
    photo = local_ocr.photo()[0]
    one, two = await local_ocr.throughput([photo, photo], 1)
    return {
        "engine": engine.name,
        "cpus": engine.threads,
        "latency": lat,
        "throughput": [one, two],
        "speedup_2_threads": round(two["images_per_s"] / one["images_per_s"], 2),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run()), indent=2))

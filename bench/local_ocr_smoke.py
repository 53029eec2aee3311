"""Scenario 7 for the smoke run: ``bench/local_ocr.py``'s measures on one tiny image per engine.

The same functions as the full run (``compare``: latency, CER, images/s at one and two threads,
the engine as the proxy calls it) and the same JSON shape, but each engine reads one small
image: Tesseract an English line, RapidOCR a Chinese and English one; RapidOCR's models load
once (about 5 s), everything else takes a fraction of a second. Run:
``python -m bench.local_ocr_smoke``.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from . import local_ocr
from .local_ocr import cjkimages

ENGLISH = "Invoice INV-2026-0081 Refunded"
CHINESE = "订单号 2026112400381 已退款"


def tiny(text: str, face: Any) -> tuple[bytes, str]:
    """``text`` on one line of a 560x90 image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (560, 90), "white")
    ImageDraw.Draw(image).text((20, 28), text, font=face, fill="black")
    return cjkimages.png(image), text


async def run() -> dict[str, Any]:
    ready, skipped = local_ocr.engines(("tesseract", "rapidocr"))
    if not ready:
        raise SystemExit(f"local OCR engine unavailable: {skipped}")
    load = os.getloadavg()[0]
    result: dict[str, Any] = {}
    for name, settings in ready.items():
        image = (
            tiny(ENGLISH, cjkimages.en(26))
            if name == "tesseract"
            else tiny(CHINESE, cjkimages.zh(26))
        )
        one = await local_ocr.compare(
            {name: settings}, {}, {"tiny": image}, {"tiny": ("tiny",)}, 1, load
        )
        if not result:
            result = one
        result["engines"].update(one["engines"])
    result["skipped"] = skipped
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run()), indent=2))

"""The local engine's memory: small images that decode to hundreds of megabytes.

A 7000x7000 RGBA PNG of zeros is about 190 KB on the wire and 196 MB once Pillow decodes it
(four bytes a pixel). Four distinct ones are sent at once to a real ``ocrproxy serve`` process,
with the engine's default threads (one per CPU) and with four threads, and the process's peak
resident memory (``VmHWM``, which the kernel keeps, so nothing is missed between polls) must
stay under 1 GB. The budget of decoded bytes is also checked on its own: an image larger than
the whole budget is refused, the wait for budget counts against the caller's deadline, and the
bytes come back when the thread finishes.

Needs the ``local`` extra and Tesseract's English data; skips without them (fails under CI).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from ocrproxy import config, local
from tests.conftest import chat, missing, spawn_proxy
from tests.fakes import FakeOpenAI, image_part

try:
    from PIL import Image
except ImportError:  # pragma: no cover - the local extra is missing
    Image = None  # type: ignore[assignment]

SIDE = 7000
LIMIT = 1_000_000_000  # bytes of peak RSS for the whole proxy process


@pytest.fixture(autouse=True)
def _need_engine() -> None:
    if Image is None:
        missing("Pillow is not installed (pip install 'ocrproxy[local]')")
    problem = local.Engine(config.OcrLocal()).problem()
    if problem is not None:
        missing(problem)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def _zeros_idat(side: int) -> bytes:
    packer = zlib.compressobj(6)
    row = bytes(1 + 4 * side)  # filter byte 0, then the pixels
    return b"".join(packer.compress(row) for _ in range(side)) + packer.flush()


def bomb_png(label: str, side: int = SIDE) -> bytes:
    """A ``side`` x ``side`` RGBA PNG of zeros (transparent black), built without decoding it.

    ``label`` goes in a text chunk, so that each image has its own bytes (and cache key).
    """
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"tEXt", b"Comment\0" + label.encode())
        + _chunk(b"IDAT", _zeros_idat(side))
        + _chunk(b"IEND", b"")
    )


def _status(pid: int) -> dict[str, int]:
    """The ``kB`` fields of /proc/PID/status, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


@pytest.fixture(scope="module")
def bombs() -> list[str]:
    return [
        "data:image/png;base64," + base64.b64encode(bomb_png(f"bomb {i}")).decode()
        for i in range(4)
    ]


@pytest.mark.parametrize("threads", [0, 4])
async def test_four_decompression_bombs_stay_under_1_gb(
    fake: FakeOpenAI, tmp_path: Path, bombs: list[str], threads: int
) -> None:
    assert len(bombs[0]) < 300_000  # a small request: the cost is all in decoding
    cfg = f"""
[[upstreams]]
name = "fake"
base_url = "{fake.url}"
[ocr]
model = "vision-1"
on_error = "fail"
[ocr.local]
threads = {threads}
"""
    async with spawn_proxy(tmp_path, cfg) as (proc, base, session, log_path):
        before = _status(proc.pid)

        async def send(url: str) -> tuple[int, Any]:
            body = chat("text-1", "What is in it?", image_part(url), ocr_model="local")
            async with session.post(base + "/v1/chat/completions", json=body) as r:
                return r.status, await r.json()

        answers = await asyncio.wait_for(asyncio.gather(*(send(u) for u in bombs)), 60)
        after = _status(proc.pid)
    peak = after["VmHWM"]
    print(
        f"threads={threads}: RSS {before['VmRSS'] / 1e6:.0f} MB before, "
        f"peak {peak / 1e6:.0f} MB, {after['VmRSS'] / 1e6:.0f} MB after"
    )
    for status, answer in answers:
        assert status == 200, answer
    sent = [r.json()["messages"][0]["content"] for r in fake.chat_requests]
    assert len(sent) == 4
    assert all("TEXT:\n(no text found)" in text for text in sent), sent
    assert peak < LIMIT, f"the proxy peaked at {peak / 1e6:.0f} MB RSS"

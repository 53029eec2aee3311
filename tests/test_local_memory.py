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
import binascii
import functools
import io
import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from ocrproxy import admission, config, images, local, pixels, state
from tests.conftest import ProxyFactory, chat, require_local_engine, spawn_proxy
from tests.fakes import FakeOpenAI, image_part

try:
    from PIL import Image, ImageDraw, ImageFont
except ImportError:  # pragma: no cover - the local extra is missing
    Image = None  # type: ignore[assignment]

SIDE = 7000
LIMIT = 1_000_000_000  # bytes of peak RSS for the whole proxy process


@pytest.fixture(autouse=True)
def _need_engine() -> None:
    require_local_engine()  # Pillow comes with it (the `local` extra)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def _zeros_idat(side: int) -> bytes:
    packer = zlib.compressobj(6)
    row = bytes(1 + 4 * side)  # filter byte 0, then the pixels
    return b"".join(packer.compress(row) for _ in range(side)) + packer.flush()


def bomb_png(label: str, side: int = SIDE, *, pixels: bool = True) -> bytes:
    """A ``side`` x ``side`` RGBA PNG of zeros (transparent black), built without decoding it.

    ``label`` goes in a text chunk, so that each image has its own bytes (and cache key);
    without ``pixels``, the file stops after its header.
    """
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    head = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"tEXt", b"Comment\0" + label.encode())
    )
    if not pixels:
        return head + _chunk(b"IDAT", b"")[:8]
    return head + _chunk(b"IDAT", _zeros_idat(side)) + _chunk(b"IEND", b"")


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


async def read_at_once(
    fake: FakeOpenAI, folder: Path, urls: list[str], local: str, ocr: str = ""
) -> tuple[dict[str, int], dict[str, int], list[tuple[int, str]]]:
    """A fresh ``ocrproxy serve`` (``[ocr.local]`` lines ``local``, more ``[ocr]`` lines
    ``ocr``) reads the images ``urls`` with the local engine, all at once: its /proc status
    after start-up and after the answers, and the answers."""
    cfg = f"""
[[upstreams]]
name = "fake"
base_url = "{fake.url}"
check_models = false
[ocr]
model = "vision-1"
on_error = "fail"
{ocr}
[ocr.local]
{local}
"""
    async with spawn_proxy(folder, cfg) as (proc, base, session, _):
        before = _status(proc.pid)

        async def send(url: str) -> tuple[int, str]:
            body = chat("text-1", "What is in it?", image_part(url), ocr_model="local")
            async with session.post(base + "/v1/chat/completions", json=body) as r:
                return r.status, await r.text()

        answers = await asyncio.gather(*(send(u) for u in urls))
        return before, _status(proc.pid), answers


async def _peak_rss(fake: FakeOpenAI, folder: Path, bombs: list[str], threads: int) -> str:
    """Send the bombs at once to a fresh proxy with ``threads`` engine threads; its peak RSS."""
    folder.mkdir()
    before, after, answers = await read_at_once(fake, folder, bombs, f"threads = {threads}")
    peak = after["VmHWM"]
    report = (
        f"threads={threads or 'default'}: RSS {before['VmRSS'] / 1e6:.0f} MB before, "
        f"peak {peak / 1e6:.0f} MB, {after['VmRSS'] / 1e6:.0f} MB after"
    )
    assert peak < LIMIT, f"the proxy peaked past 1 GB: {report}"
    for status, text in answers:
        assert status == 200, text
    return report


@pytest.mark.timeout(180)
async def test_four_decompression_bombs_stay_under_1_gb(
    fake: FakeOpenAI, tmp_path: Path, bombs: list[str]
) -> None:
    """Four 190 KB PNGs that decode to 196 MB each, at once, through a real proxy: with the
    default threads (one per CPU) and with four. The two proxies run side by side (each reads
    its images one at a time, within its budget), which halves the test's time."""
    assert len(bombs[0]) < 300_000  # a small request: the cost is all in decoding
    reports = await asyncio.gather(
        _peak_rss(fake, tmp_path / "default", bombs, 0),
        _peak_rss(fake, tmp_path / "four", bombs, 4),
    )
    print("\n".join(reports))
    sent = [r.json()["messages"][0]["content"] for r in fake.chat_requests]
    assert len(sent) == 8
    assert all("TEXT:\n(no text found)" in text for text in sent), sent


# What decoded_bytes says is an upper bound of what prepare() really holds: each case runs in a
# fresh interpreter, whose peak (VmHWM, reset just before) is compared with the estimate.
_PEAK_SCRIPT = """
import gc, io, sys
from PIL import Image
from ocrproxy import local, pixels
from tests.test_local_memory import bomb_png, sample

local._tesserocr()
data = sample(sys.argv[1])
gc.collect()

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = rss("VmRSS")
need = pixels.decoded_bytes(data, 2500)
image = pixels.prepare(data, 2500)
print(need, rss("VmHWM") - before, image.width, image.height)
"""


def sample(kind: str) -> bytes:
    """An image of ``kind`` whose decoding is large enough to stand out of the noise."""
    if kind == "png-rgba":
        return bomb_png("estimate", 4000)
    buffer = io.BytesIO()
    size = (4000, 3000)
    if kind == "png-l":
        Image.new("L", size, 255).save(buffer, "PNG")
    elif kind == "gif-transparent":
        Image.new("P", size, 0).save(buffer, "GIF", transparency=0)
    elif kind == "jpeg-444":
        Image.new("RGB", size, "white").save(buffer, "JPEG", progressive=True, subsampling=0)
    elif kind == "jpeg-baseline":
        Image.new("RGB", size, "white").save(buffer, "JPEG")
    elif kind == "webp":
        Image.new("RGBA", (2500, 2500), 0).save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "kind",
    [
        "png-rgba",
        "png-l",
        "gif-transparent",
        "jpeg-444",
        "jpeg-baseline",
        "webp",
    ],
)
def test_estimate_covers_the_real_peak(kind: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, kind],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if "clear_refs" in done.stderr:
        pytest.skip("this kernel does not let a process reset its VmHWM")
    assert done.returncode == 0, done.stderr
    need, peak, width, height = map(int, done.stdout.split())
    print(f"{kind}: estimated {need / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB")
    assert max(width, height) == 2500
    assert peak <= need, f"{kind}: prepare held {peak} bytes, the estimate was {need}"
    if kind != "jpeg-baseline":  # counted as if progressive: its header cannot tell
        assert need < 2 * peak + 32 * local.MiB  # an estimate, not a wild guess


def test_estimate_reads_only_the_header() -> None:
    """A 7000x7000 image that would need 196 MB is measured without a decoded pixel."""
    need = pixels.decoded_bytes(bomb_png("header only", pixels=False), 2500)
    assert 200_000_000 < need < 256 * local.MiB  # accepted by the default budget, alone
    with pytest.raises(local.RecognitionError, match="could not be decoded"):
        pixels.decoded_bytes(b"not an image at all", 2500)
    with pytest.raises(local.RecognitionError, match="too large"):
        pixels.decoded_bytes(bomb_png("giant", 9000, pixels=False), 2500)


async def test_budget_is_first_come_first_served() -> None:
    budget = admission.Budget(100)
    await budget.acquire(60)
    big = asyncio.ensure_future(budget.acquire(80))
    small = asyncio.ensure_future(budget.acquire(10))
    await asyncio.sleep(0.01)
    assert not big.done() and not small.done()  # 10 would fit, but 80 came first
    budget.release(60)
    await asyncio.wait_for(big, 1)
    await asyncio.wait_for(small, 1)
    assert budget.free == 10
    budget.release(90)
    assert budget.free == 100
    with pytest.raises(admission.OverBudget, match="max_decoded_bytes"):
        await budget.acquire(101)


async def test_budget_survives_cancelled_waiters() -> None:
    budget = admission.Budget(100)
    await budget.acquire(100)
    queued = asyncio.ensure_future(budget.acquire(50))
    behind = asyncio.ensure_future(budget.acquire(30))
    await asyncio.sleep(0.01)
    queued.cancel()  # gone while still waiting: the one behind it moves up
    budget.release(40)
    await asyncio.wait_for(behind, 1)
    assert budget.free == 10
    granted = asyncio.ensure_future(budget.acquire(10))
    await asyncio.sleep(0.01)
    assert granted.done()
    budget.release(10)
    # Granted and cancelled before it could run: the bytes come back, none are lost.
    waiting = asyncio.ensure_future(budget.acquire(80))
    await asyncio.sleep(0.01)
    budget.release(70)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert budget.free == 80 and not budget._waiters


async def test_bytes_are_held_until_the_thread_finishes() -> None:
    """A caller that gives up does not free its bytes: a free thread is not enough to start."""
    pool = admission.Workers(2, admission.Budget(100), "ocrproxy-test")
    release = threading.Event()
    second_started = threading.Event()
    try:
        first = asyncio.ensure_future(pool.run(80, lambda: release.wait(10)))
        await asyncio.sleep(0.05)
        first.cancel()
        second = asyncio.ensure_future(pool.run(80, second_started.set))
        await asyncio.sleep(0.3)
        assert not second_started.is_set()
        release.set()
        await asyncio.wait_for(second, 10)
        assert first.cancelled()
        await asyncio.sleep(0.05)  # the second thread's give-back runs on the loop
        assert pool.budget.free == 100
        with pytest.raises(admission.OverBudget, match="max_decoded_bytes"):
            await pool.run(101, lambda: None)
    finally:
        release.set()
        pool.close()


async def test_image_larger_than_the_budget_is_refused(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        ocr={"on_error": "fail", "local": {"max_decoded_bytes": 16 * local.MiB}}
    )
    url = "data:image/png;base64," + base64.b64encode(bomb_png("big", 4000)).decode()
    body = chat("text-1", "Read", image_part(url), ocr_model="local")
    resp = await proxy.post("/v1/chat/completions", json=body)
    error = (await resp.json())["error"]
    assert resp.status == 502 and error["code"] == "ocr_failed", error
    assert "MiB of memory" in error["message"], error
    assert "[ocr.local] max_decoded_bytes, 16 MiB" in error["message"], error


async def test_waiting_for_budget_counts_against_the_deadline(
    make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(ocr={"on_error": "fail", "timeout_s": 1.0})
    budget = proxy.server.app[state.DESCRIBER].engine.budget
    small = bomb_png("small", 300)
    url = "data:image/png;base64," + base64.b64encode(small).decode()
    body = chat("text-1", "Read", image_part(url), ocr_model="local")
    await budget.acquire(budget.limit)  # every byte is in use elsewhere
    try:
        started = time.monotonic()
        resp = await proxy.post("/v1/chat/completions", json=body)
        waited = time.monotonic() - started
        error = (await resp.json())["error"]
        assert resp.status == 502 and "did not finish within 1 s" in error["message"], error
        assert waited < 10
        assert budget.free == 0 and not budget._waiters  # the waiter left with its request
    finally:
        budget.release(budget.limit)
    await _reads_no_text(proxy, fake, body)


async def _reads_no_text(proxy: Any, fake: FakeOpenAI, body: dict[str, Any]) -> None:
    """Send ``body`` as a body streamed in (as a large request arrives): the local engine read
    its blank image and the text model was told it holds no text."""
    resp = await proxy.post(
        "/v1/chat/completions",
        data=io.BytesIO(json.dumps(body).encode()),
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    assert "(no text found)" in fake.chat_requests[-1].json()["messages"][0]["content"]


def _text_image(mode: str, size: tuple[int, int], background: Any, ink: Any) -> Any:
    image = Image.new(mode, size, background)
    draw = ImageDraw.Draw(image)
    face = ImageFont.load_default(size=size[1] // 6)
    draw.text((size[0] // 20, size[1] // 3), "Invoice 2041 paid", font=face, fill=ink)
    return image


def _encode(image: Any, kind: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
async def test_exif_orientation_after_scaling(kind: str) -> None:
    """A sideways photo marked "rotate 90" is read upright, also when it must be scaled."""
    upright = _text_image("RGB", (3200, 800), "white", "black")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 800x3200
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer must turn it 90 degrees clockwise
    data = _encode(stored, kind, exif=exif.tobytes())
    prepared = pixels.prepare(data, 2500)
    assert prepared.size == (2500, 625)
    engine = local.Engine(config.OcrLocal(threads=1))
    try:
        text = await engine.recognize(lambda: data)
    finally:
        engine.close()
    assert "Invoice 2041 paid" in text, text


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_flattened_onto_white_after_scaling(mode: str) -> None:
    clear: Any = (0, 0, 0, 0) if mode == "RGBA" else (0, 0) if mode == "LA" else 0
    ink: Any = (0, 0, 0, 255) if mode == "RGBA" else (0, 255) if mode == "LA" else 1
    image = _text_image(mode, (5000, 1000), clear, ink)
    options: dict[str, Any] = {}
    if mode == "P":
        image.putpalette([0, 0, 0, 0, 0, 0])
        options["transparency"] = 0  # black, but transparent
    data = _encode(image, "PNG", **options)
    prepared = pixels.prepare(data, 2500)
    assert prepared.mode == "L" and prepared.size == (2500, 500)
    assert prepared.getpixel((5, 5)) == 255  # transparent black became white
    assert prepared.getextrema()[0] < 60  # the opaque black text stayed dark
    histogram = prepared.histogram()
    assert sum(histogram[200:]) > 0.8 * sum(histogram)  # not inverted as a dark image


def test_dark_mode_is_still_inverted_after_strips() -> None:
    image = _text_image("RGB", (5000, 1200), (20, 22, 28), (230, 230, 230))
    prepared = pixels.prepare(_encode(image, "PNG"), 2500)
    assert prepared.size == (2500, 600)
    assert prepared.getpixel((5, 5)) > 200 and prepared.getextrema()[0] < 80


# --- Measuring reads only the header: the base64 of a large image is decoded once, not twice.


def _padded_png(label: str, side: int, extra: int) -> bytes:
    """A small white PNG made ``extra`` bytes larger by an incompressible private chunk after
    its pixel data (which every reader skips): a large upload that is quick to recognise."""
    small = _encode(Image.new("L", (side, side), 255), "PNG")
    iend = small.rindex(b"IEND") - 4
    filler = _chunk(b"prVt", label.encode() + bytes(range(256)) * (extra // 256))
    return small[:iend] + filler + small[iend:]


def _with_app_segments(jpeg: bytes, total: int) -> bytes:
    """``jpeg`` with ``total`` bytes of APP15 segments before its frame header (as large EXIF
    or ICC data would be), so its header ends past the first HEADER_BYTES."""
    segments = b""
    while len(segments) < total:
        segments += b"\xff\xef" + struct.pack(">H", 65535) + bytes(65533)
    return jpeg[:2] + segments + jpeg[2:]


def _as_url(data: bytes) -> bytes:
    return b"data:image/png;base64," + base64.b64encode(data)


def _measure(data: bytes) -> tuple[int, list[int], int]:
    """(the estimate, the prefix sizes asked of ``head``, how often the whole was loaded)."""
    url = _as_url(data)
    asked: list[int] = []
    loads = 0

    def head(limit: int) -> bytes:
        asked.append(limit)
        return images.decode_data_url(url, "w", limit)

    def load() -> bytes:
        nonlocal loads
        loads += 1
        return images.decode_data_url(url, "w")

    engine = local.Engine(config.OcrLocal(threads=1))
    try:
        return engine._measure(load, head), asked, loads
    finally:
        engine.close()


@pytest.mark.parametrize(
    "kind", ["png-rgba", "png-l", "gif-transparent", "jpeg-444", "jpeg-baseline", "webp"]
)
def test_measuring_a_prefix_gives_the_whole_estimate(kind: str) -> None:
    """Each format of test_estimate_covers_the_real_peak, made 10 MiB large, is measured from
    its first HEADER_BYTES alone (the whole image is never decoded), to the same estimate."""
    data = sample(kind)
    if kind.startswith("png"):
        small = _encode(Image.open(io.BytesIO(data)), "PNG")
        iend = small.rindex(b"IEND") - 4
        data = small[:iend] + _chunk(b"prVt", bytes(range(256)) * 40_000) + small[iend:]
    else:
        data += bytes(range(256)) * 40_000  # trailing bytes: no reader looks past the header
    assert len(data) > 10_000_000
    need, asked, loads = _measure(data)
    assert need == pixels.decoded_bytes(data, 2500)
    assert asked == [local.HEADER_BYTES] and loads == 0  # 256 KiB of base64, not 13 MiB
    prefix = images.decode_data_url(_as_url(data), "w", local.HEADER_BYTES)
    assert local.HEADER_BYTES <= len(prefix) < local.HEADER_BYTES + 3
    assert pixels.decoded_bytes(prefix, 2500, whole=False) == need


def test_a_header_past_the_prefix_is_measured_whole() -> None:
    """A JPEG whose frame header comes after 300 KB of APP segments: measured from its whole
    bytes, to the estimate of the whole. A small image is measured from its bytes once."""
    photo = _encode(Image.new("RGB", (3000, 2000), "white"), "JPEG")
    late = _with_app_segments(photo, 300_000)
    need, asked, loads = _measure(late)
    assert need == pixels.decoded_bytes(late, 2500) == pixels.decoded_bytes(photo, 2500)
    assert asked == [local.HEADER_BYTES] and loads == 1
    with pytest.raises(pixels.CutShort):
        pixels.decoded_bytes(late[: local.HEADER_BYTES], 2500, whole=False)
    need, asked, loads = _measure(photo)  # all of it is in the prefix: no second decode
    assert need == pixels.decoded_bytes(photo, 2500) and loads == 0
    # Too large: refused from the prefix (not CutShort, so never decoded whole); damaged: too.
    giant = bomb_png("giant", 9000, pixels=False) + bytes(2 * local.HEADER_BYTES)
    with pytest.raises(pixels.TooLarge, match="too large"):
        pixels.decoded_bytes(giant[: local.HEADER_BYTES], 2500, whole=False)
    with pytest.raises(local.RecognitionError, match="too large"):
        _measure(giant)
    with pytest.raises(local.RecognitionError, match="could not be decoded"):
        _measure(b"GIF89a" + bytes(100))


async def test_a_large_upload_is_decoded_once_by_the_engine(
    make_proxy: ProxyFactory, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the proxy: a 10 MiB PNG's base64 is decoded by the validation (piece by piece)
    and by the engine's reading, plus the first 256 KiB for its header: not a third time."""
    data = _padded_png("once", 400, 10 * 1024 * 1024)
    url = _as_url(data).decode()
    decoded: list[int] = []
    real = binascii.a2b_base64

    def counting(payload: Any, **options: Any) -> bytes:
        decoded.append(len(payload))
        return real(payload, **options)

    monkeypatch.setattr(images.binascii, "a2b_base64", counting)
    proxy = await make_proxy(ocr={"on_error": "fail"})
    body = chat("text-1", "Read", image_part(url), ocr_model="local")
    await _reads_no_text(proxy, fake, body)
    payload = len(url) - len("data:image/png;base64,")
    assert payload * 2 <= sum(decoded) <= payload * 2 + 256 * 1024, decoded

"""The RapidOCR engine (``[ocr.local] engine = "rapidocr"``): Chinese and UI screenshots read
back with a CER bound, lines rebuilt from boxes, offline, models by path, through the proxy.

Images come from ``tests/cjkimages.py`` (exact ground truth; its docstring defines the CER).
Needs the ``rapidocr`` extra and fonts-noto-cjk: without them these tests skip, except under CI,
where they fail. The layout tests and the missing-extra test need neither.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from ocrproxy import cli, config, layout, local, local_rapid
from tests import cjkimages
from tests.conftest import ProxyFactory, chat, missing
from tests.fakes import FakeOpenAI, image_part

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAPID = config.OcrLocal(engine="rapidocr")


def require_rapidocr() -> None:
    """Skip (fail under CI) unless the rapidocr extra, its models and the fonts are here."""
    problem = local_rapid.RapidEngine(RAPID).problem() or cjkimages.fonts_missing()
    if problem is not None:
        missing(problem)


@pytest.fixture(scope="module")
def _warm() -> Iterator[None]:
    """Load the models once for the module (5 s): every engine with the same settings reuses
    them while this one holds them."""
    require_rapidocr()
    holder = local_rapid.RapidEngine(RAPID)
    holder._warm()
    yield
    holder._ocr = None  # its workers never started: nothing else to close


@pytest.fixture
async def engine(_warm: None) -> AsyncIterator[local_rapid.RapidEngine]:
    eng = local_rapid.RapidEngine(RAPID)
    yield eng
    eng.close()


def data_url(data: bytes) -> str:
    import base64

    return f"data:image/png;base64,{base64.b64encode(data).decode()}"


# Layout: pure, on boxes drawn by hand (no OCR package needed).


def quad(left: float, top: float, right: float, bottom: float, angle: float = 0.0) -> list[Any]:
    """A box's corners clockwise from its top left, rotated by ``angle`` degrees about (0, 0)."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    corners = [(left, top), (right, top), (right, bottom), (left, bottom)]
    return [(x * c - y * s, x * s + y * c) for x, y in corners]


def test_deskew_keeps_prices_with_their_items() -> None:
    """A receipt tilted 4 degrees: raw y would pair each price with the next item."""
    items = [("Bread", "2.40"), ("Milk", "1.15"), ("Eggs", "3.90"), ("Tea", "4.25")]
    quads, texts = [], []
    for n, (item, price) in enumerate(items):
        top = 100 + n * 34
        quads += [quad(40, top, 140, top + 24, 4), quad(600, top, 660, top + 24, 4)]
        texts += [item, price]
    got = layout.lines(quads, texts)
    assert got.replace(layout.WIDE_SPACE, " ").splitlines() == [f"{i} {p}" for i, p in items]
    flat = [[(x, y) for x, y in q] for q in quads]
    assert abs(layout.skew(flat) - math.radians(4)) < 1e-6


def test_sidebar_is_a_column_and_a_table_is_not() -> None:
    sidebar = [(f"Menu {n}", 60 + n * 58) for n in range(5)]
    page = [(f"Row {n} left", f"Row {n} right", 75 + n * 40) for n in range(8)]
    quads = [quad(30, y, 150, y + 22) for _, y in sidebar]
    texts = [t for t, _ in sidebar]
    for left, right, y in page:
        quads += [quad(320, y, 470, y + 22), quad(820, y, 960, y + 22)]
        texts += [left, right]
    got = layout.lines(quads, texts)
    assert [line for line in got.splitlines() if line][:5] == [t for t, _ in sidebar], got
    for left, right, _ in page:
        assert f"{left}{layout.WIDE_SPACE}{right}" in got.splitlines(), got


def test_chat_bubbles_left_and_right_are_read_in_turn() -> None:
    """Bubbles never beside each other: one conversation, top to bottom, not two columns."""
    turns = [(n % 2 == 1, f"message {n}", 100 + n * 90) for n in range(6)]
    quads = [quad(500 if mine else 60, y, 700 if mine else 260, y + 30) for mine, _, y in turns]
    got = layout.lines(quads, [t for _, t, _ in turns])
    assert [line for line in got.splitlines() if line] == [t for _, t, _ in turns]


def test_layout_of_nothing() -> None:
    assert layout.lines([], []) == ""
    assert layout.lines([quad(0, 0, 10, 10)], ["  "]) == ""


# The engine on the rendered images.


@pytest.mark.parametrize("name", list(cjkimages.IMAGES))
async def test_reads_chinese_and_ui_screenshots(engine: local_rapid.RapidEngine, name: str) -> None:
    data, truth = cjkimages.IMAGES[name]()
    got = await engine.recognize(lambda: data)
    assert cjkimages.cer(truth, got) <= 0.02, got


async def test_ui_keeps_the_sidebar_apart_and_table_rows_whole(
    engine: local_rapid.RapidEngine,
) -> None:
    data, _ = cjkimages.ui()
    got = await engine.recognize(lambda: data)
    lines = [" ".join(line.split()) for line in got.splitlines()]
    assert lines.index("Settings") < lines.index("Billing history"), got
    assert "INV-2026-0081 Refunded" in lines and "INV-2026-0083 Overdue" in lines, got


async def test_exif_orientation_is_applied(engine: local_rapid.RapidEngine) -> None:
    """A phone photo stored sideways with orientation 6 (rotate 90 degrees clockwise to view)."""
    from PIL import Image

    data, truth = cjkimages.paragraph()
    upright = Image.open(io.BytesIO(data))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.convert("RGB").save(buffer, "JPEG", quality=92, exif=exif.tobytes())
    jpeg = buffer.getvalue()
    assert cjkimages.cer(truth, await engine.recognize(lambda: jpeg)) <= 0.02


async def test_blank_image_has_no_text(engine: local_rapid.RapidEngine) -> None:
    from PIL import Image

    blank = cjkimages.png(Image.new("RGB", (400, 300), (250, 250, 250)))
    assert await engine.recognize(lambda: blank) == ""


async def test_only_decoded_pixels_reach_the_library(
    engine: local_rapid.RapidEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a string (RapidOCR fetches URL-like strings) nor bytes (it skips EXIF then)."""
    import numpy

    real = engine._engine()
    seen: list[type] = []

    def spy(image: Any, *args: Any, **kwargs: Any) -> Any:
        assert not args and not kwargs  # per-call arguments would change the shared instance
        seen.append(type(image))
        return real(image)

    monkeypatch.setattr(engine, "_engine", lambda: spy)
    data, _ = cjkimages.mixed()
    assert "8,999.00" in await engine.recognize(lambda: data)
    assert seen == [numpy.ndarray]


def test_every_session_runs_on_one_thread_and_no_direction_classifier(_warm: None) -> None:
    """The classifier turned long lines of a page upside down (bench scenario 7: 9 % CER)."""
    ocr = local_rapid.RapidEngine(RAPID)._engine()
    assert ocr.use_cls is False and ocr.text_cls is None
    for part in (ocr.text_det, ocr.text_rec):
        options = part.session.session.get_session_options()
        assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1


def test_cache_tag_names_engine_versions_models_and_settings(_warm: None) -> None:
    import importlib.metadata

    import onnxruntime

    tag = local_rapid.RapidEngine(RAPID).cache_tag()
    assert f"rapidocr {importlib.metadata.version('rapidocr')}" in tag
    assert f"onnxruntime {onnxruntime.__version__}" in tag
    assert re.search(r"models [0-9a-f]{16}", tag) and "max_side 2500" in tag
    other = local_rapid.RapidEngine(config.OcrLocal(engine="rapidocr", max_side=2000))
    assert other.cache_tag() != tag


async def test_an_image_over_the_budget_is_refused(_warm: None) -> None:
    from PIL import Image

    eng = local_rapid.RapidEngine(config.OcrLocal(engine="rapidocr", max_decoded_bytes=16 << 20))
    page = cjkimages.png(Image.new("L", (2400, 2400), 255))
    try:
        with pytest.raises(local.RecognitionError, match="max_decoded_bytes"):
            await eng.recognize(lambda: page)
    finally:
        eng.close()


OFFLINE = textwrap.dedent(
    """
    import asyncio, socket, sys
    if sys.argv[1] == "patched":
        real = socket.socket.connect
        def connect(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
                "127.0.0.1", "::1"):
                raise OSError("network is cut off in this test")
            return real(self, address)
        socket.socket.connect = connect
        socket.create_connection = lambda *a, **k: (_ for _ in ()).throw(OSError("cut off"))
    from ocrproxy import config, local
    from tests import cjkimages
    async def main():
        engine = local.open_engine(config.OcrLocal(engine="rapidocr", threads=1))
        await engine.start()
        data, truth = cjkimages.chat()
        got = await engine.recognize(lambda: data)
        engine.close()
        print(round(cjkimages.cer(truth, got), 4))
    asyncio.run(main())
    """
)


def test_reads_with_the_network_cut_off(_warm: None, tmp_path: Any) -> None:
    """A fresh process in its own network namespace (``unshare -n``: no interface but a down
    loopback), with an empty HOME, or, where unshare is not allowed, with sockets patched to
    refuse every non-loopback connection."""
    argv = [sys.executable, "-c", OFFLINE]
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": ROOT}
    unshare = shutil.which("unshare")
    isolated = (
        unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0
    )
    if isolated:
        argv = [unshare, "-n", *argv, "unshare"]
    else:
        argv.append("patched")
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) <= 0.02
    # Nothing downloaded into HOME either (ONNX Runtime does keep a device id under ~/.cache).
    written = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert not [name for name in written if name.endswith((".onnx", ".txt", ".yaml"))], written


def _copy_models(into: Any) -> None:
    import onnxruntime

    files = local_rapid.model_files(RAPID)
    shutil.copy(files["det"], into / "det.onnx")
    shutil.copy(files["rec"], into / "rec.onnx")
    meta = onnxruntime.InferenceSession(str(files["rec"])).get_modelmeta().custom_metadata_map
    (into / "dict.txt").write_text(meta["character"], encoding="utf-8")


def _from_dir(folder: Any) -> config.OcrLocal:
    """``[ocr.local]`` for the rapidocr engine with its models in ``folder`` (validated)."""
    section = {"ocr": {"local": {"engine": "rapidocr", "model_dir": str(folder)}}}
    return config.from_mapping(section, {}).ocr.local


def test_model_dir_must_hold_every_file(tmp_path: Any) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(f"{tmp_path}/det.onnx is missing")):
        _from_dir(tmp_path)
    with pytest.raises(config.ConfigError, match="rapidocr"):
        config.from_mapping({"ocr": {"local": {"model_dir": str(tmp_path)}}}, {})
    with pytest.raises(config.ConfigError, match="ocr.local.engine"):
        config.from_mapping({"ocr": {"local": {"engine": "easyocr"}}}, {})


async def test_model_dir_is_read_and_a_missing_file_named(_warm: None, tmp_path: Any) -> None:
    _copy_models(tmp_path)
    settings = _from_dir(tmp_path)
    eng = local_rapid.RapidEngine(settings)
    try:
        await eng.start()
        data, truth = cjkimages.mixed()
        assert cjkimages.cer(truth, await eng.recognize(lambda: data)) <= 0.02
        assert eng.cache_tag() != local_rapid.RapidEngine(RAPID).cache_tag()  # dict.txt too
    finally:
        eng.close()
    (tmp_path / "rec.onnx").unlink()
    problem = local_rapid.RapidEngine(settings).problem()
    assert problem is not None and f"{tmp_path}/rec.onnx" in problem


async def test_a_damaged_model_file_makes_an_engine_that_says_so(
    _warm: None, tmp_path: Any
) -> None:
    """The files are there but do not load: start does not raise (the proxy still starts for
    the requests that need no local engine); every request is told which files."""
    _copy_models(tmp_path)
    (tmp_path / "det.onnx").write_bytes(b"not an onnx model")
    settings = _from_dir(tmp_path)
    eng = local_rapid.RapidEngine(settings)
    try:
        await eng.start()
        problem = eng.problem()
        assert problem is not None and "could not load its models" in problem
        assert f"{tmp_path}/det.onnx" in problem and "model_dir" in problem
    finally:
        eng.close()


# Through the proxy and the command line.


def _sent(fake: FakeOpenAI) -> str:
    content = fake.chat_requests[-1].json()["messages"][0]["content"]
    assert isinstance(content, str)
    return content


async def test_end_to_end_chinese_chat(
    _warm: None, make_proxy: ProxyFactory, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(ocr={"model": "local", "local": {"engine": "rapidocr"}})
    data, truth = cjkimages.chat()
    body = chat("gpt-3.5-turbo-ocr", "谁要带报表？", image_part(data_url(data)))
    resp = await proxy.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    usage = (await resp.json())["usage"]["ocr"]
    assert usage["model"] == "local" and usage["images"] == 1 and usage["total_tokens"] == 0
    assert fake.ocr_calls == []
    sent = _sent(fake)
    assert re.match(r"谁要带报表？\n\n\[Image 1 #[0-9a-f]{8} \(described by local;", sent)
    assert "read by RapidOCR" in sent and "no description of the image's visual content" in sent
    transcript = sent.split("TEXT:\n", 1)[1].split("\nDESCRIPTION:", 1)[0]
    assert cjkimages.cer(truth, transcript) <= 0.02, transcript
    again = await proxy.post("/v1/chat/completions", json=body)
    assert again.status == 200 and again.headers["X-OCR-Cache-Hits"] == "1"


async def test_without_the_extra_rapidocr_is_a_400(
    make_proxy: ProxyFactory, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_rapid._modules.cache_clear()
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # import fails
    try:
        proxy = await make_proxy(ocr={"local": {"engine": "rapidocr"}})
        url = data_url(cjkimages.png(__import__("PIL.Image").Image.new("L", (64, 64), 255)))
        body = chat("gpt-3.5-turbo-ocr", "Read", image_part(url), ocr_model="local")
        resp = await proxy.post("/v1/chat/completions", json=body)
        error = (await resp.json())["error"]
        assert resp.status == 400 and error["code"] == "ocr_model_unavailable"
        assert "pip install 'ocrproxy[rapidocr]'" in error["message"]
        assert error["message"].endswith("then restart the proxy")
        assert fake.chat_requests == []
        hint = local_rapid.RapidEngine(RAPID, then=local.RUN_AGAIN).problem()
        assert hint is not None and hint.endswith("then run the command again")
    finally:
        local_rapid._modules.cache_clear()


@pytest.mark.usefixtures("logger_restored")
async def test_cli_describe_with_rapidocr(
    _warm: None, tmp_path: Any, fake: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "order.png"
    data, truth = cjkimages.mixed()
    picture.write_bytes(data)
    cfg = tmp_path / "ocrproxy.toml"
    cfg.write_text(
        f'[[upstreams]]\nbase_url = "{fake.url}"\n[ocr]\nmodel = "local"\n'
        '[ocr.local]\nengine = "rapidocr"\n'
    )
    run: Callable[[], int] = lambda: cli.main(["describe", str(picture), "--config", str(cfg)])  # noqa: E731
    code = await asyncio.to_thread(run)
    out, _ = capsys.readouterr()
    assert code == 0 and out.startswith("[Image 1 (described by local;")
    assert "read by RapidOCR" in out
    assert cjkimages.cer(truth, out.split("TEXT:\n", 1)[1].split("\nDESCRIPTION:")[0]) <= 0.02


# Memory: the whole proxy process, as the operator sees it.

RAPID_LIMIT = 1_500_000_000  # bytes of peak RSS for the proxy process with the bundled model


@pytest.mark.timeout(180)
async def test_proxy_peak_rss_with_rapidocr(_warm: None, fake: FakeOpenAI, tmp_path: Any) -> None:
    """A real ``ocrproxy serve`` with the rapidocr engine (default threads, one per CPU) reads
    the four test images, a 2000x2800 page and a 7000x7000 decompression bomb sent at
    once; its peak resident memory (VmHWM) stays under RAPID_LIMIT. The figures are printed."""
    from PIL import Image, ImageDraw

    from tests.test_local_memory import bomb_png, read_at_once

    page = Image.new("L", (2000, 2800), 255)
    draw = ImageDraw.Draw(page)
    for n in range(30):
        draw.text(
            (100, 100 + n * 44),
            f"Line {n}: 第{n}行 the committee approved item {n * 7}.",
            font=cjkimages.zh(24),
        )
    images = [make()[0] for make in cjkimages.IMAGES.values()]
    images += [cjkimages.png(page), bomb_png("a")]
    before, after, answers = await read_at_once(
        fake, tmp_path, [data_url(d) for d in images], 'engine = "rapidocr"', "timeout_s = 120"
    )
    report = (
        f"rapidocr proxy: RSS {before['VmRSS'] / 1e6:.0f} MB after start-up (models warm), "
        f"peak {after['VmHWM'] / 1e6:.0f} MB, {after['VmRSS'] / 1e6:.0f} MB after {len(images)} images"
    )
    print(report)
    assert all(status == 200 for status, _ in answers), answers
    assert after["VmHWM"] < RAPID_LIMIT, report
    sent = [r.json()["messages"][0]["content"] for r in fake.chat_requests]
    assert sum("read by RapidOCR" in text for text in sent) == len(images)

"""The JSON log lines: the access line's buffered path keeps content, order and timeliness."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from ocrproxy import logs

ACCESS = logging.getLogger("ocrproxy.access")
# A client chooses the model name: whatever it holds must come out as one valid JSON line.
FIELDS = {
    "method": "POST",
    "route": "/v1/chat/completions",
    "status": 200,
    "ocr_ms": None,
    "model": 'gpt-4"}\n{"level":"error"\u2028é',
}


class Stderr(io.TextIOWrapper):
    """A text stream over bytes, like sys.stderr, that counts the writes its buffer gets."""

    def __init__(self) -> None:
        self.raw_bytes = io.BytesIO()
        self.writes = 0
        outer = self

        class Counting(io.BufferedWriter):
            def write(self, data: Any) -> int:
                outer.writes += 1
                return super().write(data)

        super().__init__(Counting(self.raw_bytes), encoding="utf-8")  # type: ignore[arg-type]

    def lines(self) -> list[dict[str, Any]]:
        self.flush()
        return [orjson.loads(line) for line in self.raw_bytes.getvalue().splitlines()]


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stderr]:
    root = logging.getLogger("ocrproxy")
    saved = root.handlers[:], root.level, root.propagate, logs._handler
    fake = Stderr()
    monkeypatch.setattr(sys, "stderr", fake)
    logs.setup("info")
    try:
        yield fake
    finally:
        root.handlers[:], root.level, root.propagate = saved[:3]
        logs._handler = saved[3]


async def test_access_line_is_written_soon_not_at_once(stderr: Stderr) -> None:
    assert logs._handler is not None
    logs._handler.flush_after_s = 0.05
    logs.access(ACCESS, logging.INFO, {"request_id": "rid-1", **FIELDS})
    logs.access(ACCESS, logging.INFO, {"request_id": "rid-2", **FIELDS})
    assert stderr.lines() == []  # queued, no write per request
    await asyncio.sleep(0.2)
    first, second = stderr.lines()
    assert first["request_id"] == "rid-1" and second["request_id"] == "rid-2"
    assert first["logger"] == "ocrproxy.access" and first["msg"] == "request"
    assert first["level"] == "info" and first["ts"] > 0
    assert {k: first[k] for k in FIELDS} == FIELDS
    assert stderr.writes == 1  # both lines in one write


async def test_other_records_keep_their_place_after_queued_lines(stderr: Stderr) -> None:
    logs.access(ACCESS, logging.INFO, {"request_id": "rid-1", **FIELDS})
    logging.getLogger("ocrproxy.relay").warning("upstream broke", extra={"request_id": "rid-2"})
    assert [(line["request_id"], line["msg"]) for line in stderr.lines()] == [
        ("rid-1", "request"),
        ("rid-2", "upstream broke"),
    ]


async def test_many_pending_lines_are_written_without_waiting(stderr: Stderr) -> None:
    assert logs._handler is not None
    logs._handler.flush_after_s = 60
    fields = {**FIELDS, "route": "/v1/" + "x" * 1000}
    for n in range(80):  # ~90 KB: past the 64 KB limit
        logs.access(ACCESS, logging.INFO, {"request_id": f"rid-{n}", **fields})
    written = stderr.lines()
    assert 50 <= len(written) < 80
    assert [line["request_id"] for line in written] == [f"rid-{n}" for n in range(len(written))]


def test_off_the_event_loop_a_line_is_written_at_once(stderr: Stderr) -> None:
    logs.access(ACCESS, logging.INFO, {"request_id": "rid-1", **FIELDS})
    assert [line["request_id"] for line in stderr.lines()] == ["rid-1"]


async def test_levels_below_the_configured_one_are_dropped(stderr: Stderr) -> None:
    logs.access(ACCESS, logging.DEBUG, {"request_id": "probe", **FIELDS})  # a health probe
    assert logs._handler is not None
    logs._handler.flush()
    assert stderr.lines() == []


async def test_queued_lines_are_written_at_exit(stderr: Stderr) -> None:
    logs.access(ACCESS, logging.INFO, {"request_id": "rid-last", **FIELDS})
    assert logs._handler is not None
    logging.shutdown([weakref.ref(logs._handler)])  # what the interpreter runs at exit
    assert [line["request_id"] for line in stderr.lines()] == ["rid-last"]


async def test_without_setup_the_line_is_an_ordinary_record(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "_handler", None)
    with caplog.at_level(logging.INFO, logger="ocrproxy.access"):
        logs.access(ACCESS, logging.INFO, {"request_id": "rid-1", **FIELDS})
    (record,) = [r for r in caplog.records if r.name == "ocrproxy.access"]
    assert record.getMessage() == "request"
    assert record.request_id == "rid-1"  # type: ignore[attr-defined]
    assert record.fields == {"request_id": "rid-1", **FIELDS}  # type: ignore[attr-defined]

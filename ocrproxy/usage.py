"""Add ``usage.ocr`` to an answer: a plain JSON body or the SSE event that carries usage.

Theory of operation: a plain answer is decoded only down the path to its ``usage`` object (the
dialect's ``usage_path``: top-level for every dialect so far), which gains ``ocr``; everything
else is re-encoded as it came (``msgspec.Raw``). In a stream, whole SSE events are reassembled
only to find the one carrying ``usage`` (at the dialect's ``stream_usage_path``, and only in an
event of one of its ``stream_usage_events`` types when it names some: Responses nests a usage
in events that must stay as they are); every other byte passes through as it arrived. Whatever
the editor must hold is bounded: one SSE event at most MAX_EVENT bytes (past that the event
goes through unedited).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from .schema import encoder, is_json, object_decoder

# An SSE event the usage editor holds (to find ``usage`` in it) is at most this large.
MAX_EVENT = 1024 * 1024
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")
_SEAM = 3  # bytes of the previous piece that can begin a separator ending in the next one


def with_ocr_usage(
    payload: bytes,
    ocr: msgspec.Raw,
    path: tuple[str, ...] = ("usage",),
    types: frozenset[bytes] = frozenset(),
) -> bytes | None:
    """``payload`` (a JSON object with an object at ``path``) with ``ocr`` added there, else
    None. Given ``types`` (raw JSON strings), only an object whose ``type`` is one of them."""
    try:
        return _with(payload, ocr, path, types)
    except msgspec.DecodeError:
        return None


def _with(
    payload: bytes | msgspec.Raw,
    ocr: msgspec.Raw,
    path: tuple[str, ...],
    types: frozenset[bytes] = frozenset(),
) -> bytes | None:
    obj = object_decoder.decode(payload)
    if types and bytes(obj.get("type", b"")) not in types:
        return None
    inner = obj.get(path[0])
    if inner is None or not is_json(inner, b"{"):
        return None
    if len(path) == 1:
        edited = object_decoder.decode(inner)
        edited["ocr"] = ocr
        obj[path[0]] = msgspec.Raw(encoder.encode(edited))
    else:
        deeper = _with(inner, ocr, path[1:])
        if deeper is None:
            return None
        obj[path[0]] = msgspec.Raw(deeper)
    return encoder.encode(obj)


def _last_end(data: bytes) -> int:
    """Where the last complete event in ``data`` ends, or -1."""
    end = -1
    for sep in _EVENT_ENDS:
        at = data.rfind(sep)
        if at >= 0 and at + len(sep) > end:
            end = at + len(sep)
    return end


def _first_end(data: bytes) -> int:
    """Where the first complete event in ``data`` ends, or -1."""
    end = -1
    for sep in _EVENT_ENDS:
        at = data.find(sep)
        if at >= 0 and (end < 0 or at + len(sep) < end):
            end = at + len(sep)
    return end


class UsageEditor:
    """Splits an SSE byte stream into whole events and adds ``usage.ocr`` where usage appears.

    A partial event is held as a list of pieces (never re-joined until it is complete) and each
    new piece is searched alone, plus the few bytes before it where a separator could begin: the
    work is linear in the stream. An event that grows past MAX_EVENT is let go unedited, and the
    editor passes bytes through until the next event boundary, where it resumes.
    """

    def __init__(
        self,
        ocr_usage: Mapping[str, Any],
        path: tuple[str, ...] = ("usage",),
        events: frozenset[str] = frozenset(),
    ) -> None:
        """``events``: if any, only an event whose data has one of these ``type`` values is
        edited."""
        self.ocr = msgspec.Raw(encoder.encode(ocr_usage))
        self.path = path
        self._mark = f'"{path[-1]}"'.encode()
        self._types = frozenset(encoder.encode(name) for name in events)
        self._pending: list[bytes] = []
        self._size = 0
        self._tail = b""  # the last bytes seen of the event under way (to spot a split separator)
        self._skipping = False  # inside an over-long event: passing it through

    def feed(self, data: bytes) -> bytes:
        """Return the bytes that can be sent now; keep a partial event for later."""
        out = b""
        if self._skipping:
            seam = len(self._tail)
            end = _first_end(self._tail + data if seam else data)
            if end < 0:
                self._tail = data[-_SEAM:] if len(data) >= _SEAM else (self._tail + data)[-_SEAM:]
                return data
            end -= seam
            self._skipping, self._tail = False, b""
            out, data = data[:end], data[end:]
            if not data:
                return out
        if self._size:
            seam = len(self._tail)
            end = _last_end(self._tail + data)
            end = end - seam if end >= 0 else -1
        else:
            end = _last_end(data)
        if end < 0:
            self._hold(data)
            return out + self._overflow()
        if self._size:
            ready = b"".join((*self._pending, data[:end]))
            self._pending, self._size = [], 0
        else:
            ready = data[:end] if end < len(data) else data
        if end < len(data):
            self._hold(data[end:])
            rest = self._overflow()
        else:
            rest = b""
        if self._mark in ready:
            ready = b"".join(self._edit(line) for line in ready.splitlines(keepends=True))
        return out + ready + rest if out or rest else ready

    def _hold(self, data: bytes) -> None:
        tail = self._tail + data if self._size and len(data) < _SEAM else data
        self._pending.append(data)
        self._size += len(data)
        self._tail = tail[-_SEAM:]

    def _overflow(self) -> bytes:
        """The held event, unedited, if it outgrew MAX_EVENT (then skip to the next boundary)."""
        if self._size <= MAX_EVENT:
            return b""
        held = b"".join(self._pending)
        self._pending, self._size, self._skipping = [], 0, True
        return held

    def flush(self) -> bytes:
        """What is still held, once the stream has ended (edited if it carries usage)."""
        rest = b"".join(self._pending)
        self._pending, self._size, self._tail = [], 0, b""
        if self._mark not in rest:
            return rest
        return b"".join(self._edit(line) for line in rest.splitlines(keepends=True))

    def _edit(self, line: bytes) -> bytes:
        if not line.startswith(b"data:") or self._mark not in line:
            return line
        if self._types and not any(name in line for name in self._types):
            return line  # not an event that may gain usage.ocr: not even decoded
        body = line[5:].strip()
        edited = with_ocr_usage(body, self.ocr, self.path, self._types)
        if edited is None:
            return line
        ending = line[len(line.rstrip(b"\r\n")) :]
        return b"data: " + edited + ending

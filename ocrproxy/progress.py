"""Notes to the user while a stream's images are read: ``[ocr] progress = "reasoning"``.

Theory of operation: a chat frontend shows an empty bubble until the first token, and the OCR
step comes before any token. With ``progress = "reasoning"``, a streaming request whose OCR
step has work to do (not every image already in memory) is committed at once, with the early
commit the keep-alives use, and gets two notes in its dialect's progress event (``Dialect.
progress_event``; only Chat Completions has one, ``delta.reasoning_content``): when reading
starts, "Reading 2 images with gpt-4o-mini…", and when the OCR step ends, " done in 2.1 s
(1 from cache)." The keep-alives go on between them, and the upstream's first chunk comes only
after both. The notes are written straight to the client, never through the usage editor, so
they count in no ``usage``. The last one ends in a blank line, so that reasoning the upstream
streams afterwards (DeepSeek's reasoners do) starts on a line of its own.

Until the upstream answers, its chunk ``id`` and ``model`` are unknown; the notes carry the
proxy's own id for the stream (``chatcmpl-ocr-<request id>``) and the model as the client asked
for it, the name the client knows (the upstream's chunks then bring its own, and the SDKs'
accumulators keep the latest). The time is the wall time of the OCR step as the user waited it,
fetches of remote images included.

The price of committing at once: the status is 200 before the upstream has seen the request,
so an upstream 429 or 5xx arrives as an error event inside the stream, which the SDKs do not
retry. That is why it is opt-in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from .describe import OcrReport, Outcome
from .dialects import Dialect, Found, Parsed
from .state import CONFIG, DESCRIBER, TRACE


@dataclass(slots=True)
class Progress:
    """The notes of one stream: the opening one ready to send, the closing one made at the end."""

    dialect: Dialect
    stream_id: str
    model: str
    opening: bytes = b""
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)

    def event(self, text: str, *, first: bool = False) -> bytes | None:
        return self.dialect.progress_event(
            text, stream_id=self.stream_id, model=self.model, created=self.created, first=first
        )

    def closing(self, report: OcrReport) -> bytes:
        """The note that the OCR step ended: how long it took, what came from the cache, what
        could not be read."""
        notes = []
        if report.cache_hits:
            notes.append(f"{report.cache_hits} from cache")
        if report.failures:
            notes.append(f"{report.failures} could not be read")
        seconds = time.monotonic() - self.started
        aside = f" ({', '.join(notes)})" if notes else ""
        return self.event(f" done in {seconds:.1f} s{aside}.\n\n") or b""


def reading(count: int, reader: str) -> str:
    """The opening note: "Reading 2 images with gpt-4o-mini…"."""
    return f"Reading {count} image{'' if count == 1 else 's'} with {reader}…"


def plan(
    request: web.Request,
    dialect: Dialect,
    parsed: Parsed,
    found: Found,
    hits: dict[bytes, Outcome],
    ocr_model: str,
) -> Progress | None:
    """The notes for this request, or None: progress is off, the request is not a stream, its
    dialect has no progress event, or every image is already in memory (nothing to read)."""
    settings = request.app[CONFIG].ocr
    if settings.progress != "reasoning" or not parsed.stream:
        return None
    distinct = {image.digest for image in found.images}
    if distinct <= hits.keys():
        return None
    reader = ocr_model
    if ocr_model == settings.local_alias:
        engine = request.app[DESCRIBER].engine
        reader = f"the local OCR engine ({engine.name})" if engine else "the local OCR engine"
    stream_id = f"chatcmpl-ocr-{request[TRACE].request_id}"
    progress = Progress(dialect, stream_id, parsed.model)
    opening = progress.event(reading(len(distinct), reader), first=True)
    if opening is None:
        return None
    progress.opening = opening
    return progress

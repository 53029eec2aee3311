"""What the live page shows: each request's steps as they happen, and the ring of finished ones.

Theory of operation: with ``[ui] enabled``, the request middleware gives every request (but the
page's own and the quiet probes') a ``Timeline``, ``begin``, which it hangs on the request's
trace (``Trace.timeline``; the trace of the request being served is in a context variable,
``current``); without it ``Trace.timeline`` stays None and ``step`` returns at once, so the hot
path pays one context-variable read and one attribute check per step call and nothing else.
The few places where something worth seeing happens on the OCR path (the pipeline's scan, a
cache lookup and its tier, a fetch, each OCR attempt and call, the text that stood in for each
image, an upstream's refusal that sends the request through OCR) call ``step`` with a kind and
a few plain fields. A pass-through request makes no step at all: its upstream's first byte is
already in its trace (``state.Trace``), from which ``steps`` adds it when the page reads it.
Tasks copy the context when they are created, so the describe task, the cache's flight and the
fetches of a request append to its timeline too (a flight joined by a second request records
in the first one's: the second sees its "join").

``Recorder.finish``, called where the access-log line is written, completes the timeline with
the request's status and end and keeps the trace (which holds it) in a ``deque(maxlen=[ui]
recent)``, counts it in the totals (``totals``) and, only while a page is open, builds its row
and hands it to every subscriber of the feed (a bounded queue each: a page that does not read
loses rows, it never holds the proxy back). A row is otherwise built when the page asks for it.
Recording a pass-through request costs about 3 µs inside a proxy at saturation (1.3 µs in a
``timeit`` loop, ``python -m bench.ui_record``); bench scenario 1 measures it against a twin of
the proxy with the page off.

Nothing here holds an image's bytes: an image is named by the first hex digits of its digest.
The text an image became is kept only with ``[ui] show_descriptions``, and only the newest
(``Kept``: ``DESCRIPTION_CHARS``, ``DESCRIPTION_STEPS``); everything the page receives is
redacted of the configured secrets by ``ui`` when it is sent. The ring and the
totals belong to one process: with ``[server] workers`` > 1 the page shows the worker that
answered it.
"""

from __future__ import annotations

import asyncio
import bisect
import operator
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import config, current
from .totals import Totals

if TYPE_CHECKING:  # state imports the modules that call ``step``
    from . import state

FEED_QUEUE = 256  # rows a subscriber may be behind before it loses some
# With [ui] show_descriptions: at most this many characters of descriptions, in at most this
# many steps, are kept (the oldest go first), whatever the ring's length and the images per
# request (64 descriptions of 1,500 tokens each in every one of 200 requests would be ~80 MB).
DESCRIPTION_CHARS = 2_000_000
DESCRIPTION_STEPS = 20_000

_DIALECTS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/responses": "responses",
    "/v1/models": "models",
}
_UNRECORDED = ("/ui", "/healthz", "/readyz", "/metrics")  # the page's own traffic and probes


class Timeline:
    """What the page keeps of one request beside its trace (``state.Trace.timeline``): its
    steps while it runs (each a small dict with its ``kind`` and ``at_ms``), then its status and
    when it ended. The ring keeps the trace; the row the page shows is built only when it is
    read (or fed to an open page), not for every request."""

    __slots__ = ("closed", "ended", "method", "recorder", "route", "status", "steps", "wall")

    def __init__(self, recorder: Recorder, method: str, route: str) -> None:
        self.recorder = recorder
        self.method = method
        self.route = route
        self.steps: list[dict[str, Any]] = []
        # Set when its request finished. A shared OCR flight runs in the context of the
        # request that started it and may outlive it: its call still counts in the totals.
        self.closed = False
        self.status = 0
        self.ended = self.wall = 0.0


def row(trace: state.Trace) -> dict[str, Any]:
    """A finished request as a row of the page's list."""
    timeline = trace.timeline
    assert timeline is not None, "a row is built only for a recorded request"
    tokens_in = tokens_out = 0
    for item in timeline.steps:
        if item["kind"] == "ocr" and item["ok"]:
            tokens_in += item.get("input_tokens", 0)
            tokens_out += item.get("output_tokens", 0)
    route = timeline.route
    took = timeline.ended - trace.started
    return {
        "time": round(timeline.wall - took, 3),
        "request_id": trace.request_id,
        "method": timeline.method,
        "route": route,
        "dialect": _DIALECTS.get(route, "passthrough" if route.startswith("/v1/") else "other"),
        "model": trace.model,
        "real_model": trace.real_model,
        "ocr_model": trace.ocr_model,
        "images": trace.images,
        "cache_hits": trace.cache_hits,
        "failures": trace.ocr_failures,
        "fallback": trace.fallback,
        "status": timeline.status,
        "upstream": trace.upstream,
        "ttfb_ms": trace.ttfb_ms,
        "total_ms": round(took * 1000, 2),
        "ocr_tokens": {"input": tokens_in, "output": tokens_out},
    }


def steps(trace: state.Trace) -> list[dict[str, Any]]:
    """A finished request's steps in order, with the upstream's answer (from the trace:
    recording it as a step would cost every pass-through request) and the end of the
    response."""
    timeline = trace.timeline
    assert timeline is not None, "steps are read only of a recorded request"
    found = list(timeline.steps)
    if trace.ttfb_ms is not None:
        answered = {
            "kind": "upstream",
            "at_ms": trace.ttfb_ms,
            "upstream": trace.upstream,
            "status": trace.upstream_status,
            "ttfb_ms": trace.ttfb_ms,
        }
        at = bisect.bisect_right(found, trace.ttfb_ms, key=operator.itemgetter("at_ms"))
        found.insert(at, answered)
    total_ms = round((timeline.ended - trace.started) * 1000, 2)
    return [*found, {"kind": "end", "at_ms": total_ms, "status": timeline.status}]


def step(kind: str, **fields: Any) -> dict[str, Any] | None:
    """Note that ``kind`` happened now to the request being served (nothing when the page is
    off); the step as recorded, if it was."""
    trace = current.request.get()
    if trace is None or trace.timeline is None:
        return None
    timeline = trace.timeline
    if timeline.closed:
        if kind == "ocr":
            timeline.recorder.totals.late_ocr(fields)
        return None
    fields["kind"] = kind
    fields["at_ms"] = round((time.monotonic() - trace.started) * 1000, 2)
    timeline.steps.append(fields)
    return fields


def image(number: int, digest: bytes, text: str | None, reason: str | None) -> None:
    """Image ``number`` of the request became ``text`` (or a placeholder for ``reason``); the
    text is kept only with ``[ui] show_descriptions``."""
    trace = current.request.get()
    if trace is None or trace.timeline is None:
        return
    timeline = trace.timeline
    fields: dict[str, Any] = {"number": number, "image": digest.hex()[:12], "ok": text is not None}
    if reason is not None:
        fields["reason"] = reason
    item = step("image", **fields)
    if item is not None and text is not None and timeline.recorder.descriptions:
        timeline.recorder.kept.add(item, text)


class Kept:
    """The descriptions the page keeps (``[ui] show_descriptions``): the steps holding one,
    oldest first, and their length in all, within ``DESCRIPTION_CHARS`` and
    ``DESCRIPTION_STEPS``. A reload hands it on (``Recorder.adopt``)."""

    __slots__ = ("chars", "steps")

    def __init__(self) -> None:
        self.steps: deque[dict[str, Any]] = deque()
        self.chars = 0

    def add(self, item: dict[str, Any], text: str) -> None:
        """Keep ``text`` in the step ``item``; drop the oldest beyond the bounds (their steps
        say so)."""
        item["description"] = text
        self.steps.append(item)
        self.chars += len(text)
        while self.chars > DESCRIPTION_CHARS or len(self.steps) > DESCRIPTION_STEPS:
            oldest = self.steps.popleft()
            self.chars -= len(oldest.pop("description", ""))
            oldest["description_dropped"] = True

    def drop_all(self) -> None:
        """Drop every kept description (``show_descriptions`` was turned off)."""
        for item in self.steps:
            item.pop("description", None)
        self.steps.clear()
        self.chars = 0


class Recorder:
    """The ring of finished requests, their totals and the feed's subscribers (one per process)."""

    def __init__(self, settings: config.Ui, models: frozenset[str] = frozenset()) -> None:
        self.rows: deque[state.Trace] = deque(maxlen=settings.recent)  # each with its timeline
        self.totals = Totals(models)
        self.descriptions = settings.show_descriptions
        self.kept = Kept()
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def begin(self, request: web.Request, trace: state.Trace) -> Timeline:
        """Give ``request`` a timeline (the middleware calls this when it starts it)."""
        timeline = trace.timeline = Timeline(self, request.method, request.path)
        return timeline

    def finish(self, trace: state.Trace, timeline: Timeline, status: int) -> None:
        """Record the finished request: into the ring, the totals, the feed."""
        timeline.closed = True
        timeline.status = status
        timeline.ended = time.monotonic()
        timeline.wall = time.time()
        self.rows.append(trace)
        self.totals.add(status, timeline.wall, timeline.steps)
        if self.subscribers:
            fed = row(trace)
            for queue in self.subscribers:
                if queue.qsize() < FEED_QUEUE:
                    queue.put_nowait(fed)

    def adopt(self, old: Recorder) -> None:
        """Take over from ``old`` (a reload: the process is the same): its ring, its totals and
        the descriptions it kept (dropped if they are no longer to be shown). The requests
        ``old`` still serves finish into the same ring and follow the new setting; the ones it
        had recorded point to this recorder (``old`` and its ring are not kept alive by them)."""
        self.rows.extend(old.rows)
        for trace in self.rows:
            if trace.timeline is not None:
                trace.timeline.recorder = self
        if not self.descriptions:
            old.kept.drop_all()
        old.totals.models = self.totals.models
        self.totals, self.kept = old.totals, old.kept
        old.rows, old.descriptions = self.rows, self.descriptions

    def find(self, request_id: str) -> state.Trace | None:
        """The newest recorded request with this id (a client may reuse its X-Request-Id)."""
        for trace in reversed(self.rows):
            if trace.request_id == request_id:
                return trace
        return None

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.subscribers.discard(queue)

    def close_feeds(self) -> None:
        """End every feed (a shutdown must not wait for open pages)."""
        for queue in self.subscribers:
            queue.put_nowait(None)


def recorded(path: str) -> bool:
    """Whether a request for ``path`` goes into the ring (not the page's own, not probes)."""
    return not path.startswith(_UNRECORDED)


RECORDER = web.AppKey("ui_recorder", Recorder)

"""What the live page shows: each request's steps as they happen, and the ring of finished ones.

Theory of operation: with ``[ui] enabled``, the request middleware gives every request (but the
page's own and the quiet probes') a ``Timeline`` in a context variable, ``begin``; without it
the variable stays None and ``step`` returns at once, so the hot path pays one
``ContextVar.get`` per step call and nothing else. The few places where something worth seeing
happens (the pipeline's scan, a cache lookup and its tier, a fetch, each OCR attempt and call,
the upstream's first byte, the text that stood in for each image) call ``step`` with a kind and
a few plain fields. Tasks copy the context when they are created, so the describe task, the
cache's flight and the fetches of a request append to its timeline too (a flight joined by a
second request records in the first one's: the second sees its "join").

``Recorder.finish``, called where the access-log line is written, turns the request's trace and
steps into one row, appends it to a ``deque(maxlen=[ui] recent)``, adds it to the totals and
hands it to every subscriber of the feed (a bounded queue each: a page that does not read loses
rows, it never holds the proxy back). Recording a row is a few microseconds (bench/README.md).

Nothing here holds an image's bytes: an image is named by the first hex digits of its digest.
The text an image became is kept only with ``[ui] show_descriptions``; everything the page
receives is redacted of the configured secrets by ``ui`` when it is sent. The ring and the
totals belong to one process: with ``[server] workers`` > 1 the page shows the worker that
answered it.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import config

if TYPE_CHECKING:  # state imports the modules that call ``step``
    from . import state

FEED_QUEUE = 256  # rows a subscriber may be behind before it loses some
LATENCY_SAMPLE = 1024  # OCR call durations kept for the percentiles
MINUTES = 60  # per-minute counts kept for the sparkline

_DIALECTS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/responses": "responses",
    "/v1/models": "models",
}
_UNRECORDED = ("/ui", "/healthz", "/readyz", "/metrics")  # the page's own traffic and probes


class Timeline:
    """The steps of one request, each a small dict with its ``kind`` and ``at_ms``."""

    __slots__ = ("descriptions", "started", "steps")

    def __init__(self, started: float, descriptions: bool) -> None:
        self.started = started
        self.descriptions = descriptions
        self.steps: list[dict[str, Any]] = []


_current: contextvars.ContextVar[Timeline | None] = contextvars.ContextVar(
    "ocrproxy_timeline", default=None
)


def step(kind: str, **fields: Any) -> None:
    """Note that ``kind`` happened now to the current request (nothing when the page is off)."""
    timeline = _current.get()
    if timeline is None:
        return
    fields["kind"] = kind
    fields["at_ms"] = round((time.monotonic() - timeline.started) * 1000, 2)
    timeline.steps.append(fields)


def image(number: int, digest: bytes, text: str | None, reason: str | None) -> None:
    """Image ``number`` of the request became ``text`` (or a placeholder for ``reason``); the
    text is kept only with ``[ui] show_descriptions``."""
    timeline = _current.get()
    if timeline is None:
        return
    fields: dict[str, Any] = {"number": number, "image": digest.hex()[:12], "ok": text is not None}
    if reason is not None:
        fields["reason"] = reason
    if text is not None and timeline.descriptions:
        fields["description"] = text
    step("image", **fields)


class Totals:
    """Counts since the process started, folded from each finished request's row and steps."""

    def __init__(self, models: frozenset[str]) -> None:
        self.models = models  # OCR model names shown as they are; any other is "other"
        self.since = time.time()
        self.requests = 0
        self.statuses: dict[str, int] = {}
        self.ocr_calls = 0
        self.ocr_errors = 0
        self.cache: dict[str, dict[str, int]] = {}
        self.tokens: dict[str, dict[str, int]] = {}
        self.failures: dict[str, int] = {}
        self.latency: deque[float] = deque(maxlen=LATENCY_SAMPLE)
        self.minutes: deque[list[int]] = deque(maxlen=MINUTES)  # [minute, requests, ocr calls]

    def add(self, row: dict[str, Any], steps: list[dict[str, Any]]) -> None:
        self.requests += 1
        status = f"{row['status'] // 100}xx"
        self.statuses[status] = self.statuses.get(status, 0) + 1
        calls = 0
        failed: set[str] = set()
        for item in steps:
            kind = item["kind"]
            if kind == "cache":
                tier = self.cache.setdefault(item["tier"], {})
                tier[item["result"]] = tier.get(item["result"], 0) + 1
            elif kind == "ocr":
                calls += 1
                self._ocr(item)
            elif kind == "image" and "reason" in item and item["image"] not in failed:
                failed.add(item["image"])  # an image sent twice failed once
                self.failures[item["reason"]] = self.failures.get(item["reason"], 0) + 1
        minute = int(time.time() // 60)
        if self.minutes and self.minutes[-1][0] == minute:
            self.minutes[-1][1] += 1
            self.minutes[-1][2] += calls
        else:
            self.minutes.append([minute, 1, calls])

    def _ocr(self, item: dict[str, Any]) -> None:
        self.ocr_calls += 1
        if not item["ok"]:
            self.ocr_errors += 1
            return
        self.latency.append(item["took_ms"])
        model = item["model"] if item["model"] in self.models else "other"
        tokens = self.tokens.setdefault(model, {"input": 0, "output": 0})
        tokens["input"] += item.get("input_tokens", 0)
        tokens["output"] += item.get("output_tokens", 0)

    def as_dict(self) -> dict[str, Any]:
        """The totals as the page reads them (``/ui/totals``)."""
        ordered = sorted(self.latency)

        def percentile(p: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else None

        hits = {
            tier: (counts.get("hit", 0) / looked if (looked := sum(counts.values())) else None)
            for tier, counts in self.cache.items()
        }
        return {
            "since": self.since,
            "requests": self.requests,
            "statuses": self.statuses,
            "ocr_calls": self.ocr_calls,
            "ocr_errors": self.ocr_errors,
            "cache": self.cache,
            "cache_hit_ratio": hits,
            "ocr_tokens": self.tokens,
            "failures": self.failures,
            "ocr_ms": {"p50": percentile(0.5), "p95": percentile(0.95), "sample": len(ordered)},
            "per_minute": [list(m) for m in self.minutes],
        }


class Recorder:
    """The ring of finished requests, their totals and the feed's subscribers (one per process)."""

    def __init__(self, settings: config.Ui, models: frozenset[str] = frozenset()) -> None:
        self.rows: deque[tuple[dict[str, Any], list[dict[str, Any]]]] = deque(
            maxlen=settings.recent
        )
        self.totals = Totals(models)
        self.descriptions = settings.show_descriptions
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def begin(self, request: web.Request, started: float) -> contextvars.Token[Timeline | None]:
        """Give ``request`` a timeline (the middleware calls this when it starts it)."""
        return _current.set(Timeline(started, self.descriptions))

    def finish(
        self,
        request: web.Request,
        trace: state.Trace,
        status: int,
        token: contextvars.Token[Timeline | None],
    ) -> None:
        """Record the finished request: a row in the ring, the totals, the feed."""
        timeline = _current.get()
        _current.reset(token)
        if timeline is None:
            return
        row = summary(request, trace, status, timeline)
        timeline.steps.append({"kind": "end", "at_ms": row["total_ms"], "status": status})
        self.rows.append((row, timeline.steps))
        self.totals.add(row, timeline.steps)
        for queue in self.subscribers:
            if queue.qsize() < FEED_QUEUE:
                queue.put_nowait(row)

    def adopt(self, old: Recorder) -> None:
        """Carry the ring and the totals of ``old`` over (a reload: the process is the same)."""
        self.rows.extend(old.rows)
        old.totals.models = self.totals.models
        self.totals = old.totals

    def find(self, request_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The newest recorded request with this id (a client may reuse its X-Request-Id)."""
        for row, steps in reversed(self.rows):
            if row["request_id"] == request_id:
                return row, steps
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


def summary(
    request: web.Request, trace: state.Trace, status: int, timeline: Timeline
) -> dict[str, Any]:
    """One finished request as a row of the page's list."""
    elapsed = time.monotonic() - trace.started
    tokens_in = tokens_out = 0
    for item in timeline.steps:
        if item["kind"] == "ocr" and item["ok"]:
            tokens_in += item.get("input_tokens", 0)
            tokens_out += item.get("output_tokens", 0)
    path = request.path
    return {
        "time": round(time.time() - elapsed, 3),
        "request_id": trace.request_id,
        "method": request.method,
        "route": path,
        "dialect": _DIALECTS.get(path, "passthrough" if path.startswith("/v1/") else "other"),
        "model": trace.model,
        "real_model": trace.real_model,
        "ocr_model": trace.ocr_model,
        "images": trace.images,
        "cache_hits": trace.cache_hits,
        "failures": trace.ocr_failures,
        "fallback": trace.fallback,
        "status": status,
        "upstream": trace.upstream,
        "ttfb_ms": trace.ttfb_ms,
        "total_ms": round(elapsed * 1000, 2),
        "ocr_tokens": {"input": tokens_in, "output": tokens_out},
    }


RECORDER = web.AppKey("ui_recorder", Recorder)

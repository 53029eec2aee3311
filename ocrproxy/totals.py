"""What the live page's totals say: counts since the process started, from each finished
request's status and steps (``timeline.Recorder.finish`` hands them over).

Theory of operation: a request that made no step (every pass-through one) moves two counts,
requests and its status class. The steps of an OCR request are folded in: cache lookups by tier
and result, OCR calls (errors, latency kept for the percentiles, tokens by model: a model not
configured is "other", so a client cannot grow the table with names), failed images by reason.
The requests per minute for the sparkline are not counted per request either: when the first
request of a new minute finishes, the counts so far are marked, and a minute's figures are the
difference to the next mark (or to now). An OCR call that outlived its request (a shared flight)
still counts, in the minute it ended. The totals belong to one process and survive a reload.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any

LATENCY_SAMPLE = 1024  # OCR call durations kept for the percentiles
MINUTES = 60  # per-minute counts kept for the sparkline


class Totals:
    """Counts since the process started, folded from each finished request's steps."""

    __slots__ = (
        "_minute_ends",
        "cache",
        "failures",
        "latency",
        "minutes",
        "models",
        "ocr_calls",
        "ocr_errors",
        "requests",
        "since",
        "statuses",
        "tokens",
    )

    def __init__(self, models: frozenset[str]) -> None:
        self.models = models  # OCR model names shown as they are; any other is "other"
        self.since = time.time()
        self.requests = 0
        self.statuses = [0] * 10  # by status // 100
        self.ocr_calls = 0
        self.ocr_errors = 0
        self.cache: dict[str, dict[str, int]] = {}
        self.tokens: dict[str, dict[str, int]] = {}
        self.failures: dict[str, int] = {}
        self.latency: deque[float] = deque(maxlen=LATENCY_SAMPLE)
        # Per minute: [minute, requests and OCR calls so far] when it began; the counts of a
        # minute are the difference to the next (``_per_minute``), so a request adds nothing
        # here but in the first second it finishes in a new minute.
        self.minutes: deque[list[int]] = deque(maxlen=MINUTES + 1)
        self._minute_ends = 0.0  # the wall-clock time the newest minute ends

    def add(self, status: int, wall: float, steps: list[dict[str, Any]]) -> None:
        """Count one finished request that ended at ``wall`` (most have no steps: only two
        counts move)."""
        if not wall < self._minute_ends:
            self._new_minute(wall)
        self.requests += 1
        self.statuses[status // 100 % 10] += 1
        if steps:
            self._fold(steps)

    def late_ocr(self, item: dict[str, Any]) -> None:
        """Count the step of an OCR call that outlived its request, in the minute it ended."""
        wall = time.time()
        if not wall < self._minute_ends:
            self._new_minute(wall)
        self.ocr(item)

    def _new_minute(self, wall: float) -> None:
        number = int(wall // 60)
        self.minutes.append([number, self.requests, self.ocr_calls])
        self._minute_ends = (number + 1) * 60.0

    def _fold(self, steps: list[dict[str, Any]]) -> None:
        """Count a request's cache lookups, OCR calls and failed images."""
        failed: set[str] = set()
        for item in steps:
            kind = item["kind"]
            if kind == "cache":
                tier = self.cache.setdefault(item["tier"], {})
                tier[item["result"]] = tier.get(item["result"], 0) + 1
            elif kind == "ocr":
                self.ocr(item)
            elif kind == "image" and "reason" in item and item["image"] not in failed:
                failed.add(item["image"])  # an image sent twice failed once
                self.failures[item["reason"]] = self.failures.get(item["reason"], 0) + 1

    def ocr(self, item: dict[str, Any]) -> None:
        """Count one OCR call's step."""
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
            "statuses": {f"{s}xx": n for s, n in enumerate(self.statuses) if n},
            "ocr_calls": self.ocr_calls,
            "ocr_errors": self.ocr_errors,
            "cache": self.cache,
            "cache_hit_ratio": hits,
            "ocr_tokens": self.tokens,
            "failures": self.failures,
            "ocr_ms": {"p50": percentile(0.5), "p95": percentile(0.95), "sample": len(ordered)},
            "per_minute": self._per_minute(),
        }

    def _per_minute(self) -> list[list[int]]:
        """[minute, requests, OCR calls] for each of the last ``MINUTES`` minutes seen."""
        marks = [*self.minutes, [0, self.requests, self.ocr_calls]]
        return [
            [at, later[1] - requests, later[2] - calls]
            for (at, requests, calls), later in itertools.pairwise(marks)
        ][-MINUTES:]

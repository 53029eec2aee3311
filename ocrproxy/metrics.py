"""Prometheus metrics, ``/metrics`` and ``/readyz``.

Theory of operation: one ``Metrics`` object per application owns its collectors. Counting happens
at three points only: the request middleware in app.py (requests by route and status, latency,
time to first upstream byte, in-flight requests and streams, upstream errors, fallbacks to
OCR; through ``started``, ``prepared`` and ``finished``), the description cache's lookup
hook (hits and misses by tier) and the describer's call hook (OCR calls, failures and latency
by model). With several worker processes, ``PROMETHEUS_MULTIPROC_DIR`` is set by the parent before
any worker starts; each worker then writes its samples to files there and any worker can answer
a scrape with the sum of all of them.

``/metrics`` and ``/readyz`` are operator endpoints, not client ones. With ``[server]
metrics_port`` they are served only on that port (bound to ``metrics_host``, loopback by default).
Without it they answer on the main port only to *direct* loopback clients: a request that came
through a reverse proxy (it carries ``X-Forwarded-For``, ``X-Real-IP`` or ``Forwarded``) gets a
404 even though nginx connects from 127.0.0.1. The live page (``ui``) follows the same rule.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import os
import time
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from . import state
from .errors import NotFound, UpstreamError
from .fallback import LEARNED, REJECTED

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


_STATUS = {code: str(code) for code in range(100, 600)}  # label values, made once
FLUSH_S = 1.0  # counts reach the collectors (and, with workers, the shared files) this late
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_FORWARDED = ("X-Forwarded-For", "X-Real-IP", "Forwarded")
# `Trace.fallback` -> the label value
_REASONS = {REJECTED: "rejected_images", LEARNED: "learned"}


class Metrics:
    """The proxy's collectors, in their own registry (or in shared files for several workers)."""

    def __init__(self, models: frozenset[str] = frozenset()) -> None:
        self.models = models  # OCR model names that may be labels; any other is "other"
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        if self.multiprocess:
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        target = None if self.multiprocess else self.registry
        self.requests = Counter(
            "ocrproxy_requests",
            "Requests answered, by route and status",
            ["route", "status"],
            registry=target,
        )
        self.latency = Histogram(
            "ocrproxy_request_duration_seconds",
            "Time from request to the end of the response, by route",
            ["route"],
            buckets=_SECONDS,
            registry=target,
        )
        self.ttfb = Histogram(
            "ocrproxy_upstream_ttfb_seconds",
            "Time from request to the upstream's response headers, by upstream",
            ["upstream"],
            buckets=_SECONDS,
            registry=target,
        )
        self.ocr_latency = Histogram(
            "ocrproxy_ocr_duration_seconds",
            "Duration of one OCR-model call, by model",
            ["model"],
            buckets=_SECONDS,
            registry=target,
        )
        self.ocr_calls = Counter(
            "ocrproxy_ocr_calls",
            "OCR-model calls, by model and outcome (ok, error)",
            ["model", "outcome"],
            registry=target,
        )
        self.cache = Counter(
            "ocrproxy_cache_lookups",
            "Description cache lookups, by tier and result (hit, miss, join)",
            ["tier", "result"],
            registry=target,
        )
        self.upstream_errors = Counter(
            "ocrproxy_upstream_errors",
            "Upstream failures, by upstream and kind (unreachable, timeout, http_5xx)",
            ["upstream", "kind"],
            registry=target,
        )
        self.fallbacks = Counter(
            "ocrproxy_fallbacks",
            "Requests without an OCR switch sent through OCR, by reason (rejected_images: the "
            "upstream turned their images away; learned: the model was known text-only)",
            ["reason"],
            registry=target,
        )
        self.in_flight = Gauge(
            "ocrproxy_requests_in_flight",
            "Requests being served",
            registry=target,
            multiprocess_mode="livesum",
        )
        self.streams = Gauge(
            "ocrproxy_streams_in_flight",
            "Server-sent event streams open to clients",
            registry=target,
            multiprocess_mode="livesum",
        )
        # Labelled children, looked up once per label set: ``labels()`` validates and locks on
        # every call, a measurable share of a small request's CPU.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        # What was counted since the last flush, as plain numbers: a locked increment per
        # counter and a Python bucket search per histogram on every request cost more than the
        # rest of the metrics did. Applied in bulk at most FLUSH_S later and before every scrape.
        self._counts: dict[tuple[Counter, tuple[str, ...]], int] = {}
        self._tallies: dict[tuple[Histogram, tuple[str, ...]], list[float]] = {}
        self._in_flight = 0
        self._streams = 0
        self._flush_set = False

    def child(self, metric: Counter | Histogram, *values: str) -> Any:
        """``metric.labels(*values)``, cached."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def _add(self, metric: Counter, *values: str) -> None:
        key = (metric, values)
        self._counts[key] = self._counts.get(key, 0) + 1
        self._soon()

    def _observe(self, metric: Histogram, seconds: float, *values: str) -> None:
        key = (metric, values)
        tally = self._tallies.get(key)
        if tally is None:  # a count per bucket (the last one +Inf), then the sum
            tally = self._tallies[key] = [0.0] * (len(_SECONDS) + 2)
        tally[bisect.bisect_left(_SECONDS, seconds)] += 1  # the first bucket with v <= le
        tally[-1] += seconds
        self._soon()

    def _soon(self) -> None:
        if self._flush_set:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        loop.call_later(FLUSH_S, self.flush)
        self._flush_set = True

    def flush(self) -> None:
        """Apply everything counted since the last flush to the collectors."""
        self._flush_set = False
        counts, self._counts = self._counts, {}
        tallies, self._tallies = self._tallies, {}
        for (counter, values), n in counts.items():
            self.child(counter, *values).inc(n)
        for (histogram, values), tally in tallies.items():
            # prometheus_client has no bulk observe: add to the child's per-bucket values and
            # sum, the two things observe() adds to (tests/test_metrics.py checks the result).
            child = self.child(histogram, *values)
            for bucket, count in zip(child._buckets, tally, strict=False):
                if count:
                    bucket.inc(count)
            child._sum.inc(tally[-1])
        self.in_flight.set(self._in_flight)
        self.streams.set(self._streams)

    def cache_lookup(self, tier: str, result: str) -> None:
        self._add(self.cache, tier, result)

    def ocr_call(self, model: str, ok: bool, seconds: float) -> None:
        # The OCR model is the client's string: only configured names become label values, so
        # a client can neither grow the series without bound nor write into the scrape.
        model = model if model in self.models else "other"
        self._add(self.ocr_calls, model, "ok" if ok else "error")
        self._observe(self.ocr_latency, seconds, model)

    def started(self) -> None:
        """A request came in (called by the request middleware, which also calls ``finished``)."""
        self._in_flight += 1
        self._soon()

    def prepared(self, request: web.Request, response: web.StreamResponse) -> None:
        """A response is about to send its headers: an SSE one counts as an open stream."""
        if response.content_type == "text/event-stream":
            request[_STREAMING] = True
            self._streams += 1

    def finished(
        self,
        request: web.Request,
        trace: state.Trace,
        status: int,
        error: BaseException | None,
    ) -> None:
        """Count one answered request: status, latency, and its upstream's answer or failure."""
        self._in_flight -= 1
        if request.get(_STREAMING):
            self._streams -= 1
        route = _route(request)
        self._add(self.requests, route, _STATUS.get(status) or str(status))
        self._observe(self.latency, time.monotonic() - trace.started, route)
        if trace.fallback is not None:
            self._add(self.fallbacks, _REASONS.get(trace.fallback, "other"))
        if isinstance(error, UpstreamError):
            kind = "timeout" if error.status == 504 else "unreachable"
            self._add(self.upstream_errors, _upstream_of(trace), kind)
        if trace.upstream and trace.ttfb_ms is not None:
            self._observe(self.ttfb, trace.ttfb_ms / 1000, trace.upstream)
            if trace.upstream_status is not None and trace.upstream_status >= 500:
                self._add(self.upstream_errors, trace.upstream, "http_5xx")

    def render(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)
MAIN_APP = web.AppKey("main_app", web.Application)
_STREAMING = web.RequestKey("streaming", bool)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _upstream_of(trace: state.Trace) -> str:
    return trace.upstream or "unknown"  # set when the request was routed


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def guard(request: web.Request) -> None:
    """On the main port, only a direct loopback client may see operator endpoints."""
    if MAIN_APP in request.app:
        return  # the separate metrics port
    direct = not any(h in request.headers for h in _FORWARDED)
    if not (direct and _is_loopback(request.remote)):
        raise NotFound(f"Unknown route {request.method} {request.path}")


def main_app(request: web.Request) -> web.Application:
    """The proxy's application, from one of its routes on either port."""
    return request.app[MAIN_APP] if MAIN_APP in request.app else request.app


async def metrics_handler(request: web.Request) -> web.Response:
    guard(request)
    body = main_app(request)[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the config is loaded (it is, or we would not run) and the cache tier answers."""
    guard(request)
    app = main_app(request)
    cfg = app[state.CONFIG]
    cache = app.get(state.CACHE)
    reachable = cache is not None and (cache.tier is None or await cache.tier.ping())
    body = {
        "status": "ready" if reachable else "unavailable",
        "cache": {"backend": cfg.cache.backend, "reachable": reachable},
    }
    return web.json_response(body, status=200 if reachable else 503)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _flush(app: web.Application) -> None:
    app[METRICS].flush()


def install(app: web.Application) -> None:
    """Add counting (and, without a metrics port, the operator routes) to the main app."""
    cfg = app[state.CONFIG]
    literal = {p for up in cfg.upstreams for p in up.models if not any(c in p for c in "*?[")}
    app[METRICS] = Metrics(frozenset({cfg.ocr.model, cfg.ocr.local_alias, *literal}))
    app.on_cleanup.append(_flush)  # last counts of a stopping worker reach the shared files
    if not cfg.server.metrics_port:
        app.router.add_get("/metrics", metrics_handler)
        app.router.add_get("/readyz", readyz)


def create_metrics_app(main: web.Application) -> web.Application:
    """The small app served on ``[server] metrics_port``: /metrics, /readyz, /healthz."""
    app = web.Application()
    app[MAIN_APP] = main
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", healthz)
    from . import ui  # the live page's routes, when it is on (ui imports this module)

    ui.add_routes(app, main)
    return app

"""The application's shared state, under typed keys, and the per-request trace.

Every module that needs the config, the router, the session or the cache finds it here, so no
module reaches up the request's journey (metrics into handlers) for a key. The objects behind
the keys are built and closed by ``app``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from . import config, upstream
from .cache import DescriptionCache
from .catalog import Catalog
from .describe import Describer
from .fetch import Fetcher

if TYPE_CHECKING:  # timeline reads the trace
    from .timeline import Timeline

CONFIG = web.AppKey("config", config.Config)
ROUTER = web.AppKey("router", upstream.Router)
SESSION = web.AppKey("session", aiohttp.ClientSession)
CACHE = web.AppKey("cache", DescriptionCache)
DESCRIBER = web.AppKey("describer", Describer)
CATALOG = web.AppKey("catalog", Catalog)  # the upstreams' model lists
FETCHER = web.AppKey("fetcher", Fetcher)  # present only when `[ocr] fetch_images` is on
SECRETS = web.AppKey("secrets", tuple[bytes, ...])  # masked in everything relayed to clients
PASSTHROUGH = web.AppKey("passthrough", re.Pattern[str])  # `routes_pattern` of the config
DELIMITER_KEY = web.AppKey("delimiter_key", bytes)  # `rewrite.delimiter_key` of the secrets


@dataclass(slots=True)
class Trace:
    """What the access log line says about one request."""

    request_id: str
    started: float = field(default_factory=time.monotonic)
    model: str | None = None
    real_model: str | None = None
    ocr_model: str | None = None
    images: int = 0
    cache_hits: int = 0
    ocr_failures: int = 0
    ocr_ms: float | None = None
    upstream: str | None = None
    upstream_status: int | None = None
    ttfb_ms: float | None = None
    fallback: str | None = None  # why a request without OCR switch went through OCR (`fallback`)
    timeline: Timeline | None = None  # what the live page records of it (`[ui] enabled`)

    def routed(self, up: config.Upstream) -> None:
        """The request goes to ``up`` (named in the metrics even if it never answers)."""
        self.upstream = up.name

    def listed(self, ups: Iterable[config.Upstream], status: int | None) -> None:
        """A model list asked of ``ups``: all named, with one status for them (see ``models``)."""
        self.upstream = ",".join(up.name for up in ups)
        self.upstream_status = status

    def upstream_answered(self, up: config.Upstream, status: int) -> None:
        self.upstream = up.name
        self.upstream_status = status
        self.ttfb_ms = round((time.monotonic() - self.started) * 1000, 2)
        # The live page's timeline shows this from the trace (``timeline.steps``).


TRACE = web.RequestKey("trace", Trace)

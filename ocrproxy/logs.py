"""Structured JSON logging where every line carries the request id.

The request id lives in a context variable set by the request middleware, so any log call made
while serving a request (in the handler or in a task it started) is tagged with it. Secrets are
redacted from messages by ``redact`` before they are logged or echoed in an error.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_KEYISH = re.compile(r"(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-*]+")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Hide known secrets and anything shaped like an API key in ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _KEYISH.sub(r"\1…", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request id, message, and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", None) or request_id.get(),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup(level: str = "info") -> None:
    """Send JSON lines to stderr (journald picks them up under systemd)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("ocrproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.Formatter.converter = time.gmtime
    # The lines never show the caller, thread or process, so do not collect them: finding the
    # caller walks the stack on every call (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False

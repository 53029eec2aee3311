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

_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}
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
        return self.render(record).decode()

    def render(self, record: logging.LogRecord, end: int = 0) -> bytes:
        """The line as UTF-8; ``end=orjson.OPT_APPEND_NEWLINE`` ends it with a newline."""
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": _LEVELS.get(record.levelno) or record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", None) or request_id.get(),
            "msg": record.getMessage() if record.args else str(record.msg),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, option=end)


class JsonLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that, on a stream with a binary buffer (stderr), writes each line as
    bytes in one call: no str round trip, no second flush."""

    def emit(self, record: logging.LogRecord) -> None:
        formatter = self.formatter
        stream = self.stream
        binary = getattr(stream, "buffer", None)
        if not isinstance(formatter, JsonFormatter) or binary is None:
            super().emit(record)
            return
        try:
            line = formatter.render(record, orjson.OPT_APPEND_NEWLINE)
            stream.flush()  # anything written as text before goes first
            binary.write(line)
            binary.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def setup(level: str = "info") -> None:
    """Send JSON lines to stderr (journald picks them up under systemd)."""
    handler = JsonLineHandler(sys.stderr)
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

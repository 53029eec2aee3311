"""Structured JSON logging where every line carries the request id.

The request id comes from the trace of the request being served (``current``), a context
variable set by the request middleware, so any log call made while serving a request (in the
handler or in a task it started) is tagged with it. Secrets are
redacted from messages by ``redact`` before they are logged or echoed in an error; it also drops
image payloads (``data:`` URLs, long base64 runs) that an upstream quotes back in its reasons.

aiohttp's own loggers (and asyncio's) go through the same handler, so the stream holds JSON lines
only. Their records are treated as untrusted text: aiohttp's HTTP parser quotes the offending
bytes of a malformed request in its exception (``b'Authorization: Bearer ck-...\\x00'``), so for a
parser error only the exception's type is kept, and any other message or traceback of theirs
loses its quoted bytes and ``Authorization``/``Bearer`` values before it is written.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson

from . import current


def _serving() -> str:
    """The id of the request being served (``current``), or ``-``."""
    trace = current.request.get()
    return trace.request_id if trace is not None else "-"


_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}
_KEYISH = re.compile(r"(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-*]+")
# A data: URL with base64 (its media type and parameters are client text too), possibly cut.
_DATA_URL = re.compile(r"data:[^,\s\"'<>]{0,1024}?;\s*base64\s*,[A-Za-z0-9+/=_\-]*", re.IGNORECASE)
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{64,}={0,2}")
# What aiohttp's parser errors quote of a request: bytes literals, credentials in header lines.
_BYTES_LITERAL = re.compile(r"""\bb(?:'(?:[^'\\\n]|\\.)*'?|"(?:[^"\\\n]|\\.)*"?)""")
_CREDENTIAL = re.compile(
    r"((?:authorization|x-api-key|api-key|cookie)\s*[:=]\s*(?:(?:bearer|basic)\s+)?"
    r"|(?:bearer|basic)\s+)[^\s'\",]+",
    re.IGNORECASE,
)
# Loggers of libraries whose records go through the JSON handler, scrubbed (``_foreign``).
FOREIGN_LOGGERS = ("aiohttp", "asyncio")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Hide known secrets, anything shaped like an API key, and image payloads in ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _DATA_URL.sub("data:…[image omitted]", text)
    text = _BASE64_RUN.sub("[base64 omitted]", text)
    return _KEYISH.sub(r"\1…", text)


def _scrub(text: str) -> str:
    """Text of a foreign logger without quoted request bytes or credentials."""
    text = _BYTES_LITERAL.sub("b'[omitted]'", text)
    return redact(_CREDENTIAL.sub(r"\1[redacted]", text))


def _is_parser_error(exc: BaseException | None) -> bool:
    from aiohttp import http_exceptions  # only when such a record is logged

    return isinstance(exc, http_exceptions.HttpProcessingError)


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
            "request_id": getattr(record, "request_id", None) or _serving(),
            "msg": record.getMessage() if record.args else str(record.msg),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.name.startswith(FOREIGN_LOGGERS):
            self._foreign(record, entry)
        elif record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, option=end)

    def _foreign(self, record: logging.LogRecord, entry: dict[str, Any]) -> None:
        """Scrub a record of aiohttp or asyncio (see the module's docstring)."""
        entry["msg"] = _scrub(entry["msg"])
        if not record.exc_info:
            return
        exc = record.exc_info[1]
        if _is_parser_error(exc):  # its message is the request's own bytes: the type only
            kind = type(exc)
            entry["exc"] = f"{kind.__module__}.{kind.__qualname__}"
            entry["status"] = getattr(exc, "code", None)
        else:
            entry["exc"] = _scrub(self.formatException(record.exc_info))


class JsonLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that, on a stream with a binary buffer (stderr), writes each line as
    bytes in one call: no str round trip, no second flush.

    Lines given to ``buffer_line`` (the access log, one per request) are collected and written
    together, ``flush_after_s`` after the first of them or as soon as 64 KB are pending, so that
    a request pays for its line but not for a write of its own. Any other record first writes
    what is pending, so the lines keep their order.
    """

    PENDING_LIMIT = 64 * 1024

    def __init__(self, stream: Any = None, flush_after_s: float = 0.05) -> None:
        super().__init__(stream)
        self.flush_after_s = flush_after_s
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._timer_set = False

    def emit(self, record: logging.LogRecord) -> None:
        formatter = self.formatter
        stream = self.stream
        binary = getattr(stream, "buffer", None)
        if not isinstance(formatter, JsonFormatter) or binary is None:
            self._write_pending()
            super().emit(record)
            return
        try:
            line = formatter.render(record, orjson.OPT_APPEND_NEWLINE)
            stream.flush()  # anything written as text before goes first
            if self._pending:
                self._pending.append(line)
                self._write_pending()
            else:
                binary.write(line)
                binary.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def buffer_line(self, line: bytes) -> None:
        """Queue ``line`` (bytes ending in a newline) to be written with others soon."""
        self.acquire()
        try:
            self._pending.append(line)
            self._pending_size += len(line)
            if self._pending_size >= self.PENDING_LIMIT:
                self._write_pending()
            elif not self._timer_set:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # not on an event loop: nothing would flush it later
                    self._write_pending()
                    return
                loop.call_later(self.flush_after_s, self.flush)
                self._timer_set = True
        finally:
            self.release()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()
        super().flush()

    def _write_pending(self) -> None:
        """Write the queued lines in one call (the caller holds the lock, or no one else runs)."""
        self._timer_set = False
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        stream = self.stream
        try:
            stream.flush()
            binary = getattr(stream, "buffer", None)
            if binary is not None:
                binary.write(data)
                binary.flush()
            else:
                stream.write(data.decode())
                stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "access log lines lost"}))


_handler: JsonLineHandler | None = None  # set by setup(): the fast path for access lines


def access(logger: logging.Logger, level: int, fields: dict[str, Any]) -> None:
    """Log one request's access line: message ``request``, ``fields`` (with ``request_id``)
    at the top level.

    With ``setup``'s handler in place the line goes straight into its buffer, without a
    LogRecord or a write of its own; otherwise (tests, embedding) it is an ordinary record.
    """
    if not logger.isEnabledFor(level):
        return
    handler = _handler
    if handler is None:
        extra = {"fields": fields, "request_id": fields.get("request_id")}
        logger.log(level, "request", extra=extra)
        return
    # The same keys as JsonFormatter's lines: the fixed head as text, the fields by orjson.
    head = f'{{"ts":{round(time.time(), 3)},"level":"{_LEVELS[level]}","logger":"{logger.name}"'
    body = orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
    handler.buffer_line(b"".join((head.encode(), b',"msg":"request",', body[1:])))


def setup(level: str = "info") -> None:
    """Send JSON lines to stderr (journald picks them up under systemd)."""
    global _handler
    if _handler is not None:
        try:
            _handler.flush()  # lines still queued for the stream being replaced
        except (OSError, ValueError):  # that stream is closed already (as logging.shutdown)
            pass
    handler = JsonLineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    _handler = handler
    root = logging.getLogger("ocrproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for name in FOREIGN_LOGGERS:  # else Python's last-resort handler prints them as text
        foreign = logging.getLogger(name)
        foreign.handlers[:] = [handler]
        foreign.setLevel(max(root.level, logging.INFO))  # their debug lines are not ours
        foreign.propagate = False
    logging.Formatter.converter = time.gmtime
    # The lines never show the caller, thread or process, so do not collect them: finding the
    # caller walks the stack on every call (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False

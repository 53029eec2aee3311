"""The request being served, for code that has no request object to ask: its trace.

The request middleware (``app.middleware``) sets it for the whole of a request; the tasks
created meanwhile (the describe task, a cache flight, a fetch) copy it with their context. Log
lines take their request id from it (``logs``), and the live page's steps the request's
timeline (``timeline.step``, through ``Trace.timeline``). One variable serves both: each costs
every request a set and a reset.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # state imports the modules that read this one
    from .state import Trace

request: contextvars.ContextVar[Trace | None] = contextvars.ContextVar(
    "ocrproxy_request", default=None
)

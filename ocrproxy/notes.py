"""Notes the proxy adds to an upstream's error message, so that the client learns what the
upstream could not know (the model as the user typed it, before the proxy took the suffix off).

Theory of operation: an upstream's error is relayed as it was sent; the one edit allowed is
appending text to its ``error.message``, which OpenAI's ``{"error": {"message": ...}}`` and
Anthropic's ``{"type": "error", "error": {"message": ...}}`` both carry. Anything else (not
JSON, no such message, a message that is not a string) is left to be relayed unchanged: the
caller gets None and sends the original bytes. The edited body is re-encoded whole, every other
field kept, so its length changes: the caller builds a response from it (aiohttp sets the new
``Content-Length``) and never relays the upstream's length with it.
"""

from __future__ import annotations

import orjson


def with_message_note(body: bytes, note: str) -> bytes | None:
    """``body`` with ``note`` appended to its ``error.message``, or None when it has none."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    error["message"] += note
    return orjson.dumps(obj)

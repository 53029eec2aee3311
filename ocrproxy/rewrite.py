"""The text that stands in for an image, in every dialect. Pure functions, no I/O.

Rules:
- Each image is replaced *in place* (by its dialect, ``Dialect.splice``) by text holding a
  delimited reference block, numbered by order of appearance across the whole request (an
  image sent twice gets two numbers and the same description).
- The delimiters cannot be guessed. Both carry the image's tag (``#`` and 8 hex digits:
  ``[Image 1 #a1b2c3d4 (described by ...)]`` ... ``[End of image 1 #a1b2c3d4]``), an HMAC of
  the image's identity under a key only the proxy knows (``delimiter_key``), so a text part
  imitating a block lacks it; and inside a description every ``[Image``/``[End of image`` is
  escaped to ``\\[Image``/``\\[End of image``, so the text of an image (which can say anything)
  never holds a delimiter at all. The client's own text parts are left byte for byte as they
  are. The tag depends on the image alone, not on the request: the same history is rewritten
  to the same text every turn, so the upstream's prompt (prefix) cache keeps working. The
  price: a tag the model once echoed back is known to that client for later turns; what it
  guards against is text the client did not see the proxy's answer to (a pasted page, a file).
- An image that could not be analysed gets a placeholder saying so, with its ``reasons.Reason``:
  fixed words, never an address, a key or an upstream's message, so the model can tell the user
  why without the proxy leaking anything through it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable

from .reasons import Reason

# The opening bracket of anything a delimiter could be mistaken for, in any case and spacing.
_DELIMITER = re.compile(r"\[(?=\s*(?:image|end\s+of\s+image)\b)", re.IGNORECASE)


def delimiter_key(secrets: Iterable[str]) -> bytes:
    """The key of the delimiter tags: derived from the configured secrets, so that every worker
    and every instance of one deployment tags an image alike (and no client can); random per
    process when there is no secret (a pure relay), which only costs prefix-cache hits across
    processes."""
    h = hashlib.sha256(b"ocrproxy/delimiters\0")
    found = False
    for secret in sorted(secrets):
        data = secret.encode()
        h.update(len(data).to_bytes(4, "big") + data)
        found = True
    return h.digest() if found else os.urandom(32)


def delimiter_tag(key: bytes, image_digest: bytes) -> str:
    """The tag the delimiters of one image carry."""
    return hmac.new(key, image_digest, hashlib.sha256).hexdigest()[:8]


def escape(text: str) -> str:
    """``text`` with every ``[`` that opens something like a block delimiter escaped."""
    return _DELIMITER.sub(r"\\[", text)


def _tag(number: int, nonce: str) -> str:
    return f"{number} #{nonce}" if nonce else str(number)


def reference_block(number: int, model: str, text: str, nonce: str = "") -> str:
    """The text that stands in for image ``number`` once described; ``nonce`` is its
    ``delimiter_tag`` (``""``: none, for output no client text sits next to)."""
    tag = _tag(number, nonce)
    return (
        f"[Image {tag} (described by {escape(model)}; you cannot see the image itself, "
        f"only this description)]\n{escape(text)}\n[End of image {tag}]"
    )


def placeholder_block(number: int, nonce: str = "", reason: Reason | None = None) -> str:
    """The text that stands in for an image whose analysis failed (``reason``: why)."""
    if reason is None:
        return (
            f"[Image {_tag(number, nonce)}: this image could not be analysed, so its content is "
            f"unknown. If the answer depends on it, tell the user the image could not be read.]"
        )
    return (
        f"[Image {_tag(number, nonce)}: this image could not be analysed ({reason.value}), so "
        f"its content is unknown. If the answer depends on it, tell the user the image could "
        f"not be read and why.]"
    )

"""What a JSON body must be before the proxy works on it: bounded depth, sane model names, no
field that would redirect the request.

Theory of operation: the name and field checks run on every body the proxy reads anyway (chat
requests, pass-through JSON), after msgspec decoded its top level and before any upstream call,
so that hostile input is a 400 and never a 500 or a traceback. The depth check runs where the
proxy walks the whole body (OCR requests): it reads the raw bytes with bytes methods and one
regex, never a Python loop over the body, and most bodies (a small chat, a large base64 image)
are judged by their bracket count alone; a text-heavy body with many escaped quotes costs it
several times its decode, which is why bodies forwarded byte for byte are spared it.
"""

from __future__ import annotations

import re

from .errors import BadRequest
from .schema import RawObject

# Body fields that would let a client choose where the proxy sends requests (or with which key)
# in other gateways. ocrproxy's upstreams are fixed by its operator: such a request is refused.
REDIRECTING_FIELDS = ("api_base", "base_url", "api_key", "azure_endpoint", "api_version")
MAX_DEPTH = 64  # nesting levels of a body the proxy walks whole (an OCR request)
MAX_NAME = 256  # characters of `model` and `ocr_model`
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'[]{}"'))


def _within(levels: int) -> re.Pattern[bytes]:
    # Containers at most `levels` deep, as a regex over `(` and `)` alone: one container of
    # depth <= k is `(` + any number of containers of depth <= k-1 + `)`. Possessive: no
    # backtracking, one linear pass whatever the input.
    container = rb"\(\)"
    for _ in range(levels - 1):
        container = rb"\((?:" + container + rb")*+\)"
    return re.compile(rb"(?:" + container + rb")*+")


_WITHIN_DEPTH = _within(MAX_DEPTH)


def too_deep(body: bytes | bytearray) -> bool:
    """Whether ``body``, valid JSON, nests deeper than ``MAX_DEPTH`` levels.

    Bytes methods and one regex, no Python loop over the body: a body with at most MAX_DEPTH
    brackets cannot be deeper. Otherwise escaped backslashes and quotes go first (so that
    every quote left opens or closes a string), then all but brackets and quotes; bracket-free
    strings (``""`` by then) and then strings with brackets go; the brackets left are checked
    by ``_WITHIN_DEPTH`` in one linear pass. Call it after the body decoded: on invalid JSON
    (unbalanced brackets) the answer means nothing.
    """
    if len(body) >= 65536 and not _brackets_over(body, MAX_DEPTH):
        return False  # a large body is mostly base64: memchr finds its few brackets fastest
    structure = body.translate(_BRACKETS, _NOT_STRUCTURE)
    if structure.count(b"(") <= MAX_DEPTH:
        return False
    if body.find(b"\\") >= 0 and b'\\"' in body:  # only an escaped quote can mislead
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
        structure = body.translate(_BRACKETS, _NOT_STRUCTURE)
    structure = structure.replace(b'""', b"")
    if b'"' in structure:
        structure = b"".join(structure.split(b'"')[::2])
    return _WITHIN_DEPTH.fullmatch(structure) is None


def _brackets_over(body: bytes | bytearray, limit: int) -> bool:
    count = 0
    for opening in b"[{":
        at = body.find(opening)
        while at >= 0:
            count += 1
            if count > limit:
                return True
            at = body.find(opening, at + 1)
    return False


def deep() -> BadRequest:
    return BadRequest(f"The request body nests JSON deeper than {MAX_DEPTH} levels")


def check_depth(body: bytes | bytearray) -> None:
    if too_deep(body):
        raise deep()


def check_name(value: str, param: str) -> None:
    """A model name goes into headers, logs and cache keys: bounded, no control characters."""
    if len(value) > MAX_NAME or _CONTROL.search(value):
        raise BadRequest(
            f"`{param}` must be at most {MAX_NAME} characters, without control characters",
            param=param,
        )


def check_redirecting(obj: RawObject) -> None:
    for name in REDIRECTING_FIELDS:
        if name in obj:
            raise BadRequest(
                f"`{name}` is not accepted: this proxy's upstreams are set by its operator",
                param=name,
            )

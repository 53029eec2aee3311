"""Mask the configured secrets in what is relayed to a client: bodies, streamed pieces, headers.

Theory of operation: no configured secret (upstream keys, client keys, the Redis password)
reaches a client: every body and header relayed is searched for them (one ``in`` per secret per
piece, a memchr-fast search) and each occurrence is masked. A streamed body may split a secret
across two pieces, so a ``Redactor`` holds back the end of a piece only when it is the start of
some secret: an SSE event (ending in a blank line) is never delayed. A body streamed with a
Content-Length gets a mask of the secret's own length, so that the length the client was
promised stays true. A body the upstream sent with a ``Content-Encoding`` is relayed as it
came, unsearched (the proxy asks upstreams for ``identity``, so only one that ignores that is
affected). The cost is one search per secret per piece: about 0.4 µs per secret for a 200-byte
SSE chunk, so a proxy with hundreds of client keys pays tens of µs per chunk.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

MASK = b"[redacted]"


def secrets_of(values: Iterable[str]) -> tuple[bytes, ...]:
    """The configured secrets as redaction wants them: encoded, non-empty, longest first (so
    that a secret inside another does not leave the longer one's ends unmasked)."""
    unique = {v.encode() for v in values if v}
    return tuple(sorted(unique, key=lambda s: (-len(s), s)))


def redact(payload: bytes, secrets: tuple[bytes, ...]) -> bytes:
    """``payload`` with every occurrence of every secret replaced by ``[redacted]``."""
    for secret in secrets:
        if secret in payload:
            payload = payload.replace(secret, MASK)
    return payload


def redact_headers(headers: CIMultiDict[str], secrets: tuple[bytes, ...]) -> None:
    """Mask secrets in header values (in place); a header whose name holds one is dropped."""
    if not secrets or not headers:
        return
    blob = "\n".join((*headers.keys(), *headers.values())).encode("utf-8", "surrogateescape")
    if not any(secret in blob for secret in secrets):
        return
    texts = [s.decode("utf-8", "surrogateescape") for s in secrets]
    items = list(headers.items())
    headers.clear()
    for name, value in items:
        if any(t in name for t in texts):
            continue
        for text in texts:
            value = value.replace(text, MASK.decode())
        headers.add(name, value)


class Redactor:
    """Masks secrets in a body relayed piece by piece, where one may straddle two pieces.

    Only a tail that is the start of some secret is held back (until the next piece tells), so
    the common piece goes out whole at once; what is held at the end of the body is sent as is
    (it is not a whole secret). With ``same_length`` each secret is masked by as many ``*``, so
    that a Content-Length sent beforehand stays true.
    """

    __slots__ = ("_alphabet", "_held", "_pairs", "_starts")

    def __init__(self, secrets: tuple[bytes, ...], *, same_length: bool = False) -> None:
        self._pairs = tuple((s, b"*" * len(s) if same_length else MASK) for s in secrets)
        self._starts = tuple((s, s[0], len(s) - 1) for s in secrets if len(s) > 1)
        # A piece whose last byte is in no secret cannot end with the start of one: an SSE
        # event ends in a newline, a JSON body in a brace, so the tail search is skipped.
        self._alphabet = frozenset(b"".join(secrets))
        self._held = b""

    def feed(self, piece: bytes) -> bytes:
        """What of ``piece`` (after what was held) can be sent now, secrets masked."""
        data = self._held + piece if self._held else piece
        for secret, mask in self._pairs:
            if secret in data:
                data = data.replace(secret, mask)
        if not data or data[-1] not in self._alphabet:
            self._held = b""
            return data
        size = len(data)
        cut = size
        for secret, first, most in self._starts:
            # Does the data end with the first ``most`` bytes or fewer of this secret?
            at = data.find(first, max(size - most, 0))
            while 0 <= at < cut:
                if secret.startswith(data[at:]):
                    cut = at
                    break
                at = data.find(first, at + 1)
        self._held = data[cut:]
        return data[:cut] if cut < size else data

    def flush(self) -> bytes:
        """What is still held, once the body has ended: a secret's start, not a whole one."""
        held, self._held = self._held, b""
        return held

"""When a model turns images away: describe them and send the request again, once.

Theory of operation: a request with no OCR switch is forwarded byte for byte, as always. Only
when the upstream answers one of ``STATUSES`` with a small, plain (not compressed, not SSE)
body does the pipeline read that body (``suspect``), as the relay would have read it anyway,
and match it against ``REJECTIONS``: the wordings with which vendors say "this model can't take
images" (``rejects_images``). If the body matches and the request has images, the pipeline
forgets that answer (nothing of it reaches the client), describes the images and sends the
request again through the OCR pipeline with ``[ocr] model``, exactly as ``<model>-ocr`` would
have, and relays that second answer, whatever it is: a request falls back at most once. If
that answer is a success, the model is remembered as text-only (``Learned``), keyed by
upstream (and, in relay mode, the client's credential) and model, for ``[ocr] learned_ttl_s``:
later requests of it that carry images go to OCR at once, with no refused call first (and no
model check: the upstream has taken the name), and those without images are forwarded as
ever. Only what the upstream says counts (``rejects_images``): values quoted in its message,
which may be the client's own text echoed back, do not, so no client can make the proxy learn
a model that sees as text-only by sending text that reads like a refusal.

With ``[ocr] fallback_on_rejection = false``, or when the OCR model can't be used, the
rejection is relayed with its status, its ``error.message`` gaining a hint that names the
``-ocr`` model (``hint``, added by ``notes.with_message_note``). A rejection-looking answer to
a request without images (GLM's 1210 is its answer to any bad parameter) is relayed untouched.

The store is per process and in memory: a worker that has not learned a model yet pays one
rejected call for it, which costs no more than a 4xx; sharing it (Redis) would add a network
round trip to every request that is not OCR'd, the one path that must stay free.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

import aiohttp
import orjson
from aiohttp import web

from .describe import Describer
from .errors import ProxyError

log = logging.getLogger("ocrproxy.fallback")

# Statuses with which vendors refuse a request's shape; any other answer is relayed untouched.
STATUSES = frozenset({400, 404, 415, 422})
# Only an error body at most this large (bytes) is matched: rejections are one short JSON object.
MAX_BODY = 64 * 1024
# Models remembered as text-only at most, the oldest forgotten first.
MAX_LEARNED = 10_000

# How ``X-OCR-Fallback`` and the access log name what happened (the metric's reason label is
# the same word with an underscore).
REJECTED = "rejected-images"  # the upstream turned the images away: described, sent again
LEARNED = "learned"  # the model was learned text-only: sent through OCR at once

_I = re.IGNORECASE
# What an upstream says when the model can't take images, matched in what the error says
# (``_said``), case-insensitively. An entry must not match complaints about one image (too large,
# invalid, unsupported format): those come from models that do read images.
REJECTIONS: tuple[re.Pattern[str], ...] = (
    # DeepSeek's OpenAI endpoint (a serde enum): "messages[0]: unknown variant `image_url`,
    # expected `text`"; the same parser's answer to a Responses `input_image` part.
    re.compile(r"unknown variant `(?:image_url|input_image)`", _I),
    # DeepSeek's Anthropic endpoint, given an Anthropic `{"type": "image"}` block.
    re.compile(r"unknown variant `image`", _I),
    # OpenRouter, when no provider of the model takes images (a 404).
    re.compile(r"no endpoints found that support image input", _I),
    # GLM (Zhipu): error code 1210, "API 调用参数有误" (bad parameter), its answer to an image
    # part for a text model. The code field only (``_said`` writes it as `"code": "1210"`):
    # "1210" elsewhere (a token count) is not it.
    re.compile(r'"code"\s*:\s*"?1210(?![0-9])', _I),
    # OpenAI's older models: "image_url is only supported by certain models".
    re.compile(r"image_url\W{0,3} is only supported by certain models", _I),
    # vLLM serving a text-only model: "At most 0 image(s) may be provided in one request".
    re.compile(r"at most 0 image", _I),
    # vLLM again: "<model> is not a multimodal model".
    re.compile(r"is not a multimodal model", _I),
    # Generic: "image input is not supported" (llama.cpp), "images are not supported",
    # "vision is not supported", "image_url unsupported". Not "image format not supported".
    re.compile(
        r"\b(?:images?|image_url|vision)(?:[ _](?:inputs?|content|parts?|messages?))?"
        r"\s+(?:(?:is|are)\s+)?(?:not\s+|un)supported",
        _I,
    ),
    # Generic: "model does not support images" (LM Studio), "does not support image input",
    # "doesn't support vision". Not "does not support image format ..." nor "image/bmp".
    re.compile(
        r"does(?:\s+not|n't)\s+support\s+(?:images?|image[ _](?:inputs?|content|url)|vision"
        r"|multimodal)\b(?!\s*(?:formats?|types?|sizes?|media|mime)\b|/)",
        _I,
    ),
)


def suspect(source: aiohttp.ClientResponse) -> bool:
    """Whether an upstream answer might be a rejection of images, from its head only: a
    refusing status and a small, plain body."""
    if source.status not in STATUSES or "Content-Encoding" in source.headers:
        return False
    length = source.content_length
    if length is not None and length > MAX_BODY:
        return False
    return not source.headers.get("Content-Type", "").startswith("text/event-stream")


def rejects_images(status: int, body: bytes) -> bool:
    """Whether an upstream's error answer says that the model can't take images. Only what the
    upstream says itself counts: an error's ``message`` (or ``detail``) and ``code``, or a body
    that is not JSON, whole; and none of the quoted values in it, which are often the client's
    own text echoed back ("Invalid value: 'does not support images'")."""
    if status not in STATUSES or len(body) > MAX_BODY:
        return False
    said = _said(body)
    return any(pattern.search(said) for pattern in REJECTIONS)


# A quoted span with a space in it: an echoed value, not the vendor's words. (DeepSeek's
# backticked `image_url` is kept, and so are quoted single words: 'image_url'.)
_QUOTED = re.compile(r"'[^'\n]*\s[^'\n]*'|\"[^\"\n]*\s[^\"\n]*\"")


def _said(body: bytes) -> str:
    """The words of an error body the patterns are matched against."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _QUOTED.sub(" ", body.decode("utf-8", "replace"))
    if not isinstance(obj, dict):
        return ""
    error = obj.get("error", obj)  # OpenAI's and Anthropic's nest it; vLLM's and FastAPI's don't
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        return ""
    message = error.get("message", error.get("detail"))
    text = _QUOTED.sub(" ", message) if isinstance(message, str) else ""
    code = error.get("code")
    return f'{text}\n"code": "{code}"' if isinstance(code, str | int) else text


def usable(describer: Describer, model: str) -> bool:
    """Whether the OCR model can describe images now; if not, the rejection is relayed (with a
    hint) rather than a new error about a model the client never named."""
    try:
        describer.check_model(model)
    except ProxyError as exc:
        log.warning("no fallback to OCR: the OCR model %s can't be used (%s)", model, exc.message)
        return False
    return True


def hint(model: str) -> str:
    """What the rejection's message gains when the proxy does not fall back itself; ``model``
    is the ``-ocr`` model to use."""
    return f" (ocrproxy: this model cannot read images; use `{model}` to have them described first)"


class Learned:
    """Models found text-only, by (scope, model), each for ``ttl`` seconds; at most ``cap`` of
    them, the oldest forgotten first. The scope is the upstream and, in relay mode, the client's
    credential (``catalog.scope_of``): one client's refusal never decides for another's
    account. ``clock`` is monotonic seconds (tests set it)."""

    def __init__(
        self, ttl: float, cap: int = MAX_LEARNED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.cap = cap
        self.clock = clock
        self._until: OrderedDict[tuple[Hashable, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def learn(self, scope: Hashable, model: str, upstream: str = "") -> None:
        """Remember ``model`` in ``scope`` as text-only, from now for ``ttl`` seconds
        (``upstream``: its name, for the log)."""
        if self.ttl <= 0:
            return
        log.info(
            "%s of %s turned images away: learned text-only for %.0f s", model, upstream, self.ttl
        )
        key = (scope, model)
        self._until.pop(key, None)  # re-learnt: now the newest
        self._until[key] = self.clock() + self.ttl
        while len(self._until) > self.cap:
            self._until.popitem(last=False)

    def knows(self, scope: Hashable, model: str) -> bool:
        """Whether ``model`` in ``scope`` is remembered as text-only (and not expired)."""
        if not self._until:  # the common case: one truthiness test
            return False
        until = self._until.get((scope, model))
        if until is None:
            return False
        if self.clock() >= until:
            del self._until[(scope, model)]
            return False
        return True


# The application's store (set by ``app``; one per process).
STORE: web.AppKey[Learned] = web.AppKey("learned_models", Learned)

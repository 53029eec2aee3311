"""When a model turns images away: describe them and send the request again, once.

Theory of operation: a request with no OCR switch is forwarded byte for byte, as always. Only
when the upstream answers one of ``STATUSES`` with a small, plain (not compressed, not SSE)
body does the pipeline read that body (``suspect``), as the relay would have read it anyway,
and match it against ``REJECTIONS``: the wordings with which vendors say "this model can't take
images" (``rejects_images``). If the body matches and the request has images, the pipeline
forgets that answer (nothing of it reaches the client), describes the images and sends the
request again through the OCR pipeline with ``[ocr] model``, exactly as ``<model>-ocr`` would
have, and relays that second answer, whatever it is: a request falls back at most once. The
model is then remembered as text-only (``Learned``), keyed by upstream and model, for
``[ocr] learned_ttl_s``, so later requests go to OCR at once.

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
from collections.abc import Callable

import aiohttp
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
# What an upstream says when the model can't take images, matched anywhere in the error body's
# text, case-insensitively. An entry must not match complaints about one image (too large,
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
    # part for a text model. The code field only: "1210" elsewhere (a token count) is not it.
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
    """Whether an upstream's error answer says that the model can't take images."""
    if status not in STATUSES or len(body) > MAX_BODY:
        return False
    text = body.decode("utf-8", "replace")
    return any(pattern.search(text) for pattern in REJECTIONS)


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
    """Models found text-only, by (upstream name, model), each for ``ttl`` seconds; at most
    ``cap`` of them, the oldest forgotten first. ``clock`` is monotonic seconds (tests set it)."""

    def __init__(
        self, ttl: float, cap: int = MAX_LEARNED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.cap = cap
        self.clock = clock
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def learn(self, upstream: str, model: str) -> None:
        """Remember ``model`` of ``upstream`` as text-only, from now for ``ttl`` seconds."""
        log.info(
            "%s of %s turned images away: learned text-only for %.0f s", model, upstream, self.ttl
        )
        if self.ttl <= 0:
            return
        key = (upstream, model)
        self._until.pop(key, None)  # re-learnt: now the newest
        self._until[key] = self.clock() + self.ttl
        while len(self._until) > self.cap:
            self._until.popitem(last=False)

    def knows(self, upstream: str, model: str) -> bool:
        """Whether ``model`` of ``upstream`` is remembered as text-only (and not expired)."""
        if not self._until:  # the common case: one truthiness test
            return False
        until = self._until.get((upstream, model))
        if until is None:
            return False
        if self.clock() >= until:
            del self._until[(upstream, model)]
            return False
        return True


# The application's store (set by ``app``; one per process).
STORE: web.AppKey[Learned] = web.AppKey("learned_models", Learned)

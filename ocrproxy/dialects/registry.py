"""The dialect each upstream API speaks (``[[upstreams]] api``)."""

from __future__ import annotations

from . import OcrCall
from .chat import CHAT
from .messages import MESSAGES

BY_API: dict[str, OcrCall] = {"openai": CHAT, "anthropic": MESSAGES}

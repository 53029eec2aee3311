"""The API dialects the proxy speaks, and what the pipeline asks of each one.

Theory of operation: the OCR pipeline (``pipeline``) runs the same steps for every API; only
the shapes differ. A dialect is one module holding one ``Dialect`` object that knows its own
shapes and nothing else: the top-level fields of a request (``parse``), where its images live
and how to put text in their place (``find``, ``splice``), where its answers carry ``usage``
(``usage_path``; in a stream, ``stream_usage_path`` in ``stream_usage_events``), what
``usage.ocr`` looks like there, its SSE framing (keep-alives, error events) and its error JSON.
A dialect that upstreams speak also says how a model behind one is asked to describe an image
(``OcrCall``: ``ocr_request``, ``ocr_answer``). Images leave a dialect as neutral
``images.Image`` records, so one description cache serves every dialect.

An upstream speaks one API (``[[upstreams]] api``); a dialect's requests go only to upstreams
that speak it (``BY_API``), and the OCR model is called in the API of whichever upstream it
routes to. Adding a dialect is one module here, an entry in ``BY_API`` if upstreams speak it,
and its routes.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import msgspec

from .. import config
from ..errors import BadRequest, InvalidImage, ProxyError
from ..guard import check_name, check_redirecting, deep
from ..images import Image, decode_raw, from_data_url, inline, raw_string_bytes, str_decoder
from ..schema import RawObject, encoder, is_json, messages_decoder, object_decoder

log = logging.getLogger("ocrproxy.dialects")


@dataclass(slots=True)
class Parsed:
    """A request's top level: its fields as raw JSON, and what the proxy reads of them."""

    obj: RawObject
    model: str
    ocr_model: str | None
    stream: bool


@dataclass(slots=True)
class Found:
    """The images of a request, in order of appearance; a dialect adds where they sit."""

    images: list[Image] = field(default_factory=list)


def field_value(obj: RawObject, name: str) -> Any:
    """A top-level field decoded (None if absent); a number out of msgspec's range is a 400."""
    raw = obj.get(name)
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:  # the only failure of a Raw slice: a number out of range
        raise BadRequest(
            f"`{name}` holds a number out of range (64-bit integers and doubles only)", param=name
        ) from None


def decode_top(body: bytes | bytearray) -> RawObject:
    """The request body's top level, as raw JSON values; a 400 if it is not a JSON object."""
    try:
        return object_decoder.decode(body)
    except msgspec.ValidationError:
        raise BadRequest("The request body must be a JSON object") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:  # past ~1000 levels: msgspec's own limit
        raise deep() from None


class Dialect(ABC):
    """One API's shapes. Subclasses fill in the class attributes and the abstract methods."""

    name: ClassVar[str]  # in logs and metrics: "chat", "messages"
    api: ClassVar[str]  # the `[[upstreams]] api` its requests go to
    path: ClassVar[str]  # the upstream route, below the API's root
    items: ClassVar[str]  # the top-level array holding the conversation
    keep_alive: ClassVar[bytes]  # an SSE keep-alive the official clients skip
    usage_path: ClassVar[tuple[str, ...]] = ("usage",)  # where a plain answer holds usage
    # Where a stream's usage event holds it (as a plain answer, unless a dialect says not), and
    # the event types that may carry it (none named: any event with an object there).
    stream_usage_path: ClassVar[tuple[str, ...]] = ("usage",)
    stream_usage_events: ClassVar[frozenset[str]] = frozenset()

    def parse(self, body: bytes | bytearray) -> Parsed:
        """Decode the top level and check what the proxy reads of it (400 otherwise)."""
        obj = decode_top(body)
        raw_model = obj.get("model")
        try:
            model = str_decoder.decode(raw_model) if raw_model is not None else ""
        except msgspec.ValidationError:
            model = ""
        if not model:
            raise BadRequest("`model` is required and must be a non-empty string", param="model")
        check_name(model, "model")
        self.check_items(obj.get(self.items))
        check_redirecting(obj)
        ocr_model = field_value(obj, "ocr_model")
        if ocr_model is not None and (not isinstance(ocr_model, str) or not ocr_model):
            raise BadRequest("`ocr_model` must be a non-empty string", param="ocr_model")
        if ocr_model is not None:
            check_name(ocr_model, "ocr_model")
        return Parsed(obj, model, ocr_model, field_value(obj, "stream") is True)

    def check_items(self, items: msgspec.Raw | None) -> None:
        """A 400 unless the conversation field is there, as an array."""
        if items is None:
            raise BadRequest(f"`{self.items}` is required", param=self.items)
        if not is_json(items, b"["):
            raise BadRequest(f"`{self.items}` must be an array", param=self.items)

    @abstractmethod
    def find(self, parsed: Parsed, max_images: int) -> Found:
        """Every image of the request; a 400 on a malformed shape, or at image
        ``max_images + 1``."""

    @abstractmethod
    def splice(self, parsed: Parsed, found: Found, blocks: Sequence[str], model: str) -> bytes:
        """The text-only request: ``blocks[i]`` in place of ``found.images[i]``, ``model`` as
        the model, ``ocr_model`` gone, every other byte as the client sent it."""

    def edits_stream(self, parsed: Parsed) -> bool:
        """Whether the stream's usage event gains ``usage.ocr``."""
        return True

    @abstractmethod
    def ocr_usage(self, usage: Mapping[str, Any]) -> dict[str, Any]:
        """``usage.ocr`` in this dialect's words, from ``describe.OcrReport.usage``."""

    @abstractmethod
    def error_body(self, error: ProxyError) -> bytes:
        """An error the proxy makes, as this dialect's error JSON."""

    @abstractmethod
    def error_event(self, error: ProxyError | bytes) -> bytes:
        """An SSE event carrying an error (``bytes``: an error body already in this shape)."""

    @abstractmethod
    def upstream_error_event(self, status: int, payload: bytes) -> bytes:
        """An error event for an upstream's non-200 answer to a stream already committed."""

    @abstractmethod
    def as_events(self, payload: bytes) -> bytes:
        """A plain JSON answer to a streaming request, as this dialect's events."""

    def progress_event(
        self, text: str, *, stream_id: str, model: str, created: int, first: bool
    ) -> bytes | None:
        """A note on the OCR step (``progress``) as an event a client shows but no parser of
        the upstream's answer counts, or None where the dialect has no such event (the
        default). ``first``: the stream's first event; ``stream_id``, ``model``, ``created``:
        what stands in for the upstream's, which are not known yet."""
        return None

    def encode(self, obj: RawObject, items: Any, model: str) -> bytes:
        """The top level with ``items`` and ``model`` replaced and ``ocr_model`` dropped."""
        out: dict[str, Any] = dict(obj)
        out.pop("ocr_model", None)
        out["model"] = model
        out[self.items] = items
        return encoder.encode(out)


class OcrCall(Protocol):
    """How a model behind an upstream of one API is asked to describe an image: what the
    dialects that upstreams speak (``registry.BY_API``) add to ``Dialect``."""

    @property
    def path(self) -> str: ...

    @property
    def answer_name(self) -> str:
        """What its answers are called, in error messages."""
        ...

    def ocr_request(
        self, model: str, settings: config.Ocr, image: Image
    ) -> tuple[bytes, bytes | memoryview, bytes]:
        """The body asking ``model`` to describe ``image``: (head, image characters, tail),
        so that a long base64 text is sent from where it lies."""
        ...

    def ocr_answer(self, payload: bytes) -> tuple[str, int, int] | None:
        """(text, input tokens, output tokens) of the OCR model's answer; None if malformed."""
        ...


def string_field(obj: RawObject, name: str) -> str | None:
    """A string field of a raw JSON object; None if it is absent or not a string."""
    raw = obj.get(name)
    if raw is None or not is_json(raw, b'"'):
        return None
    value: str = str_decoder.decode(raw)
    return value


def kind_of(obj: RawObject) -> str | None:
    """An item's, part's or block's ``type``; None if it has none (or not a string)."""
    return string_field(obj, "type")


def decode_messages(raw: msgspec.Raw) -> list[RawObject]:
    """A ``messages`` array of objects, decoded one level; a 400 naming what is malformed."""
    try:
        messages: list[RawObject] = messages_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        where = str(exc).replace("`$", "`messages")
        raise BadRequest(f"`messages` is malformed: {where}", param="messages") from None
    return messages


def url_image(raw_url: msgspec.Raw, where: str, named: str) -> Image:
    """The image a raw JSON URL string (the field ``named``) stands for: a base64 data: URL
    (its characters a view into the client's body) or an http(s) URL; a 400 otherwise."""
    scheme = bytes(memoryview(raw_url)[1:9]).lower()  # schemes are case-insensitive
    if scheme.startswith(b"data:"):
        data, safe = raw_string_bytes(raw_url, where)
        return from_data_url(where, data, safe)
    if scheme.startswith((b"http://", b"https://")):
        return Image(where, url=decode_raw(str_decoder, raw_url, where), is_data=False)
    raise InvalidImage(
        f"`{named}` must be a data: URL or an http(s) URL", param=f"{where}.image_url"
    )


def source_image(source: RawObject, where: str) -> Image | None:
    """The image an Anthropic-style image ``source`` (of the block at ``where``) stands for: a
    ``base64`` source is inline (its ``data`` stays a view into the client's body), a ``url``
    source is remote. None for any other kind: a ``file`` source (Files API) is left as it is,
    with a warning. Both the Messages dialect and chat clients that mix dialects send these."""
    kind = kind_of(source)
    if kind == "base64":
        data = source.get("data")
        if data is None or not is_json(data, b'"'):
            raise BadRequest(f"`{where}.source.data` must be a string", param=where)
        media_type = source.get("media_type")
        declared = decode_raw(str_decoder, media_type, where) if media_type else ""
        payload, safe = raw_string_bytes(data, where)
        return inline(where, payload, declared if isinstance(declared, str) else "", safe)
    if kind == "url":
        url = decode_raw(str_decoder, source.get("url", b"null"), f"{where}.source.url")
        if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
            raise BadRequest(f"`{where}.source.url` must be an http(s) URL", param=where)
        return Image(where, url=url, is_data=False)
    if kind == "file":
        log.warning("a Files API image at %s is passed on as it is", where)
    return None


def splice_point(body: bytes, mark: bytes) -> tuple[bytes, bytes]:
    """``body`` cut inside the empty string that follows ``mark`` (which must occur once:
    a ``"`` inside an encoded string is always escaped, so a mark with bare quotes cannot
    occur in any string's text)."""
    split = body.index(mark) + len(mark) - 1
    return body[:split], body[split:]


def reason(payload: bytes) -> str:
    """An error body's message, as both OpenAI and Anthropic shape it, else its first bytes."""
    try:
        message = msgspec.json.decode(payload)["error"]["message"]
        return message if isinstance(message, str) else str(message)
    except (msgspec.DecodeError, KeyError, TypeError):
        return payload[:200].decode("utf-8", "replace")

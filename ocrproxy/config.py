"""Settings: frozen msgspec structs, loaded once at start-up from TOML plus the environment.

Rules:
- Every section and key has a default here, so an empty file (or no file) is a valid config.
- An unknown or ill-typed key is an error naming its path (``$.ocr.timeout_s``).
- ``${VAR}`` inside any string is replaced from the environment before validation; an unset
  variable is an error rather than a silent empty string, except ``${VAR:-default}``.
- With no file, one upstream is built from the ``openai`` SDK's conventions
  (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``), and an Anthropic one beside it from Claude
  Code's (``ANTHROPIC_BASE_URL``, ``ANTHROPIC_API_KEY`` or ``ANTHROPIC_AUTH_TOKEN``).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 50 * 1024 * 1024
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_OCR_MODEL = "gpt-4o-mini"
DEFAULT_SUFFIX = "-ocr"
DEFAULT_MAX_IMAGES = 64
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_LOCAL_ALIAS = "local"
# What an [ocr.local] model_dir must hold for the rapidocr engine: PP-OCR text detection and
# recognition models and the recogniser's dictionary (one character a line).
RAPIDOCR_MODEL_FILES = ("det.onnx", "rec.onnx", "dict.txt")
DEFAULT_CACHE_FILE = "descriptions.sqlite3"
# The paths below /v1/ that the pass-through relays (globs): the stateless model APIs. Routes that
# keep state in the upstream account (files, batches, fine_tuning, vector_stores, assistants,
# threads, uploads, organization...) are shared by every client of the proxy, so they answer
# 404 unless the operator lists them.
DEFAULT_PASSTHROUGH_ROUTES = (
    "chat/completions",
    "completions",
    "embeddings",
    "moderations",
    "models",
    "models/*",
    "audio/*",
    "images/*",
    "responses",
    "responses/*",
)  # /v1/messages and its count_tokens are routes of their own; messages/batches is account state

DEFAULT_PROMPT = """\
You are the eyes of a language model that cannot see images. Your description will replace this \
image in a conversation, and the model will answer the user's questions from it alone.

1. Transcribe ALL visible text verbatim, in reading order, keeping line breaks, lists and \
headings. Reproduce tables as Markdown tables and code as code blocks. Keep the original \
language; do not translate or correct it. Mark unreadable parts as [illegible].
2. Then describe what the image shows: its kind (photo, screenshot, document, chart, diagram, \
UI, handwriting...), layout, and the important elements: for charts the axes, series, values \
and trend; for UIs the app, screen, controls and their state; for photos the people, objects, \
setting, colours, actions and any notable details.

Be factual and complete; do not guess beyond what is visible and do not add commentary. \
Answer in this format:
TEXT:
<the transcription, or "(no text)">
DESCRIPTION:
<the description>"""


class ConfigError(Exception):
    """The configuration is invalid; the message says which key and why."""


class Server(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    stall_warning_ms: float = 100.0  # warn when the event loop is blocked longer; 0 disables
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any)
    workers: int = 1
    metrics_port: int = 0  # 0: /metrics and /readyz on the main port, direct loopback clients only
    metrics_host: str = DEFAULT_HOST
    # A connection that has not sent complete request headers this long after it opened (or
    # after its previous response) is closed.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0  # a request body (buffered or streamed) not all there by then: 408
    # Request bytes buffered by the whole process at once; past it, new requests get 503.
    # 0: 4 x max_body_bytes.
    max_buffered_bytes: int = 0
    write_timeout_s: float = 300.0  # a client that reads nothing this long is dropped
    passthrough_routes: tuple[str, ...] = DEFAULT_PASSTHROUGH_ROUTES

    @property
    def buffered_bytes_limit(self) -> int:
        return self.max_buffered_bytes or 4 * self.max_body_bytes


class Auth(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    keys: tuple[str, ...] = ()


class Upstream(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    base_url: str
    name: str = "default"
    api_key: str = ""
    models: tuple[str, ...] = ("*",)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0
    # Extra headers sent with every request to this upstream (OpenAI-Organization, ...).
    headers: dict[str, str] = {}
    # The API it speaks: /v1/chat/completions goes to "openai" upstreams, /v1/messages to
    # "anthropic" ones (base_url as vendors document ANTHROPIC_BASE_URL, without /v1).
    api: Literal["openai", "anthropic"] = "openai"
    # How its key is sent: "" (the API's own way: Bearer for openai, x-api-key for anthropic).
    auth: Literal["", "bearer", "x-api-key"] = ""
    # Refuse an OCR request for a model its /v1/models list lacks (404, before any OCR call).
    # Off for an upstream that accepts models it does not list (Azure deployment names).
    check_models: bool = True


class OcrLocal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The built-in engine used when the OCR model is the alias: Tesseract (``ocrproxy.local``)
    or RapidOCR (``ocrproxy.local_rapid``, the ``rapidocr`` extra)."""

    engine: Literal["tesseract", "rapidocr"] = "tesseract"
    # rapidocr: a directory of other PP-OCR ONNX files (MODEL_FILES); empty: the wheel's own.
    model_dir: str = ""
    languages: tuple[str, ...] = ("eng",)
    tessdata_path: str = ""  # empty: $TESSDATA_PREFIX, else Debian's tessdata directory
    threads: int = 0  # 0: one per CPU
    max_side: int = 2500
    timeout_s: float = 20.0
    # Decoded pixels (bytes) all recognitions may hold at once, whatever the thread count.
    max_decoded_bytes: int = 256 * 1024 * 1024


class Ocr(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str = DEFAULT_OCR_MODEL
    local_alias: str = DEFAULT_LOCAL_ALIAS
    suffix: str = DEFAULT_SUFFIX
    # Globs of models that cannot see: their images are described without any suffix.
    text_only_models: tuple[str, ...] = ()
    # Which listed models get an `-ocr` twin in /v1/models: those matching `list_twins` (empty:
    # every chat model, i.e. not an embedding, tts, whisper, dall-e, image, moderation or rerank
    # model), minus those matching `hide_twins` and `text_only_models` (already OCR'd).
    list_twins: tuple[str, ...] = ()
    hide_twins: tuple[str, ...] = ()
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 1500
    max_concurrency: int = 32
    timeout_s: float = 60.0
    on_error: Literal["placeholder", "fail"] = "placeholder"
    retries: int = 2
    retry_backoff_s: float = 0.5
    # A stream whose OCR step outlasts this is committed (200, SSE headers) and kept alive. Past
    # that point an upstream 429 or 5xx is an in-stream error no SDK retries, so only OCR that
    # is really slow commits; 15 s is still far below nginx's default proxy_read_timeout (60 s)
    # and Cloudflare's 100 s.
    keepalive_after_s: float = 15.0
    keepalive_interval_s: float = 5.0
    # "reasoning": a Chat Completions stream whose images must be read is committed at once and
    # told how the reading goes in `delta.reasoning_content` chunks (``progress``). Chat only.
    progress: Literal["off", "reasoning"] = "off"
    fetch_images: bool = True
    allow_private_hosts: tuple[str, ...] = ()
    allowed_ports: tuple[int, ...] = (80, 443)
    fetch_timeout_s: float = 15.0
    max_fetches_per_request: int = 4  # remote images one request downloads at once
    max_images: int = DEFAULT_MAX_IMAGES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    local: OcrLocal = OcrLocal()
    # A request without OCR that the upstream refuses because the model can't take images is
    # described and sent again through OCR (``fallback``); the model is then remembered as
    # text-only for `learned_ttl_s` seconds (0: not remembered).
    fallback_on_rejection: bool = True
    learned_ttl_s: float = 86_400.0


class Cache(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    ttl_s: float = 86_400.0
    backend: Literal["memory", "sqlite", "redis"] = "memory"
    path: str = ""  # sqlite file; default: $STATE_DIRECTORY (systemd) or ".", + DEFAULT_CACHE_FILE
    tier_max_entries: int = 1_000_000
    redis_url: str = ""
    redis_prefix: str = "ocrproxy:"
    redis_timeout_s: float = 0.5
    # "shared": one description per image for every client (a client can tell from cache hits
    # whether anyone sent an image within the TTL). "per_key": keyed by the client's key too.
    scope: Literal["shared", "per_key"] = "shared"


class Ui(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The live page at ``/ui`` (``ocrproxy.ui``): operator port or direct loopback only."""

    enabled: bool = False
    admin_key: str = ""  # what the page asks for; must differ from every client and upstream key
    recent: int = 200  # finished requests kept in memory (per worker process)
    show_descriptions: bool = False  # the text each image became: may hold private text


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: Server = Server()
    auth: Auth = Auth()
    upstreams: tuple[Upstream, ...] = ()
    ocr: Ocr = Ocr()
    cache: Cache = Cache()
    ui: Ui = Ui()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, env: Mapping[str, str], path: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"environment variable {name} is not set (used at `{path}`)")

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, env, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _default_upstreams(env: Mapping[str, str]) -> tuple[Upstream, ...]:
    """The ``openai`` SDK's upstream, and the ``anthropic`` SDK's (Claude Code's) beside it
    when ``ANTHROPIC_BASE_URL`` is set."""
    found = [
        Upstream(
            name="openai",
            base_url=env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            api_key=env.get("OPENAI_API_KEY", ""),
        )
    ]
    if env.get("ANTHROPIC_BASE_URL"):
        token = env.get("ANTHROPIC_AUTH_TOKEN", "")
        found.append(
            Upstream(
                name="anthropic",
                base_url=env["ANTHROPIC_BASE_URL"],
                api_key=env.get("ANTHROPIC_API_KEY") or token,
                api="anthropic",
                auth="bearer" if token and not env.get("ANTHROPIC_API_KEY") else "",
            )
        )
    return tuple(found)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$"
)


def _host_or_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(entry))


def validate(cfg: Config) -> Config:
    """Check what types alone cannot; return the config or raise ConfigError."""
    if not 0 < cfg.server.port < 65536:
        raise ConfigError("`$.server.port` must be between 1 and 65535")
    if cfg.server.max_body_bytes < 1024:
        raise ConfigError("`$.server.max_body_bytes` must be at least 1024")
    for key in ("header_timeout_s", "body_timeout_s", "write_timeout_s", "shutdown_timeout"):
        if getattr(cfg.server, key) <= 0:
            raise ConfigError(f"`$.server.{key}` must be positive")
    if cfg.server.max_buffered_bytes and cfg.server.max_buffered_bytes < cfg.server.max_body_bytes:
        raise ConfigError(
            "`$.server.max_buffered_bytes` must be 0 (4 x max_body_bytes) or at least "
            "`$.server.max_body_bytes`"
        )
    if not cfg.upstreams:
        raise ConfigError("`$.upstreams` must list at least one upstream")
    for i, up in enumerate(cfg.upstreams):
        for key in ("base_url", "api_key", "name"):
            if _CONTROL.search(getattr(up, key)):  # a CRLF env file: every request would fail
                raise ConfigError(f"`$.upstreams[{i}].{key}` contains a control character")
        if not up.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"`$.upstreams[{i}].base_url` must start with http:// or https://")
        if not up.models:
            raise ConfigError(f"`$.upstreams[{i}].models` must not be empty")
        for name, value in up.headers.items():
            if not _TOKEN.match(name) or _CONTROL.search(value):
                raise ConfigError(
                    f"`$.upstreams[{i}].headers` has an invalid header {name!r}: names are "
                    "HTTP tokens and values have no control characters"
                )
    if not cfg.ocr.suffix:
        raise ConfigError("`$.ocr.suffix` must not be empty")
    if not cfg.ocr.model:
        raise ConfigError("`$.ocr.model` must not be empty")
    if cfg.ocr.max_concurrency < 1:
        raise ConfigError("`$.ocr.max_concurrency` must be at least 1")
    if cfg.ocr.retries < 0 or cfg.ocr.retry_backoff_s < 0:
        raise ConfigError("`$.ocr.retries` and `$.ocr.retry_backoff_s` must not be negative")
    for key in ("timeout_s", "keepalive_after_s", "keepalive_interval_s", "fetch_timeout_s"):
        if getattr(cfg.ocr, key) <= 0:
            raise ConfigError(f"`$.ocr.{key}` must be positive")
    for key in ("max_images", "max_image_bytes", "max_image_pixels"):
        if getattr(cfg.ocr, key) < 1:
            raise ConfigError(f"`$.ocr.{key}` must be at least 1")
    if not cfg.ocr.allowed_ports or not all(0 < p < 65536 for p in cfg.ocr.allowed_ports):
        raise ConfigError("`$.ocr.allowed_ports` must list ports between 1 and 65535")
    for i, entry in enumerate(cfg.ocr.allow_private_hosts):
        if not _host_or_network(entry):
            raise ConfigError(
                f"`$.ocr.allow_private_hosts[{i}]` must be a hostname or an IP network "
                f"(CIDR), not {entry!r}"
            )
    if cfg.ocr.learned_ttl_s < 0:
        raise ConfigError("`$.ocr.learned_ttl_s` must not be negative")
    _validate_local(cfg.ocr)
    if cfg.cache.max_entries < 0 or cfg.cache.max_bytes < 0 or cfg.cache.ttl_s <= 0:
        raise ConfigError("`$.cache` limits must be non-negative and ttl_s positive")
    _validate_deploy(cfg)
    if any(_CONTROL.search(k) for k in cfg.auth.keys):
        raise ConfigError("`$.auth.keys` must not contain control characters")
    if any(not k for k in cfg.auth.keys):
        raise ConfigError("`$.auth.keys` must not contain an empty key")
    _validate_ui(cfg)
    spends_money = any(up.api_key for up in cfg.upstreams)
    if spends_money and not cfg.auth.keys and not _is_loopback(cfg.server.host):
        raise ConfigError(
            f"refusing to listen on {cfg.server.host}: an upstream has an api_key but "
            "[auth] keys is empty, so anyone who can reach this address would spend that key. "
            "Set [auth] keys, or listen on 127.0.0.1 behind a proxy that authenticates."
        )
    return cfg


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_LANGUAGE = re.compile(r"^[A-Za-z0-9_]+$")
_ADMIN_KEY = re.compile(r"^[\x21-\x7e]{16,}$")


def _validate_ui(cfg: Config) -> None:
    ui = cfg.ui
    if ui.recent < 1:
        raise ConfigError("`$.ui.recent` must be at least 1")
    if _CONTROL.search(ui.admin_key):
        raise ConfigError("`$.ui.admin_key` must not contain control characters")
    if not ui.enabled:
        return
    if not ui.admin_key:
        raise ConfigError("`$.ui.enabled` needs `$.ui.admin_key`: the key the page asks for")
    if not _ADMIN_KEY.match(ui.admin_key):
        raise ConfigError(
            "`$.ui.admin_key` must be at least 16 printable ASCII characters, no spaces "
            "(a browser can send nothing else in a header; a short key is guessed at loopback "
            "speed)"
        )
    if ui.admin_key in cfg.auth.keys:
        raise ConfigError("`$.ui.admin_key` must differ from every `$.auth.keys` entry")
    for i, up in enumerate(cfg.upstreams):
        if ui.admin_key == up.api_key:
            raise ConfigError(f"`$.ui.admin_key` must differ from `$.upstreams[{i}].api_key`")


def _validate_local(ocr: Ocr) -> None:
    if not ocr.local_alias:
        raise ConfigError("`$.ocr.local_alias` must not be empty")
    local = ocr.local
    if not local.languages:
        raise ConfigError("`$.ocr.local.languages` must name at least one language")
    for i, language in enumerate(local.languages):
        if not _LANGUAGE.match(language):
            raise ConfigError(
                f"`$.ocr.local.languages[{i}]` must be a Tesseract language name such as "
                f"`eng` or `chi_sim`, not {language!r}"
            )
    if local.threads < 0:
        raise ConfigError("`$.ocr.local.threads` must be 0 (one per CPU) or more")
    if local.max_side < 256:
        raise ConfigError("`$.ocr.local.max_side` must be at least 256")
    if local.timeout_s <= 0:
        raise ConfigError("`$.ocr.local.timeout_s` must be positive")
    if local.max_decoded_bytes < 16 * 1024 * 1024:
        raise ConfigError("`$.ocr.local.max_decoded_bytes` must be at least 16 MiB (16777216)")
    if local.model_dir:
        if local.engine != "rapidocr":
            raise ConfigError('`$.ocr.local.model_dir` is for engine = "rapidocr" only')
        for name in RAPIDOCR_MODEL_FILES:
            if not os.path.isfile(os.path.join(local.model_dir, name)):
                raise ConfigError(
                    f"`$.ocr.local.model_dir`: {os.path.join(local.model_dir, name)} is missing "
                    f"(it must hold {', '.join(RAPIDOCR_MODEL_FILES)})"
                )
    if ocr.max_fetches_per_request < 1:
        raise ConfigError("`$.ocr.max_fetches_per_request` must be at least 1")


def _validate_deploy(cfg: Config) -> None:
    server, cache = cfg.server, cfg.cache
    if server.workers < 1:
        raise ConfigError("`$.server.workers` must be at least 1")
    if not 0 <= server.metrics_port < 65536:
        raise ConfigError("`$.server.metrics_port` must be between 0 (off) and 65535")
    if server.metrics_port and server.metrics_port == server.port:
        raise ConfigError("`$.server.metrics_port` must differ from `$.server.port`")
    if cache.backend == "sqlite" and not cache.path:
        raise ConfigError("`$.cache.path` must name the sqlite file")
    if cache.tier_max_entries < 1:
        raise ConfigError("`$.cache.tier_max_entries` must be at least 1")
    if cache.backend == "redis" and not cache.redis_url.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        raise ConfigError(
            "`$.cache.redis_url` must be a redis://, rediss:// or unix:// URL "
            'when `$.cache.backend` is "redis"'
        )
    if cache.backend == "redis" and importlib.util.find_spec("redis") is None:
        raise ConfigError(
            '`$.cache.backend` "redis" needs the redis package: pip install "ocrproxy[redis]"'
        )
    if cache.redis_timeout_s <= 0:
        raise ConfigError("`$.cache.redis_timeout_s` must be positive")


def _default_cache_path(env: Mapping[str, str]) -> str:
    # systemd's StateDirectory= sets STATE_DIRECTORY (colon-separated if several).
    state = env.get("STATE_DIRECTORY", "").split(":")[0] or "."
    return os.path.join(state, DEFAULT_CACHE_FILE)


def from_mapping(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build a validated Config from parsed TOML (or any mapping)."""
    env = os.environ if env is None else env
    expanded = _expand(dict(raw), env, "$")
    try:
        cfg = msgspec.convert(expanded, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
    if not cfg.upstreams:
        cfg = msgspec.structs.replace(cfg, upstreams=_default_upstreams(env))
    if cfg.cache.backend == "sqlite" and not cfg.cache.path:
        cache = msgspec.structs.replace(cfg.cache, path=_default_cache_path(env))
        cfg = msgspec.structs.replace(cfg, cache=cache)
    return validate(cfg)


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
) -> Config:
    """Load the config file (or none), apply command-line overrides, validate."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
        try:
            raw = msgspec.toml.decode(text)
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    overrides = {"host": host, "port": port, "workers": workers}
    if any(v is not None for v in overrides.values()):
        server = dict(raw.get("server", {}))
        server.update({k: v for k, v in overrides.items() if v is not None})
        raw["server"] = server
    return from_mapping(raw, env)


_CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization"})


def secrets(cfg: Config, *, admin: bool = True) -> tuple[str, ...]:
    """Every configured credential: none may reach a client or a log line. ``admin=False``
    leaves out ``[ui] admin_key``: the proxy itself never sends it anywhere, so only the page's
    own answers could hold it (they are masked with it; anyone else who sends it, as a key in
    relay mode say, already has it), and relayed traffic is not searched for it (a secret more
    costs every relayed header block and body piece a search)."""
    found = cfg.auth.keys + tuple(up.api_key for up in cfg.upstreams if up.api_key)
    found += tuple(  # an upstream's `headers` may carry its credentials (Azure's api-key)
        value
        for up in cfg.upstreams
        for name, value in up.headers.items()
        if name.lower() in _CREDENTIAL_HEADERS and value
    )
    found += (cfg.ui.admin_key,) if admin and cfg.ui.admin_key else ()
    return found + _url_passwords(cfg.cache.redis_url)


def _url_passwords(url: str) -> tuple[str, ...]:
    """The password of a ``redis://user:password@host/?password=...`` URL, as written and as
    decoded (Redis is given the decoded one)."""
    if not url:
        return ()
    parts = urllib.parse.urlsplit(url)
    found = []
    if parts.password:
        found.append(parts.password)
    found += urllib.parse.parse_qs(parts.query).get("password", [])
    return tuple({v for p in found if p for v in (p, urllib.parse.unquote(p))})


def _mask(secret: str) -> str:
    if not secret:
        return ""
    return secret[:3] + "…" + ("*" * 4) if len(secret) > 8 else "****"


def _mask_url(url: str) -> str:
    """``url`` with its credentials hidden: the user info (``user:password@`` keeps the user,
    a bare ``token@`` goes whole), every query value (``?token=...``) and any fragment.

    The user info ends at the last ``@`` before the query, even past a ``/``: a password with
    an unescaped ``/`` is hidden too (an ``@`` in the path is masked with it, harmlessly).
    """
    scheme, sep, rest = url.partition("://")
    rest, hashed, fragment = rest.partition("#")
    rest, asked, query = rest.partition("?")
    userinfo, at, rest = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:****@{rest}" if colon and "/" not in user else f"****@{rest}"
    if query:
        query = "&".join(
            f"{name}=****" if eq else name
            for name, eq, _ in (item.partition("=") for item in query.split("&"))
        )
    fragment = "****" if fragment else ""
    return f"{scheme}{sep}{rest}{asked}{query}{hashed}{fragment}"


def masked(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data, every secret masked, for printing."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    data["auth"]["keys"] = [_mask(k) for k in cfg.auth.keys]
    for up in data["upstreams"]:
        up["api_key"] = _mask(up["api_key"])
        up["base_url"] = _mask_url(up["base_url"])
        up["headers"] = {name: _mask(value) for name, value in up["headers"].items()}
    data["cache"]["redis_url"] = _mask_url(cfg.cache.redis_url)
    data["ui"]["admin_key"] = _mask(cfg.ui.admin_key)
    return data

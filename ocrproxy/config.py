"""Settings: frozen msgspec structs, loaded once at start-up from TOML plus the environment.

Rules:
- Every section and key has a default here, so an empty file (or no file) is a valid config.
- An unknown or ill-typed key is an error naming its path (``$.ocr.timeout_s``).
- ``${VAR}`` inside any string is replaced from the environment before validation; an unset
  variable is an error rather than a silent empty string, except ``${VAR:-default}``.
- With no file, one upstream is built from the ``openai`` SDK's conventions
  (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``).
"""

from __future__ import annotations

import ipaddress
import os
import re
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
DEFAULT_LOCAL_ALIAS = "local"

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


class Auth(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    keys: tuple[str, ...] = ()


class Upstream(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    base_url: str
    name: str = "default"
    api_key: str = ""
    models: tuple[str, ...] = ("*",)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0


class OcrLocal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The built-in Tesseract engine (``ocrproxy.local``), used when the OCR model is the alias."""

    languages: tuple[str, ...] = ("eng",)
    tessdata_path: str = ""  # empty: $TESSDATA_PREFIX, else Debian's tessdata directory
    threads: int = 0  # 0: one per CPU
    max_side: int = 2500
    timeout_s: float = 20.0


class Ocr(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str = DEFAULT_OCR_MODEL
    local_alias: str = DEFAULT_LOCAL_ALIAS
    suffix: str = DEFAULT_SUFFIX
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 1500
    max_concurrency: int = 32
    timeout_s: float = 60.0
    on_error: Literal["placeholder", "fail"] = "placeholder"
    retries: int = 2
    retry_backoff_s: float = 0.5
    keepalive_after_s: float = 3.0
    keepalive_interval_s: float = 5.0
    local: OcrLocal = OcrLocal()


class Cache(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    ttl_s: float = 86_400.0


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: Server = Server()
    auth: Auth = Auth()
    upstreams: tuple[Upstream, ...] = ()
    ocr: Ocr = Ocr()
    cache: Cache = Cache()


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


def _default_upstream(env: Mapping[str, str]) -> Upstream:
    return Upstream(
        name="openai",
        base_url=env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
        api_key=env.get("OPENAI_API_KEY", ""),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(cfg: Config) -> Config:
    """Check what types alone cannot; return the config or raise ConfigError."""
    if not 0 < cfg.server.port < 65536:
        raise ConfigError("`$.server.port` must be between 1 and 65535")
    if cfg.server.max_body_bytes < 1024:
        raise ConfigError("`$.server.max_body_bytes` must be at least 1024")
    if not cfg.upstreams:
        raise ConfigError("`$.upstreams` must list at least one upstream")
    for i, up in enumerate(cfg.upstreams):
        if not up.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"`$.upstreams[{i}].base_url` must start with http:// or https://")
        if not up.models:
            raise ConfigError(f"`$.upstreams[{i}].models` must not be empty")
    if not cfg.ocr.suffix:
        raise ConfigError("`$.ocr.suffix` must not be empty")
    if not cfg.ocr.model:
        raise ConfigError("`$.ocr.model` must not be empty")
    if cfg.ocr.max_concurrency < 1:
        raise ConfigError("`$.ocr.max_concurrency` must be at least 1")
    if cfg.ocr.retries < 0 or cfg.ocr.retry_backoff_s < 0:
        raise ConfigError("`$.ocr.retries` and `$.ocr.retry_backoff_s` must not be negative")
    for key in ("timeout_s", "keepalive_after_s", "keepalive_interval_s"):
        if getattr(cfg.ocr, key) <= 0:
            raise ConfigError(f"`$.ocr.{key}` must be positive")
    _validate_local(cfg.ocr)
    if cfg.cache.max_entries < 0 or cfg.cache.max_bytes < 0 or cfg.cache.ttl_s <= 0:
        raise ConfigError("`$.cache` limits must be non-negative and ttl_s positive")
    if any(not k for k in cfg.auth.keys):
        raise ConfigError("`$.auth.keys` must not contain an empty key")
    spends_money = any(up.api_key for up in cfg.upstreams)
    if spends_money and not cfg.auth.keys and not _is_loopback(cfg.server.host):
        raise ConfigError(
            f"refusing to listen on {cfg.server.host}: an upstream has an api_key but "
            "[auth] keys is empty, so anyone who can reach this address would spend that key. "
            "Set [auth] keys, or listen on 127.0.0.1 behind a proxy that authenticates."
        )
    return cfg


_LANGUAGE = re.compile(r"^[A-Za-z0-9_]+$")


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


def from_mapping(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build a validated Config from parsed TOML (or any mapping)."""
    env = os.environ if env is None else env
    expanded = _expand(dict(raw), env, "$")
    try:
        cfg = msgspec.convert(expanded, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
    if not cfg.upstreams:
        cfg = msgspec.structs.replace(cfg, upstreams=(_default_upstream(env),))
    return validate(cfg)


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    host: str | None = None,
    port: int | None = None,
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
    if host is not None or port is not None:
        server = dict(raw.get("server", {}))
        if host is not None:
            server["host"] = host
        if port is not None:
            server["port"] = port
        raw["server"] = server
    return from_mapping(raw, env)


def _mask(secret: str) -> str:
    if not secret:
        return ""
    return secret[:3] + "…" + ("*" * 4) if len(secret) > 8 else "****"


def masked(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data, every secret masked, for printing."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    data["auth"]["keys"] = [_mask(k) for k in cfg.auth.keys]
    for up in data["upstreams"]:
        up["api_key"] = _mask(up["api_key"])
    return data

"""Command line: ``ocrproxy serve`` and ``ocrproxy check-config``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import orjson
from aiohttp import web

from . import __version__, config, logs
from .app import create_app

log = logging.getLogger("ocrproxy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ocrproxy",
        description="OpenAI-compatible proxy that gives every model image recognition",
    )
    parser.add_argument("--version", action="version", version=f"ocrproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "TOML config file (default: $OCRPROXY_CONFIG, else built-in defaults)"
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default=os.environ.get("OCRPROXY_CONFIG"), help=config_help)
    serve.add_argument("--host", help="listen address (overrides [server] host)")
    serve.add_argument("--port", type=int, help="listen port (overrides [server] port)")
    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", default=os.environ.get("OCRPROXY_CONFIG"), help=config_help)
    return parser


def _event_loop_policy() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def serve(cfg: config.Config) -> None:
    """Run the proxy until SIGINT/SIGTERM, then drain for ``shutdown_timeout`` seconds."""
    logs.setup(cfg.server.log_level)
    loop_kind = _event_loop_policy()
    log.info(
        "ocrproxy %s listening on http://%s:%d (%s, %d upstream(s), OCR model %s)",
        __version__,
        cfg.server.host,
        cfg.server.port,
        loop_kind,
        len(cfg.upstreams),
        cfg.ocr.model,
    )
    web.run_app(
        create_app(cfg),
        host=cfg.server.host,
        port=cfg.server.port,
        shutdown_timeout=cfg.server.shutdown_timeout,
        handler_cancellation=True,
        access_log=None,
        print=None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            cfg = config.load(args.config)
            sys.stdout.write(
                orjson.dumps(config.masked(cfg), option=orjson.OPT_INDENT_2).decode() + "\n"
            )
            return 0
        cfg = config.load(args.config, host=args.host, port=args.port)
    except config.ConfigError as exc:
        sys.stderr.write(f"ocrproxy: invalid configuration: {exc}\n")
        return 2
    serve(cfg)
    return 0

"""Command line: ``ocrproxy serve`` and ``ocrproxy check-config``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import orjson

from . import __version__, config, server


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
    serve.add_argument(
        "--workers", type=int, help="worker processes on one port (overrides [server] workers)"
    )
    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", default=os.environ.get("OCRPROXY_CONFIG"), help=config_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            cfg = config.load(args.config)
            sys.stdout.write(
                orjson.dumps(config.masked(cfg), option=orjson.OPT_INDENT_2).decode() + "\n"
            )
            return 0
        cfg = config.load(args.config, host=args.host, port=args.port, workers=args.workers)
    except config.ConfigError as exc:
        sys.stderr.write(f"ocrproxy: invalid configuration: {exc}\n")
        return 2
    server.serve(cfg)
    return 0

"""Command line: ``ocrproxy serve``, ``ocrproxy check-config`` and ``ocrproxy describe``."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import mimetypes
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import orjson

from . import __version__, config, images, local, logs, pipeline, server, upstream
from .cache import DescriptionCache, MemoryLRU
from .describe import Describer
from .errors import ProxyError
from .fetch import Fetcher
from .ocr_remote import RemoteReader
from .rewrite import placeholder_block, reference_block

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
    serve.add_argument(
        "--workers", type=int, help="worker processes on one port (overrides [server] workers)"
    )
    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", default=os.environ.get("OCRPROXY_CONFIG"), help=config_help)
    describe = sub.add_parser(
        "describe", help="print the text the proxy would put in place of one image"
    )
    describe.add_argument("image", metavar="IMAGE_PATH_OR_URL", help="an image file or URL")
    describe.add_argument(
        "--model", help="OCR model, e.g. local or gpt-4o-mini (default: [ocr] model)"
    )
    describe.add_argument("--config", default=os.environ.get("OCRPROXY_CONFIG"), help=config_help)
    return parser


def _image_url(source: str) -> str:
    """An http(s) URL as it is; a file as the base64 data URL a client would send."""
    if source.startswith(("http://", "https://", "data:")):
        return source
    data = Path(source).read_bytes()
    media_type = mimetypes.guess_type(source)[0] or ""
    if not media_type.startswith("image/"):
        media_type = "application/octet-stream"
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


async def describe(cfg: config.Config, source: str, model: str) -> int:
    """Describe one image as the proxy would and print its reference block; 0 if it worked."""
    try:
        url = _image_url(source)
    except OSError as exc:
        sys.stderr.write(f"ocrproxy: cannot read {source}: {exc.strerror}\n")
        return 2
    try:
        if url.startswith("data:"):
            image = images.from_data_url("the image", url.encode(), safe=False)
        else:
            image = images.Image("the image", url=url, is_data=False)
    except ProxyError as exc:
        sys.stderr.write(f"ocrproxy: {exc.message}\n")
        return 1
    cache = DescriptionCache(MemoryLRU(1, cfg.cache.max_bytes, cfg.cache.ttl_s))
    engine = local.open_engine(cfg.ocr.local, then=local.RUN_AGAIN)  # no proxy to restart here
    async with aiohttp.ClientSession(trust_env=False) as session:
        router = upstream.Router(cfg.upstreams)
        reader = RemoteReader(session, cfg.ocr, config.secrets(cfg))
        describer = Describer(reader, router, cfg.ocr, cache, engine)
        fetcher = Fetcher(cfg.ocr) if cfg.ocr.fetch_images else None
        try:
            describer.check_model(model)
            await images.identify([image], cfg.ocr)
            report = await pipeline.describe([image], model, {}, describer, cfg, fetcher)
        except ProxyError as exc:
            sys.stderr.write(f"ocrproxy: {exc.message}\n")
            return 1
        finally:
            await cache.close()
            engine.close()
            if fetcher is not None:
                await fetcher.close()
    outcome = report.outcomes[image.digest]
    if outcome.description is None:
        sys.stderr.write(f"ocrproxy: the image could not be analysed: {outcome.error}\n")
        sys.stdout.write(placeholder_block(1, reason=outcome.reason) + "\n")
        return 1
    sys.stdout.write(reference_block(1, model, outcome.description.text) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            cfg = config.load(args.config)
            sys.stdout.write(
                orjson.dumps(config.masked(cfg), option=orjson.OPT_INDENT_2).decode() + "\n"
            )
            return 0
        if args.command == "describe":
            cfg = config.load(args.config)
            logs.setup("error")
            return asyncio.run(describe(cfg, args.image, args.model or cfg.ocr.model))
        cfg = config.load(args.config, host=args.host, port=args.port, workers=args.workers)
    except config.ConfigError as exc:
        sys.stderr.write(f"ocrproxy: invalid configuration: {exc}\n")
        return 2
    server.serve(
        cfg,
        reload=lambda: config.load(
            args.config, host=args.host, port=args.port, workers=args.workers
        ),
    )
    return 0

"""The bare relay: the ceiling for any aiohttp proxy on this machine.

It forwards every request to the upstream and streams the answer back, with no parsing and no
features (no routing, no header hygiene beyond hop-by-hop, no logging). Same stack as ocrproxy:
aiohttp server and client, one pooled session, uvloop when installed; and the same transport
habit: a small answer with a Content-Length goes back in one write, anything else is streamed
piece by piece as it arrives.

Run: ``python -m bench.relay --port 9003 --upstream http://127.0.0.1:9001``.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .fake import install_uvloop

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
SMALL = 256 * 1024
DROP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
    url = request.app[UPSTREAM] + request.rel_url.raw_path_qs
    async with request.app[SESSION].request(
        request.method, url, headers=headers, data=body
    ) as source:
        length = source.content_length
        if length is not None and length <= SMALL:  # one write, as any tuned relay does
            payload = await source.read()
            return web.Response(status=source.status, body=payload, headers=_ctype(source))
        response = web.StreamResponse(status=source.status, headers=_ctype(source))
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        async for piece in source.content.iter_any():
            await response.write(piece)
        await response.write_eof()
        return response


def _ctype(source: aiohttp.ClientResponse) -> dict[str, str]:
    return {"Content-Type": source.headers.get("Content-Type", "application/octet-stream")}


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
    )
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    install_uvloop()
    app = web.Application(client_max_size=200 * 1024 * 1024)
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,  # as ocrproxy: a client that leaves cancels its relay
        shutdown_timeout=1,
    )


if __name__ == "__main__":
    main()

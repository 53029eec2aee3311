"""Idle and slow connections against a real `ocrproxy serve`: the proxy's fds before, during and
after its header timeout.

Opens ``--per-kind`` connections of each kind: silent (send nothing), dripping (the start of a
request's headers, then one header byte every ``--drip-s`` seconds, never the end) and idle (one
complete ``GET /healthz``, then nothing, as a keep-alive client). Counts the proxy's open file
descriptors (``/proc/PID/fd``) before, once all are open, and 1 and 2 s after the header timeout.

    .venv/bin/python -m bench.slowloris                      # 3 x 300, header_timeout_s = 2
    .venv/bin/python -m bench.slowloris --per-kind 100 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _drip(writer: asyncio.StreamWriter, every: float) -> None:
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: ")
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            await asyncio.sleep(every)
            writer.write(b"a")
            await writer.drain()


async def _idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")


async def _closed(reader: asyncio.StreamReader) -> float:
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    return time.monotonic() - started


async def measure(port: int, pid: int, per_kind: int, timeout: float, drip_s: float) -> dict:
    figures: dict = {"per_kind": per_kind, "header_timeout_s": timeout, "before": _fds(pid)}
    conns = []
    for _ in range(3 * per_kind):
        conns.append(await asyncio.open_connection("127.0.0.1", port))
    silent, dripping, idle = (conns[i * per_kind : (i + 1) * per_kind] for i in range(3))
    drips = [asyncio.ensure_future(_drip(w, drip_s)) for _, w in dripping]
    await asyncio.gather(*(_idle(r, w) for r, w in idle))
    opened = time.monotonic()
    figures["during"] = _fds(pid)
    closing = [asyncio.ensure_future(_closed(r)) for r, _ in conns]
    for after in (1, 2):
        await asyncio.sleep(max(0.0, opened + timeout + after - time.monotonic()))
        figures[f"timeout_plus_{after}s"] = _fds(pid)
    done, pending = await asyncio.wait(closing, timeout=10)
    figures["closed_by_server"] = len(done)
    figures["still_open_after_10s_more"] = len(pending)
    waits = sorted(t.result() for t in done)
    if waits:
        figures["closed_after_s"] = {"min": round(waits[0], 2), "max": round(waits[-1], 2)}
    for task in drips + list(pending):
        task.cancel()
    await asyncio.gather(*drips, *pending, return_exceptions=True)
    for _, writer in conns:
        writer.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=300)
    parser.add_argument("--header-timeout", type=float, default=2.0)
    parser.add_argument("--drip-s", type=float, default=0.5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * args.per_kind + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "ocrproxy.toml"
        config.write_text(
            f'[server]\nport = {port}\nlog_level = "warning"\n'
            f"header_timeout_s = {args.header_timeout}\n"
            '[[upstreams]]\nbase_url = "http://127.0.0.1:9/v1"\n'
        )
        proxy = subprocess.Popen(
            [sys.executable, "-m", "ocrproxy", "serve", "--config", str(config)],
            stderr=open(Path(tmp) / "ocrproxy.log", "wb"),  # noqa: SIM115
        )
        try:
            for _ in range(300):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                time.sleep(0.05)
            figures = asyncio.run(
                measure(port, proxy.pid, args.per_kind, args.header_timeout, args.drip_s)
            )
        finally:
            proxy.terminate()
            proxy.wait(10)
    if args.json:
        print(orjson.dumps(figures).decode())
        return
    print(
        f"{3 * figures['per_kind']} connections ({figures['per_kind']} silent, dripping, idle), "
        f"header_timeout_s = {figures['header_timeout_s']:g}: proxy fds {figures['before']} "
        f"before, {figures['during']} with all open, {figures['timeout_plus_1s']} at timeout + "
        f"1 s, {figures['timeout_plus_2s']} at timeout + 2 s; closed by the proxy "
        f"{figures['closed_by_server']}, still open {figures['still_open_after_10s_more']}"
        + (
            f" (closed {figures['closed_after_s']['min']}-{figures['closed_after_s']['max']} s "
            "after all were open)"
            if "closed_after_s" in figures
            else ""
        )
    )


if __name__ == "__main__":
    main()

"""Run ``ocrproxy serve`` with an event-loop stall monitor, for scenario 4 only.

The proxy starts exactly as ``python -m ocrproxy serve --config FILE`` would, but its application
gets one extra background task: it sleeps 1 ms at a time and records how late each wake-up is.
A callback that blocks the loop for S ms makes one wake-up about S ms late, so the worst lateness
is the longest stall (within 1 ms). On a shared machine a wake-up is also late when the kernel
gives the CPU to another program, so each lateness is also capped by the CPU time the proxy
process used meanwhile (its own threads included, as they compete for the GIL): that "CPU-bound"
figure is the stall the proxy caused itself. On SIGUSR1 both worsts since the last signal are
written to the file named by ``$BENCH_LOOPWATCH`` ("wall cpu", in ms) and reset. The other
scenarios use the plain proxy: the monitor's thousand wake-ups a second would cost them.

Run: ``BENCH_LOOPWATCH=/tmp/x python -m bench.loopwatch serve --config FILE``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from ocrproxy import app as proxy_app
from ocrproxy import cli
from ocrproxy.config import Config

_create_app = proxy_app.create_app


async def _watch(path: Path, app: web.Application) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    worst = worst_cpu = 0.0

    def report() -> None:
        nonlocal worst, worst_cpu
        path.write_text(f"{worst * 1000:.3f} {worst_cpu * 1000:.3f}\n")
        worst = worst_cpu = 0.0

    async def tick() -> None:
        nonlocal worst, worst_cpu
        while True:
            due = time.perf_counter() + 0.001
            cpu = time.process_time()
            await asyncio.sleep(0.001)
            late = time.perf_counter() - due
            worst = max(worst, late)
            worst_cpu = max(worst_cpu, min(late, time.process_time() - cpu))

    loop.add_signal_handler(signal.SIGUSR1, report)
    task = loop.create_task(tick())
    yield
    task.cancel()
    loop.remove_signal_handler(signal.SIGUSR1)


def create_app(cfg: Config) -> web.Application:
    app = _create_app(cfg)
    path = Path(os.environ["BENCH_LOOPWATCH"])
    app.cleanup_ctx.append(lambda a: _watch(path, a))
    return app


def main() -> int:
    proxy_app.create_app = create_app  # the server looks it up when it starts
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""Run the app: listening sockets, readiness for systemd, several workers, graceful drain.

Theory of operation: with one worker, this process listens and serves. With ``workers = N`` it
becomes a small supervisor: it starts N worker processes (spawned, so each has a fresh
interpreter) that all bind the same port with ``SO_REUSEPORT``, and the kernel spreads new
connections across them. Workers share the sqlite/redis cache tier; their metrics go to files in
a directory the supervisor creates (``PROMETHEUS_MULTIPROC_DIR``) so any worker can answer a
scrape for all. A worker that dies is replaced. ``READY=1`` goes to systemd (``sd_notify``,
Type=notify) only once every worker listens. On SIGTERM or SIGINT every worker stops accepting,
drains its requests for ``shutdown_timeout`` seconds and exits; the supervisor waits for them.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import __version__, config, logs
from .metrics import MULTIPROC_ENV

log = logging.getLogger("ocrproxy")

PR_SET_PDEATHSIG = 1
# Workers that die more often than this are not a hiccup: the supervisor exits (non-zero) and
# leaves the decision to systemd's Restart= and its start limit.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class CannotListen(Exception):
    """Binding a listening socket failed (the port is taken, the address is not ours...)."""


def sd_notify(state: str) -> bool:
    """Tell systemd about our state (``READY=1``, ``STOPPING=1``); False when not under it."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)
        return False
    return True


def _event_loop_policy() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _serve(
    cfg: config.Config,
    reuse_port: bool,
    ready: Callable[[], object],
    stopping: Callable[[], object],
) -> None:
    from .app import create_app
    from .metrics import create_metrics_app

    server = cfg.server
    app = create_app(cfg)
    runners = [
        web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=server.shutdown_timeout,
            handler_cancellation=True,
        )
    ]
    addresses = [(server.host, server.port)]
    if server.metrics_port:
        runners.append(web.AppRunner(create_metrics_app(app), access_log=None, shutdown_timeout=1))
        addresses.append((server.metrics_host, server.metrics_port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        for runner, (host, port) in zip(runners, addresses, strict=True):
            await runner.setup()
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=1024)
            try:
                await site.start()
            except OSError as exc:
                raise CannotListen(str(exc)) from None
        ready()
        await stop.wait()
        stopping()
        log.info("shutting down: draining requests for up to %g s", server.shutdown_timeout)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _run_worker(
    cfg: config.Config,
    reuse_port: bool,
    ready: Callable[[], object],
    stopping: Callable[[], object] = lambda: None,
) -> None:
    logs.setup(cfg.server.log_level)
    _event_loop_policy()
    # How long a worker thread (large scans and hashes, the local OCR engine, SQLite) may keep
    # the GIL while the event loop waits for it (Python's default: 5 ms).
    sys.setswitchinterval(0.001)
    try:
        asyncio.run(_serve(cfg, reuse_port, ready, stopping))
    except CannotListen as exc:
        log.error("cannot listen: %s", exc)
        raise SystemExit(1) from None
    except OSError as exc:  # the cache directory, a file the config names...
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None
    # Drained and about to exit: a repeated SIGTERM must not turn a clean exit into a kill.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _die_with_parent(parent: int) -> None:
    """Have Linux send SIGTERM (a drain) to this worker if the supervisor dies first."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(cfg: config.Config, ready: Any, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; SIGTERM drains
    _die_with_parent(parent)
    _run_worker(cfg, True, lambda: ready.put(os.getpid()))


def serve(cfg: config.Config) -> None:
    """Run until SIGTERM/SIGINT, with ``cfg.server.workers`` processes."""
    logs.setup(cfg.server.log_level)
    log.info(
        "ocrproxy %s starting on http://%s:%d (%s, %d worker(s), %d upstream(s), OCR model %s)",
        __version__,
        cfg.server.host,
        cfg.server.port,
        _event_loop_policy(),
        cfg.server.workers,
        len(cfg.upstreams),
        cfg.ocr.model,
    )
    if cfg.server.workers == 1:
        _run_worker(cfg, False, lambda: sd_notify("READY=1"), lambda: sd_notify("STOPPING=1"))
        return
    Supervisor(cfg).run()


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.ctx = multiprocessing.get_context("spawn")
        self.ready: Any = self.ctx.Queue()
        self.workers: list[Any] = []
        self.stopping = False
        self.metrics_dir = ""
        self.own_metrics_dir = False

    def _prepare_metrics_dir(self) -> None:
        given = os.environ.get(MULTIPROC_ENV)
        if given:
            os.makedirs(given, exist_ok=True)
            for name in os.listdir(given):
                if name.endswith(".db"):
                    os.unlink(os.path.join(given, name))  # stale samples of a previous run
            self.metrics_dir = given
        else:
            base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
            self.metrics_dir = tempfile.mkdtemp(prefix="ocrproxy-metrics-", dir=base)
            self.own_metrics_dir = True
            os.environ[MULTIPROC_ENV] = self.metrics_dir

    def _start(self) -> Any:
        proc = self.ctx.Process(
            target=_worker_main,
            args=(self.cfg, self.ready, os.getpid()),
            name="ocrproxy-worker",
            daemon=False,
        )
        proc.start()
        return proc

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> None:
        self._prepare_metrics_dir()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self.workers = [self._start() for _ in range(self.cfg.server.workers)]
            self._wait_ready()
            self._watch()
        finally:
            self._stop_all()
            if self.own_metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _wait_ready(self) -> None:
        pending = {p.pid for p in self.workers}
        while pending and not self.stopping:
            try:
                pending.discard(self.ready.get(timeout=0.2))
            except queue.Empty:
                pass
            if any(p.exitcode is not None for p in self.workers):
                raise SystemExit("ocrproxy: a worker failed to start (see its log above)")
        if not self.stopping:
            sd_notify("READY=1")
            log.info("all %d workers are listening", len(self.workers))

    def _watch(self) -> None:
        from prometheus_client import multiprocess

        last_restart = 0.0
        restarts: list[float] = []
        while not self.stopping:
            multiprocessing.connection.wait([p.sentinel for p in self.workers], timeout=0.5)
            for i, proc in enumerate(self.workers):
                if proc.exitcode is None or self.stopping:
                    continue
                log.error("worker %d exited with %s; starting another", proc.pid, proc.exitcode)
                multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                now = time.monotonic()
                restarts = [t for t in restarts if t > now - RESTART_WINDOW_S] + [now]
                if len(restarts) > MAX_RESTARTS:
                    raise SystemExit(
                        f"ocrproxy: workers died {len(restarts)} times in "
                        f"{RESTART_WINDOW_S:g} s; giving up"
                    )
                time.sleep(max(0.0, last_restart + 1.0 - time.monotonic()))
                last_restart = time.monotonic()
                self.workers[i] = self._start()

    def _stop_all(self) -> None:
        sd_notify("STOPPING=1")
        for proc in self.workers:
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.server.shutdown_timeout + 5
        for proc in self.workers:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.warning("worker %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()
        log.info("all workers stopped")

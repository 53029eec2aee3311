"""Run the app in this process: listening sockets, readiness for systemd, drain and reload.

Theory of operation: with one worker, this process listens and serves. With ``workers = N``,
``serve`` hands over to the ``supervisor``, whose worker processes each run ``run_worker`` on
the shared port (``SO_REUSEPORT``). ``READY=1`` goes to systemd (``sd_notify``, Type=notify)
once the app listens.

A connection must deliver complete request headers within ``header_timeout_s`` of opening, and
of its previous response, or it is closed (aiohttp's keep-alive timer: one per connection).

On SIGTERM or SIGINT the app stops accepting and drains (``Generation.drain``): requests
in flight have ``shutdown_timeout`` seconds; then each SSE stream still open ends with a
``server_shutting_down`` error event and the end of its chunked body, the other requests are
cut, and the process exits, within ``shutdown_timeout`` + 2 s in all.

On SIGHUP the config file is read again. If it is valid, a new generation (a new app on the
same listening sockets: this process owns them and gives each generation a duplicate) takes
over and the old one drains as above. If it is not, one log line says why and nothing changes.
A worker of the supervisor ignores SIGHUP: the supervisor reloads by replacing its workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from aiohttp import web

from . import __version__, config, logs

log = logging.getLogger("ocrproxy")

BACKLOG = 1024


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


def _listen(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Bind the listening sockets of ``host:port`` (one per address it resolves to).

    They are this process's for its whole life: every generation of the app serves a duplicate
    of them, so a reload never closes the listening socket and never drops a waiting connection.
    """
    socks: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        reason = (exc.strerror or str(exc)).lower()  # "address already in use"
        raise CannotListen(f"{host}:{port}: {reason}") from None
    return socks


def _share(old: web.Application, new: web.Application) -> Callable[[], None]:
    """Make ``new`` use what stays with the process across a reload: the metrics (counters
    must not restart from zero), the budget of buffered request bytes and that of the local
    engine's pixels (they are the process's), the live page's ring and totals. The new
    limits are not applied yet: the function returned applies them, once the new generation
    has started (a reload that fails keeps the running limits)."""
    from . import body, metrics
    from .app import LOCAL_BUDGET
    from .timeline import RECORDER

    shared, models = old[metrics.METRICS], new[metrics.METRICS].models
    new[metrics.METRICS] = shared
    budget, limits = old[body.BUDGET], new[body.BUDGET]
    new[body.BUDGET] = budget
    pixels, pixel_limit = old[LOCAL_BUDGET], new[LOCAL_BUDGET].limit
    new[LOCAL_BUDGET] = pixels
    if RECORDER in old and RECORDER in new:  # the live page keeps what it saw
        new[RECORDER].adopt(old[RECORDER])

    def apply() -> None:
        pixels.resize(pixel_limit)
        shared.models = models
        budget.limit, budget.max_body = limits.limit, limits.max_body
        budget.timeout_s = limits.timeout_s

    return apply


class Generation:
    """One config's app (and its metrics app), serving duplicates of the listening sockets.

    ``drain`` is the whole shutdown of a generation, and the only one: sites stop (no new
    connections), idle keep-alive connections close, requests in flight have ``shutdown_timeout``
    to finish. Then each SSE stream still open gets the ``server_shutting_down`` error event and
    the end of its chunked body, every other request is cut, and the app's cleanup runs.
    aiohttp's own shutdown would wait ``shutdown_timeout`` twice and cut streams mid-body.
    """

    def __init__(self, cfg: config.Config, previous: Generation | None = None) -> None:
        from .app import create_app
        from .metrics import create_metrics_app

        self.cfg = cfg
        server = cfg.server
        self.app = create_app(cfg)
        self._apply: Callable[[], None] | None = None
        if previous is not None:
            self._apply = _share(previous.app, self.app)
        # aiohttp's keep-alive timer is the header timeout: it is armed when a connection opens
        # and again after each response, and closes the connection if no complete request
        # headers have arrived by then (however slowly bytes drip in). One timer per
        # connection; a request being served is never cut by it.
        common: dict[str, Any] = {
            "access_log": None,
            "handler_cancellation": True,
            "keepalive_timeout": server.header_timeout_s,
            "shutdown_timeout": 1.0,  # what is left after drain(): nothing, normally
        }
        self.runners = [web.AppRunner(self.app, **common)]
        if server.metrics_port:
            self.runners.append(web.AppRunner(create_metrics_app(self.app), **common))

    async def start(self, listeners: list[list[socket.socket]]) -> None:
        """Start the apps (their cleanup contexts run now); serve ``listeners``, one list of
        sockets per runner."""
        try:
            for runner, socks in zip(self.runners, listeners, strict=True):
                await runner.setup()
                for sock in socks:
                    await web.SockSite(runner, sock.dup(), backlog=BACKLOG).start()
        except BaseException:
            await self.close()
            raise
        if self._apply is not None:
            self._apply()

    async def close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()

    async def drain(self) -> None:
        from .streams import STREAMS
        from .timeline import RECORDER

        if RECORDER in self.app:
            self.app[RECORDER].close_feeds()  # an open page must not hold the drain back
        timeout = self.cfg.server.shutdown_timeout
        servers = [r.server for r in self.runners if r.server is not None]
        for runner in self.runners:
            for site in list(runner.sites):
                await site.stop()
        await asyncio.sleep(0)  # connections accepted just now start their request first
        for server in servers:
            server.pre_shutdown()  # idle ones close; busy ones close after their response
        # aiohttp's per-connection shutdown waits for the request in flight; it is given the
        # full timeout but is made to end at ours, below.
        waiting = asyncio.ensure_future(
            asyncio.gather(*(server.shutdown(timeout) for server in servers))
        )
        done, _ = await asyncio.wait({waiting}, timeout=timeout)
        if not done:
            streams = self.app[STREAMS]
            left = sum(len(server.connections) for server in servers)
            ended = await streams.end_all()
            log.info(
                "shutdown: %d stream(s) ended with an error event; cutting %d other request(s)",
                ended,
                max(0, left - ended),
            )
            for server in servers:
                for conn in server.connections:
                    conn.force_close()
            done, _ = await asyncio.wait({waiting}, timeout=1.0)
            if not done:
                waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await self.close()


_RESTART_ONLY = ("host", "port", "workers", "metrics_port", "metrics_host")


def reload_problem(old: config.Config, new: config.Config) -> str | None:
    """Why ``new`` cannot replace ``old`` in a running process (None: it can)."""
    changed = [k for k in _RESTART_ONLY if getattr(old.server, k) != getattr(new.server, k)]
    if changed:
        keys = ", ".join(f"[server] {k}" for k in changed)
        return f"{keys} changed: that needs a restart"
    return None


def load_for_reload(
    reload: Callable[[], config.Config] | None, running: config.Config
) -> config.Config | None:
    """The config to reload to, or None (and one log line saying why) to keep the running one."""
    if reload is None:  # a worker: its supervisor reloads
        log.warning("SIGHUP ignored: send it to the supervisor, which reloads the workers")
        return None
    try:
        new = reload()
    except config.ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return None
    problem = reload_problem(running, new)
    if problem is not None:
        log.error("reload refused, keeping the running configuration: %s", problem)
        return None
    return new


async def _serve(
    cfg: config.Config,
    reuse_port: bool,
    ready: Callable[[], object],
    stopping: Callable[[], object],
    reload: Callable[[], config.Config] | None = None,
) -> None:
    server = cfg.server
    listeners = [_listen(server.host, server.port, reuse_port)]
    if server.metrics_port:
        listeners.append(_listen(server.metrics_host, server.metrics_port, reuse_port))
    stop = asyncio.Event()
    hup = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)  # never the default: it would kill us
    draining: set[asyncio.Task[None]] = set()
    try:
        current = Generation(cfg)
        await current.start(listeners)
        ready()
        while True:
            stopped = loop.create_task(stop.wait())
            hupped = loop.create_task(hup.wait())
            await asyncio.wait({stopped, hupped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            hupped.cancel()
            if stop.is_set():
                break
            hup.clear()
            new_cfg = load_for_reload(reload, current.cfg)
            if new_cfg is None:
                continue
            try:
                successor = Generation(new_cfg, current)
                await successor.start(listeners)
            except Exception as exc:  # a cache file it cannot open...
                log.error("reload failed, keeping the running configuration: %s", exc)
                continue
            old, current = current, successor
            task = loop.create_task(old.drain())
            draining.add(task)
            task.add_done_callback(draining.discard)
            log.info("reloaded the configuration; the previous one drains its requests")
        stopping()
        log.info("shutting down: draining requests for up to %g s", server.shutdown_timeout)
        # Ours go first, so that the drain's stopping of the sites closes the listening sockets
        # for good (with SO_REUSEPORT, a socket left open would go on queueing connections
        # nobody accepts).
        _close(listeners)
        await asyncio.gather(current.drain(), *draining)
    finally:
        _close(listeners)


def _close(listeners: list[list[socket.socket]]) -> None:
    for socks in listeners:
        for sock in socks:
            sock.close()


def run_worker(
    cfg: config.Config,
    reuse_port: bool,
    ready: Callable[[], object],
    stopping: Callable[[], object] = lambda: None,
    reload: Callable[[], config.Config] | None = None,
) -> None:
    """Serve ``cfg`` here until SIGTERM/SIGINT, then drain: the only process, or one worker of
    the supervisor (``reuse_port``, no ``reload``: the supervisor reloads)."""
    logs.setup(cfg.server.log_level)
    _event_loop_policy()
    # How long a worker thread (large scans and hashes, the local OCR engine, SQLite) may keep
    # the GIL while the event loop waits for it (Python's default: 5 ms).
    sys.setswitchinterval(0.001)
    try:
        asyncio.run(_serve(cfg, reuse_port, ready, stopping, reload))
    except CannotListen as exc:
        log.error("cannot listen: %s", exc)
        raise SystemExit(1) from None
    except OSError as exc:  # the cache directory, a file the config names...
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None
    # Drained and about to exit: a repeated SIGTERM (or a SIGHUP, whose handler went with the
    # event loop) must not turn a clean exit into a kill.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def exit_now() -> NoReturn:
    """Exit 0 without the interpreter's teardown of its ~400 modules, everything being closed
    already: that teardown took 0.4 s of CPU on an idle machine and over 1 s on a busy one, out
    of the 2 s a drained process has to be gone in."""
    logging.shutdown()  # the access lines still queued
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve(cfg: config.Config, reload: Callable[[], config.Config] | None = None) -> None:
    """Run until SIGTERM/SIGINT, with ``cfg.server.workers`` processes.

    On SIGHUP, ``reload()`` gives the new config (it re-reads the file; ConfigError if the file
    is invalid, and then nothing changes). A valid one gets a new app (one worker) or new
    workers, which take over while the old ones drain.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the handlers are in place
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
        run_worker(
            cfg, False, lambda: sd_notify("READY=1"), lambda: sd_notify("STOPPING=1"), reload
        )
        exit_now()
    # Imported here: the supervisor runs this module's workers, so it imports this module (and
    # a spawned worker imports the supervisor's module first, to find its entry function).
    from .supervisor import Supervisor

    Supervisor(cfg, reload).run()

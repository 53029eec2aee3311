"""Several worker processes on one port: start them, watch them, reload them, stop them.

Theory of operation: with ``workers = N`` the process that ``server.serve`` started becomes a
small supervisor: it starts N worker processes (spawned, so each has a fresh interpreter) that
all bind the same port with ``SO_REUSEPORT``, and the kernel spreads new connections across
them. Workers share the sqlite/redis cache tier; their metrics go to files in a directory the
supervisor creates (``PROMETHEUS_MULTIPROC_DIR``) so any worker can answer a scrape for all. A
worker that dies is replaced; workers that die more than MAX_RESTARTS times in
RESTART_WINDOW_S make the supervisor exit. ``READY=1`` goes to systemd only once every worker
listens.

On SIGTERM or SIGINT every worker gets SIGTERM and drains as a single process does
(``server.Generation.drain``); one not gone within ``shutdown_timeout`` + STOP_MARGIN_S is
killed. On SIGHUP the config file is read again; if it is valid, a new generation of workers
starts beside the running ones, and once every new worker listens the old ones drain. If it is
not, or a new worker fails to start, one log line says why and the old workers keep serving.

A spawned worker finds its entry function (``_worker_main``) by its qualified name, so it stays
a module-level function of this module.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

from . import config
from .metrics import MULTIPROC_ENV
from .server import exit_now, load_for_reload, run_worker, sd_notify

log = logging.getLogger("ocrproxy")

PR_SET_PDEATHSIG = 1
# Workers that die more often than this are not a hiccup: the supervisor exits (non-zero) and
# leaves the decision to systemd's Restart= and its start limit.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_MARGIN_S = 1.5  # a worker not gone this long after shutdown_timeout is killed
RELOAD_START_S = 60.0  # new workers of a reload must all listen within this


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
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # and reloads
    _die_with_parent(parent)
    run_worker(cfg, True, lambda: ready.put(os.getpid()))
    ready.close()
    ready.join_thread()  # our pid reached the supervisor long ago; the feeder thread is idle
    exit_now()


class Supervisor:
    """Starts, watches, reloads and stops the worker processes.

    A reload (SIGHUP) starts a new generation of workers with the new config beside the running
    ones (they share the port with ``SO_REUSEPORT``); once every new worker listens, the old ones
    get SIGTERM and drain as on a shutdown ("retiring"). If a new worker fails to start, the new
    generation is stopped and the old one keeps serving.
    """

    def __init__(
        self, cfg: config.Config, reload: Callable[[], config.Config] | None = None
    ) -> None:
        self.cfg = cfg
        self.reload = reload
        self.ctx = multiprocessing.get_context("spawn")
        self.ready: Any = self.ctx.Queue()
        self.workers: list[Any] = []
        self.starting: list[Any] = []  # a reload's new generation, until it listens
        self.retiring: list[tuple[Any, float]] = []  # (worker, kill deadline) after a reload
        # The workers sent SIGTERM: process objects, not pids (a new worker may get the pid of
        # one reaped earlier); each leaves the set when it is forgotten.
        self.terminated: set[Any] = set()
        self.stopping = False
        self.reload_asked = False
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

    def _start(self, cfg: config.Config) -> Any:
        proc = self.ctx.Process(
            target=_worker_main,
            args=(cfg, self.ready, os.getpid()),
            name="ocrproxy-worker",
            daemon=False,
        )
        proc.start()
        return proc

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        self._terminate(self._all())  # now, not when the watch loop next wakes up

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload_asked = True

    def _all(self) -> list[Any]:
        return self.workers + self.starting + [proc for proc, _ in self.retiring]

    def _terminate(self, procs: list[Any]) -> None:
        for proc in procs:
            if proc.exitcode is None and proc not in self.terminated:
                self.terminated.add(proc)  # twice could kill one that is exiting
                os.kill(proc.pid, signal.SIGTERM)

    def run(self) -> None:
        self._prepare_metrics_dir()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            self.workers = [self._start(self.cfg) for _ in range(self.cfg.server.workers)]
            if not self._wait_ready(self.workers):
                raise SystemExit("ocrproxy: a worker failed to start (see its log above)")
            if not self.stopping:
                sd_notify("READY=1")
                log.info("all %d workers are listening", len(self.workers))
            self._watch()
        finally:
            self._stop_all()
            if self.own_metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _wait_ready(self, procs: list[Any], timeout: float | None = None) -> bool:
        """Until each of ``procs`` listens (True), one of them exits or the time is up (False),
        or we are stopping."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = {p.pid for p in procs}
        while pending and not self.stopping:
            try:
                pending.discard(self.ready.get(timeout=0.2))
            except queue.Empty:
                pass
            if any(p.exitcode is not None for p in procs):
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
        return True

    def _reload(self) -> None:
        self.reload_asked = False
        cfg = load_for_reload(self.reload, self.cfg)
        if cfg is None:
            return
        self.starting = [self._start(cfg) for _ in range(cfg.server.workers)]
        ready = self._wait_ready(self.starting, RELOAD_START_S)
        fresh, self.starting = self.starting, []
        if self.stopping:
            self.workers += fresh  # stopped with the others
            return
        if not ready:
            log.error(
                "reload failed, keeping the running configuration: a new worker did not "
                "start (see its log above)"
            )
            self._terminate(fresh)
            for proc in fresh:
                proc.join(cfg.server.shutdown_timeout + STOP_MARGIN_S)
                if proc.exitcode is None:
                    proc.kill()
                    proc.join()
            self._forget(fresh)
            return
        deadline = time.monotonic() + self.cfg.server.shutdown_timeout + STOP_MARGIN_S
        old, self.workers, self.cfg = self.workers, fresh, cfg
        self._terminate(old)
        self.retiring += [(proc, deadline) for proc in old]
        log.info(
            "reloaded the configuration: %d new worker(s) listen; the previous ones drain",
            len(fresh),
        )

    def _forget(self, procs: list[Any]) -> None:
        from prometheus_client import multiprocess

        for proc in procs:
            self.terminated.discard(proc)
            multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]

    def _reap_retiring(self) -> None:
        now = time.monotonic()
        for proc, deadline in list(self.retiring):
            if proc.exitcode is None and now > deadline:
                log.warning("worker %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()
            if proc.exitcode is not None:
                self.retiring.remove((proc, deadline))
                self._forget([proc])

    def _watch(self) -> None:
        last_restart = 0.0
        restarts: list[float] = []
        while not self.stopping:
            sentinels = [p.sentinel for p in self.workers + [p for p, _ in self.retiring]]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            if self.reload_asked and not self.stopping:
                self._reload()
            self._reap_retiring()
            for i, proc in enumerate(self.workers):
                if proc.exitcode is None or self.stopping:
                    continue
                log.error("worker %d exited with %s; starting another", proc.pid, proc.exitcode)
                self._forget([proc])
                now = time.monotonic()
                restarts = [t for t in restarts if t > now - RESTART_WINDOW_S] + [now]
                if len(restarts) > MAX_RESTARTS:
                    raise SystemExit(
                        f"ocrproxy: workers died {len(restarts)} times in "
                        f"{RESTART_WINDOW_S:g} s; giving up"
                    )
                time.sleep(max(0.0, last_restart + 1.0 - time.monotonic()))
                last_restart = time.monotonic()
                self.workers[i] = self._start(self.cfg)

    def _stop_all(self) -> None:
        sd_notify("STOPPING=1")
        procs = self._all()
        self._terminate(procs)
        # A worker's drain ends within shutdown_timeout and a fraction of a second; past that
        # it is stuck, and the whole service must be gone within shutdown_timeout + 2 s.
        deadline = time.monotonic() + self.cfg.server.shutdown_timeout + STOP_MARGIN_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.warning("worker %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()
        log.info("all workers stopped")

"""Processes of a benchmark run: the fakes, the bare relay, the proxy, and the load drivers.

Layout on a machine with two or more CPUs (and ``taskset``): the server under test (the proxy or
the bare relay) runs alone on CPU 0; the fakes, wrk and the aiohttp driver share CPU 1. So the
proxy's cost is isolated, and "direct" (load -> fake) runs on the load side only.

No child outlives the runner, however it ends. Every child is started by ``spawn`` (from the
main thread: Linux sends the parent-death signal when the *thread* that forked exits) with
``PR_SET_PDEATHSIG`` = SIGKILL set between fork and exec, so the kernel kills it when the runner
dies, even by SIGKILL; ``taskset`` execs the real program, which keeps that setting (only a
set-uid exec clears it). Each child also leads its own process group, so that the runner can
stop it together with anything it started (``stop_group``), and a Ctrl-C on the terminal
reaches the runner alone, which then stops its children in order: ``Bench`` stops everything
on a normal exit and on an exception, and ``python -m bench`` turns SIGTERM and SIGHUP into
an exception (``run.main``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "post.lua"


PR_SET_PDEATHSIG = 1
SHORT_RUN_RESPONSES = 20  # a wrk run shorter than a second lasts until this many responses came
SHORT_RUN_LIMIT = 5  # or this many seconds
UI_ADMIN_KEY = "bench-ui-admin-key"  # the live page's key on the twin `twins` starts with it
TWINS = {"twin-off": False, "twin-ui": True}  # `twins`: name -> [ui] enabled
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with(parent: int) -> None:
    """Between fork and exec in a child: be killed when ``parent`` (its forking thread) dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the runner died before the line above: nobody would kill us
        os._exit(1)


def child_options() -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments for every child of the runner (see the module
    docstring): dies with the runner, leads its own process group."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("children are started from the main thread (PR_SET_PDEATHSIG)")
    parent = os.getpid()
    return {"preexec_fn": lambda: _die_with(parent), "process_group": 0}


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 10, *, term: bool = True) -> None:
    """SIGTERM ``proc``'s process group (unless ``term`` is false: already done), wait up to
    ``timeout`` seconds for ``proc``, then SIGKILL the group (``proc`` and whatever it started
    that is still there), and reap it."""
    if proc.returncode is None:
        if term:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        # Wait without reaping: while the leader is a zombie its id cannot name another group.
        with contextlib.suppress(ChildProcessError):
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            while os.waitid(os.P_PID, proc.pid, flags) is None and time.monotonic() < deadline:
                time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"{proc.args!r} did not listen on {port} within {timeout:g} s")


@dataclass
class Pinning:
    """Which CPUs the server under test and the load side use (None: not pinned)."""

    server: str | None
    load: str | None

    @classmethod
    def detect(cls) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if shutil.which("taskset") and len(cpus) >= 2:
            return cls(str(cpus[0]), ",".join(str(c) for c in cpus[1:]))
        return cls(None, None)

    @classmethod
    def shared(cls) -> Pinning:
        """Every side on every CPU (the smoke run: start-up in parallel, timings meaningless),
        still through ``taskset`` when there is one, so that a run launches as a full run does."""
        if shutil.which("taskset"):
            cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
            return cls(cpus, cpus)
        return cls(None, None)

    def wrap(self, argv: list[str], side: str | None) -> list[str]:
        """``argv`` pinned to the ``side`` ("server" or "load"; None: not pinned)."""
        if side is None:
            return argv
        cpu = self.server if side == "server" else self.load
        return ["taskset", "-c", cpu, *argv] if cpu is not None else argv

    def describe(self) -> str:
        if self.server is None:
            return "not pinned (taskset missing or one CPU): figures include load-side noise"
        if self.server == self.load:
            return f"not pinned apart (all on CPU {self.server}): timings meaningless"
        return f"server under test on CPU {self.server}; fakes + load drivers on CPU {self.load}"


@dataclass
class Target:
    """A place to send chat requests: direct, bare relay, or proxy."""

    name: str
    url: str  # its chat completions URL
    pid: int | None = None
    base: str = ""

    def at(self, path: str) -> str:
        """Its URL for ``path`` (``/v1/messages``...)."""
        return self.base + path


@dataclass
class Bench:
    """Owns every process of a run; use as a context manager so nothing outlives it.

    ``lean`` (the smoke run) saves start-up time and CPU, not measurements: the proxy is the
    watched one (``bench.loopwatch``), ``fresh`` lends the run's own relay or proxy instead of
    starting one, and one load-driver process (``bench.client --serve``), started along with
    the servers, serves the whole run instead of one process per measurement. A full run
    keeps them apart: the monitor's wake-ups would cost the other scenarios, and a heap grown
    by an earlier scenario would hide the memory scenario's growth.
    """

    ocr_delay: float = 0.3
    pinning: Pinning = field(default_factory=Pinning.detect)
    log_level: str = "info"
    lean: bool = False
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)
    config_text: str = ""
    fake_base: str = ""
    retired: list[int] = field(default_factory=list)  # pids of processes already stopped
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ocrproxy-bench-")))
    # started, not yet known to listen: (target, process, port)
    _starting: dict[str, tuple[Target, subprocess.Popen[bytes], int]] = field(default_factory=dict)
    _driver: subprocess.Popen[bytes] | None = None
    background: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # by name

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def spawn(
        self,
        argv: list[str],
        side: str | None,
        log: str,
        env: dict[str, str] | None = None,
        **kw: Any,
    ) -> subprocess.Popen[bytes]:
        """Start a child (pinned to ``side``) whose output (or, if ``stdout`` is given, its
        stderr) goes to the file ``log``; ``stop`` ends it."""
        with open(self.tmp / log, "wb") as out:
            options: dict[str, Any] = (
                {"stderr": out, **kw}
                if "stdout" in kw
                else {"stdout": out, "stderr": subprocess.STDOUT, **kw}
            )
            proc = subprocess.Popen(
                self.pinning.wrap(argv, side),
                env={**self.env(), **(env or {})},
                cwd=ROOT,
                **options,
                **child_options(),
            )
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Bench:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the fakes, the bare relay and the proxy together; return once all listen."""
        py = sys.executable
        chat_port, ocr_port = free_port(), free_port()
        argv = [py, "-m", "bench.fake", "--port", str(chat_port), "--port", str(ocr_port)]
        fake = self.spawn([*argv, "--ocr-delay", str(self.ocr_delay)], "load", "fake.log")
        fake_base = f"http://127.0.0.1:{chat_port}"
        path = "/v1/chat/completions"
        # "direct" has no server under test: no pid
        self._starting["direct"] = (
            Target("direct", fake_base + path, None, fake_base),
            fake,
            ocr_port,
        )
        self.fake_base = fake_base
        self.config_text = f"""\
[server]
host = "127.0.0.1"
port = {{port}}
log_level = "{self.log_level}"

[[upstreams]]
name = "fake-ocr"
base_url = "http://127.0.0.1:{ocr_port}/v1"
models = ["vision-*"]

[[upstreams]]
name = "fake"
base_url = "{fake_base}/v1"

[[upstreams]]
name = "fake-anthropic"
api = "anthropic"
base_url = "{fake_base}"

[ocr]
model = "vision-bench"
"""
        # Neither the relay nor the proxy talks to the fake before a request comes.
        self._relay("relay")
        if self.lean:
            self._watched("proxy")
            self._start_driver()
        else:
            self._proxy("proxy", ["-m", "ocrproxy"])
        for name in ("direct", "relay", "proxy"):
            self.target(name)
        if self.lean:
            self.targets["watched"] = self.targets["proxy"]

    def target(self, name: str) -> Target:
        """The target ``name``, once it listens."""
        if name in self._starting:
            target, proc, port = self._starting.pop(name)
            wait_port(port, proc)
            self.targets[name] = target
        return self.targets[name]

    def _relay(self, name: str) -> Target:
        port = free_port()
        argv = [sys.executable, "-m", "bench.relay", "--port", str(port)]
        proc = self.spawn([*argv, "--upstream", self.fake_base], "server", f"{name}.log")
        base = f"http://127.0.0.1:{port}"
        target = Target(name, base + "/v1/chat/completions", proc.pid, base)
        self._starting[name] = (target, proc, port)
        return target

    def _proxy(
        self,
        name: str,
        module: list[str],
        env: dict[str, str] | None = None,
        ocr: str = "",
        ui: bool = False,
    ) -> Target:
        port = free_port()
        config = self.tmp / f"{name}.toml"
        page = f'\n[ui]\nenabled = true\nadmin_key = "{UI_ADMIN_KEY}"\n' if ui else ""
        config.write_text(self.config_text.replace("{port}", str(port)) + ocr + page)
        argv = [sys.executable, *module, "serve", "--config", str(config)]
        proc = self.spawn(argv, "server", f"{name}.log", env)
        base = f"http://127.0.0.1:{port}"
        target = Target(name, base + "/v1/chat/completions", proc.pid, base)
        self._starting[name] = (target, proc, port)
        return target

    def variant(self, name: str, ocr: str) -> None:
        """Start another proxy, the run's own but for ``ocr`` (TOML lines appended to its
        ``[ocr]`` table, the config's last); ``target(name)`` waits for it, ``retire(name)``
        (or ``stop``) ends it. Start several before waiting for any: they start side by side."""
        self._proxy(name, ["-m", "ocrproxy"], ocr=ocr)

    def retire(self, name: str) -> None:
        """Stop the server of target ``name`` now (one started for a scenario alone)."""
        if name in self._starting:
            self.target(name)
        target = self.targets.pop(name)
        proc = next(p for p in self.procs if p.pid == target.pid)
        stop_group(proc)
        self.retired.append(proc.pid)
        self.procs.remove(proc)

    @contextlib.contextmanager
    def fresh(self, kind: str) -> Iterator[Target]:
        """A newly started relay or proxy, stopped afterwards: memory figures from a clean heap
        (in a lean run, the run's own)."""
        if self.lean:
            yield self.target(kind)
            return
        if kind == "relay":
            name = self._relay("fresh-relay").name
        else:
            name = self._proxy("fresh-proxy", ["-m", "ocrproxy"]).name
        target = self.target(name)
        try:
            yield target
        finally:
            self.retire(name)

    @contextlib.contextmanager
    def twins(self) -> Iterator[tuple[Target, Target]]:
        """Two more proxies, the run's own, started together and stopped afterwards: one as it
        is, one with ``[ui] enabled`` (it records every request for the live page; its admin
        key is ``UI_ADMIN_KEY``). Two processes alike but for the page, for a fair A/B."""
        names = [self._proxy(n, ["-m", "ocrproxy"], ui=ui).name for n, ui in TWINS.items()]
        try:
            yield self.target(names[0]), self.target(names[1])
        finally:
            for name in names:  # one that never listened is stopped with the rest by `stop`
                if name in self.targets or name in self._starting:
                    self.retire(name)

    def _watched(self, name: str) -> None:
        env = {"BENCH_LOOPWATCH": str(self.tmp / "stall.txt")}
        self._proxy(name, ["-m", "bench.loopwatch"], env)

    def watched(self) -> Target:
        """A second proxy, the same but for an event-loop stall monitor (bench.loopwatch)."""
        if "watched" not in self.targets and "watched" not in self._starting:
            self._watched("watched")
        return self.target("watched")

    def stall_ms(self) -> tuple[float, float]:
        """The watched proxy's longest event-loop stall since the last call, in ms: as seen on
        the wall clock, and bounded by the CPU time the proxy used (see bench.loopwatch)."""
        path = self.tmp / "stall.txt"
        path.unlink(missing_ok=True)
        pid = self.watched().pid
        assert pid is not None
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = path.read_text() if path.exists() else ""
            if text.endswith("\n"):
                wall, cpu = text.split()
                return float(wall), float(cpu)
            time.sleep(0.005)
        raise RuntimeError("the watched proxy did not report its stalls")

    def stop(self) -> None:
        """Stop every child, last started first; a second SIGTERM or Ctrl-C waits for this."""
        blocked = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        if threading.current_thread() is threading.main_thread():
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        else:
            previous = None
        try:
            for proc in reversed(self.procs):  # all asked at once; then each waited for
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
            for proc in reversed(self.procs):
                stop_group(proc, term=False)
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
            self.procs.clear()
            self._driver = None
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if previous is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def wrk(
        self,
        url: str,
        body: bytes,
        *,
        connections: int,
        duration: float,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run wrk (one thread, on the load CPU) and return its summary with ``rps`` added.

        wrk takes whole seconds. A shorter ``duration`` (smoke runs) is a minimum: wrk is
        ended with SIGINT, after which it prints its summary of the time it ran (as after a
        Ctrl-C), once ``duration`` has passed and it has had ``SHORT_RUN_RESPONSES`` responses,
        or after ``SHORT_RUN_LIMIT`` seconds, so that a busy machine still gives figures."""
        body_file = self.tmp / f"body-{len(body)}-{hash(body) & 0xFFFF:x}.json"
        if not body_file.exists():
            body_file.write_bytes(body)
        env = self.env()
        env["BENCH_BODY"] = str(body_file)
        env["BENCH_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in (headers or {}).items())
        short = duration < 1
        seconds = SHORT_RUN_LIMIT if short else max(1, round(duration))
        if short:
            env["BENCH_MARK_AFTER"] = str(SHORT_RUN_RESPONSES)
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(LUA), url]
        started = time.monotonic()
        proc = subprocess.Popen(
            self.pinning.wrap(argv, "load"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **child_options(),
        )
        head = b""
        try:
            if short:
                assert proc.stdout is not None
                fd = proc.stdout.fileno()
                while b"WRKMARK\n" not in head:
                    ready, _, _ = select.select([fd], [], [], seconds + 1)
                    piece = os.read(fd, 65536) if ready else b""
                    if not piece:
                        break  # wrk ended (its own -d limit) or says nothing
                    head += piece
                time.sleep(max(0.0, started + duration - time.monotonic()))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            tail, stderr = proc.communicate(timeout=seconds + 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        stdout = head + tail
        if proc.returncode != 0:
            raise RuntimeError(f"wrk exited with {proc.returncode}: {stderr!r}")
        for line in stdout.decode().splitlines():
            if line.startswith("WRKJSON "):
                result: dict[str, Any] = orjson.loads(line[8:])
                result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
                result["errors"] = sum(v for k, v in result.items() if k.startswith("err_"))
                return result
        raise RuntimeError(f"wrk printed no result: {stdout!r} {stderr!r}")

    def client(self, spec: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        """Run the aiohttp driver (on the load CPU) with ``spec``; return its JSON result."""
        if self.lean:
            return self._ask_driver(spec, timeout)
        argv = [sys.executable, "-m", "bench.client", orjson.dumps(spec).decode()]
        done = subprocess.run(
            self.pinning.wrap(argv, "load"),
            env=self.env(),
            cwd=ROOT,
            capture_output=True,
            timeout=timeout,
            **child_options(),
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"bench.client {spec['kind']} failed: {done.stderr.decode()[-2000:]}"
            )
        result: dict[str, Any] = orjson.loads(done.stdout)
        return result

    def _start_driver(self) -> None:
        argv = [sys.executable, "-m", "bench.client", "--serve"]
        self._driver = self.spawn(
            argv, "load", "client.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def _ask_driver(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """``spec`` to the one long-lived driver (``bench.client --serve``), its answer back."""
        if self._driver is None or self._driver.poll() is not None:
            self._start_driver()
        driver = self._driver
        assert driver is not None
        assert driver.stdin is not None and driver.stdout is not None
        driver.stdin.write(orjson.dumps(spec) + b"\n")
        driver.stdin.flush()
        ready, _, _ = select.select([driver.stdout], [], [], timeout)
        line = driver.stdout.readline() if ready else b""
        if not line:
            log = (self.tmp / "client.log").read_bytes().decode(errors="replace")
            stop_group(driver, timeout=1)
            self.procs.remove(driver)
            self._driver = None
            raise RuntimeError(f"bench.client {spec['kind']} gave no answer: {log[-2000:]}")
        answer: dict[str, Any] = orjson.loads(line)
        if "error" in answer:
            raise RuntimeError(f"bench.client {spec['kind']} failed: {answer['error'][-2000:]}")
        return answer["result"]  # type: ignore[no-any-return]

"""Processes of a benchmark run: the fakes, the bare relay, the proxy, and the load drivers.

Layout on a machine with two or more CPUs (and ``taskset``): the server under test (the proxy or
the bare relay) runs alone on CPU 0; the fakes, wrk and the aiohttp driver share CPU 1. So the
proxy's cost is isolated, and "direct" (load -> fake) runs on the load side only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "post.lua"


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
            time.sleep(0.05)
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

    def wrap(self, argv: list[str], side: str) -> list[str]:
        cpu = self.server if side == "server" else self.load
        return ["taskset", "-c", cpu, *argv] if cpu is not None else argv

    def describe(self) -> str:
        if self.server is None:
            return "not pinned (taskset missing or one CPU): figures include load-side noise"
        return f"server under test on CPU {self.server}; fakes + load drivers on CPU {self.load}"


@dataclass
class Target:
    """A place to send chat requests: direct, bare relay, or proxy."""

    name: str
    url: str
    pid: int | None = None
    base: str = ""


@dataclass
class Bench:
    """Owns every process of a run; use as a context manager so nothing outlives it."""

    ocr_delay: float = 0.3
    pinning: Pinning = field(default_factory=Pinning.detect)
    log_level: str = "info"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)
    config_text: str = ""
    fake_base: str = ""
    retired: list[int] = field(default_factory=list)  # pids of processes already stopped
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ocrproxy-bench-")))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def _spawn(
        self, argv: list[str], side: str, port: int, log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.tmp / log, "wb") as out:
            proc = subprocess.Popen(
                self.pinning.wrap(argv, side),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env(), **(env or {})},
                cwd=ROOT,
            )
        self.procs.append(proc)
        wait_port(port, proc)
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
        py = sys.executable
        chat_port, ocr_port = free_port(), free_port()
        argv = [py, "-m", "bench.fake", "--port", str(chat_port), "--port", str(ocr_port)]
        self._spawn([*argv, "--ocr-delay", str(self.ocr_delay)], "load", ocr_port, "fake.log")
        fake_base = f"http://127.0.0.1:{chat_port}"
        path = "/v1/chat/completions"
        self.targets["direct"] = Target("direct", fake_base + path, None, fake_base)

        self.fake_base = fake_base
        self.targets["relay"] = self._relay("relay")

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

[ocr]
model = "vision-bench"
"""
        self.targets["proxy"] = self._proxy("proxy", ["-m", "ocrproxy"])

    def _relay(self, name: str) -> Target:
        port = free_port()
        argv = [sys.executable, "-m", "bench.relay", "--port", str(port)]
        proc = self._spawn([*argv, "--upstream", self.fake_base], "server", port, f"{name}.log")
        base = f"http://127.0.0.1:{port}"
        return Target(name, base + "/v1/chat/completions", proc.pid, base)

    @contextlib.contextmanager
    def fresh(self, kind: str) -> Iterator[Target]:
        """A newly started relay or proxy, stopped afterwards: memory figures from a clean heap."""
        target = (
            self._relay("fresh-relay")
            if kind == "relay"
            else self._proxy("fresh-proxy", ["-m", "ocrproxy"])
        )
        proc = next(p for p in self.procs if p.pid == target.pid)
        try:
            yield target
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.retired.append(proc.pid)
            self.procs.remove(proc)

    def _proxy(self, name: str, module: list[str], env: dict[str, str] | None = None) -> Target:
        port = free_port()
        config = self.tmp / f"{name}.toml"
        config.write_text(self.config_text.replace("{port}", str(port)))
        argv = [sys.executable, *module, "serve", "--config", str(config)]
        proc = self._spawn(argv, "server", port, f"{name}.log", env)
        base = f"http://127.0.0.1:{port}"
        return Target(name, base + "/v1/chat/completions", proc.pid, base)

    def watched(self) -> Target:
        """A second proxy, the same but for an event-loop stall monitor (bench.loopwatch)."""
        if "watched" not in self.targets:
            env = {"BENCH_LOOPWATCH": str(self.tmp / "stall.txt")}
            self.targets["watched"] = self._proxy("watched", ["-m", "bench.loopwatch"], env)
        return self.targets["watched"]

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
            time.sleep(0.01)
        raise RuntimeError("the watched proxy did not report its stalls")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def wrk(
        self,
        url: str,
        body: bytes,
        *,
        connections: int,
        duration: float,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run wrk (one thread, on the load CPU) and return its summary with ``rps`` added."""
        body_file = self.tmp / f"body-{len(body)}-{hash(body) & 0xFFFF:x}.json"
        if not body_file.exists():
            body_file.write_bytes(body)
        env = self.env()
        env["BENCH_BODY"] = str(body_file)
        env["BENCH_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in (headers or {}).items())
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "-s",
            str(LUA),
            url,
        ]
        done = subprocess.run(
            self.pinning.wrap(argv, "load"),
            env=env,
            capture_output=True,
            timeout=duration + 60,
            check=True,
        )
        for line in done.stdout.decode().splitlines():
            if line.startswith("WRKJSON "):
                result: dict[str, Any] = orjson.loads(line[8:])
                result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
                result["errors"] = sum(v for k, v in result.items() if k.startswith("err_"))
                return result
        raise RuntimeError(f"wrk printed no result: {done.stdout!r} {done.stderr!r}")

    def client(self, spec: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        """Run the aiohttp driver (on the load CPU) with ``spec``; return its JSON result."""
        argv = [sys.executable, "-m", "bench.client", orjson.dumps(spec).decode()]
        done = subprocess.run(
            self.pinning.wrap(argv, "load"),
            env=self.env(),
            cwd=ROOT,
            capture_output=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"bench.client {spec['kind']} failed: {done.stderr.decode()[-2000:]}"
            )
        result: dict[str, Any] = orjson.loads(done.stdout)
        return result

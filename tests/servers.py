"""Real servers for the deployment tests, each on a free loopback port in its own temp dir."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from ocrproxy.metrics import MULTIPROC_ENV


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Wait until something accepts on 127.0.0.1:port, or fail if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def redis_server(binary: str, workdir: Path, port: int | None = None) -> Iterator[int]:
    """A throwaway redis-server on 127.0.0.1; yields its port."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(workdir / "redis.log"),
            "--enable-debug-command", "local",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc)
        yield port
    finally:
        stop(proc)


ROOT = Path(__file__).resolve().parent.parent


class ProxyProcess:
    """``python -m ocrproxy serve`` as a real process, ready when it says so over sd_notify."""

    def __init__(self, tmp: Path, config_toml: str, *args: str) -> None:
        self.tmp = tmp
        self.config = tmp / "ocrproxy.toml"
        self.config.write_text(config_toml)
        self.args = args
        self.notify_path = tmp / "notify.sock"
        self.log_path = tmp / "ocrproxy.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.notify: socket.socket | None = None
        self.states: list[str] = []
        self._log_file: Any = None

    @property
    def port(self) -> int:
        """The port its config file gives."""
        match = re.search(r"port = (\d+)", self.config.read_text())
        assert match
        return int(match.group(1))

    async def start(self, env: dict[str, str] | None = None, timeout: float = 20.0) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        environ = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "NOTIFY_SOCKET": str(self.notify_path),
            **(env or {}),
        }
        if MULTIPROC_ENV not in (env or {}):
            environ.pop(MULTIPROC_ENV, None)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ocrproxy", "serve", "--config", str(self.config), *self.args,
            env=environ,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._open_log(),
        )  # fmt: skip
        await self.wait_state("READY=1", timeout)

    def _open_log(self) -> Any:
        self._log_file = self.log_path.open("wb")
        return self._log_file

    async def wait_state(self, state: str, timeout: float = 20.0) -> None:
        assert self.notify is not None and self.proc is not None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while state not in self.states:
                recv = loop.create_task(loop.sock_recv(self.notify, 4096))
                died = loop.create_task(self.proc.wait())
                done, _ = await asyncio.wait({recv, died}, return_when=asyncio.FIRST_COMPLETED)
                for task in (recv, died):
                    if task not in done:
                        task.cancel()
                if recv in done:
                    self.states.extend(recv.result().decode().split("\n"))
                elif state not in self.states:
                    raise RuntimeError(f"ocrproxy exited with {self.proc.returncode}:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.splitlines():
            if line.startswith("{"):
                out.append(orjson.loads(line))
        return out

    async def exited(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit by itself; its return code."""
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def stop(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode if self.proc.returncode is not None else -1


def proxy_toml(fake_url: str, port: int, **extra: str) -> str:
    """A minimal ocrproxy config: the fake upstream, OCR model vision-1, given [section] text."""
    sections = {
        "server": f'host = "127.0.0.1"\nport = {port}\nshutdown_timeout = 10\n',
        "ocr": 'model = "vision-1"\n',
    }
    for name, text in extra.items():
        sections[name] = sections.get(name, "") + text
    body = "".join(f"[{name}]\n{text}\n" for name, text in sections.items())
    return body + f'[[upstreams]]\nname = "fake"\nbase_url = "{fake_url}"\n'


NGINX_SITE = ROOT / "systemd" / "nginx-ocrproxy.conf"


def render_nginx(tmp: Path, listen: int, backends: list[int]) -> Path:
    """The shipped site, pointed at loopback ports and tmp paths, inside a minimal nginx.conf."""
    site = NGINX_SITE.read_text()
    servers = "".join(
        f"    server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;\n" for port in backends
    )
    site, n = re.subn(r"    server 127\.0\.0\.1:8080 [^\n]*\n", servers, site)
    assert n == 1, "the site's upstream block changed shape"
    site, n = re.subn(
        r"    listen 80;\n    listen \[::\]:80;\n", f"    listen 127.0.0.1:{listen};\n", site
    )
    assert n == 1, "the site's listen lines changed shape"
    site = site.replace("/var/log/nginx/ocrproxy.access.log", str(tmp / "access.log"))
    (tmp / "site.conf").write_text(site)
    temp_paths = "".join(
        f"    {kind}_temp_path {tmp / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {tmp / 'nginx.pid'};\n"
        f"error_log {tmp / 'error.log'} warn;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n{temp_paths}    access_log off;\n    include {tmp / 'site.conf'};\n}}\n"
    )
    return conf


@contextmanager
def nginx(binary: str, tmp: Path, backends: list[int]) -> Iterator[int]:
    """Real nginx on a free loopback port with the shipped site in front of ``backends``."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = render_nginx(tmp, port, backends)
    base = [binary, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log")]
    check = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield port
    finally:
        stop(proc)

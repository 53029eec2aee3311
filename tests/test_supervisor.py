"""The supervisor of `serve --workers N`, as a real process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

from tests.fakes import FakeOpenAI
from tests.servers import ProxyProcess, free_port, proxy_toml
from tests.test_deploy import workers_of


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_a_worker_that_cannot_start_ends_the_supervisor(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Guards against this: Once a replacement worker can no longer start (here: its state directory became
    unusable), the supervisor respawns it once a second without end, and the failure is logged
    as "cannot listen" although the port is fine. Nothing tells systemd (Restart=on-failure)."""
    state = tmp_path / "state"
    toml = proxy_toml(
        fake.url,
        free_port(),
        cache=f'backend = "sqlite"\npath = "{state / "sub" / "cache.sqlite3"}"\n',
    )
    proc = ProxyProcess(tmp_path, toml, "--workers", "2")
    await proc.start()
    assert proc.proc is not None
    supervisor = proc.proc.pid
    try:
        shutil.rmtree(state)
        state.write_text("not a directory any more")
        os.kill(min(workers_of(supervisor)), signal.SIGKILL)
        try:
            code = await proc.exited(timeout=20)
        except TimeoutError:
            restarts = proc.log.count("starting another")
            raise AssertionError(f"still respawning after 20 s ({restarts} restarts)") from None
        assert code != 0  # systemd's Restart=on-failure and start limit take over
        assert "cannot listen" not in proc.log, "a cache-path error is reported as a listen error"
    finally:
        await proc.stop()


async def test_workers_die_with_a_killed_supervisor(fake: FakeOpenAI, tmp_path: Path) -> None:
    """Guards against this: Workers have no parent-death signal and never check their parent: if the supervisor is
    killed (OOM killer, `kill -9`, a container runtime that signals PID 1 only) they keep
    serving the port, and a restarted service runs beside them."""
    proc = ProxyProcess(tmp_path, proxy_toml(fake.url, free_port()), "--workers", "2")
    await proc.start()
    assert proc.proc is not None
    workers = workers_of(proc.proc.pid)
    assert len(workers) == 2
    try:
        proc.proc.kill()
        await proc.proc.wait()
        await asyncio.sleep(3)
        left = [pid for pid in workers if _alive(pid)]
        assert left == [], f"workers {left} still run without their supervisor"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        await proc.stop()

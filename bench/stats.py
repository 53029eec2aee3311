"""Small statistics and /proc readers shared by the runner and the load driver."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.4999))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds of durations given in seconds."""
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    return {
        "p50_ms": percentile(values, 50) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
        "max_ms": max(values) * 1000,
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_kb(pid: int) -> int:
    """Resident set size now, in KiB."""
    return _status(pid, "VmRSS")


def peak_rss_kb(pid: int) -> int:
    """Peak resident set size since start or the last ``reset_peak``, in KiB."""
    return _status(pid, "VmHWM")


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of ``pid`` (``clear_refs`` 5); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_ns(pid: int) -> int:
    """CPU time used so far by every thread of ``pid``, in nanoseconds (schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total

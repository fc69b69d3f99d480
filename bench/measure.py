"""What the benchmarks share: log lines, percentiles, CPU accounting, stopping a child."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import psutil  # type: ignore[import-untyped]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def proc_cpu(p: psutil.Process, children_reaped: bool = True) -> float:
    t = p.cpu_times()
    total: float = t.user + t.system
    if children_reaped:
        total += t.children_user + t.children_system
    return total


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of ``pid`` and its live descendants (plus children they reaped)."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += proc_cpu(p)
    return total


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (one process, or ingest replicas
    under their launcher)."""
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (not idle, waiting or a guest's)."""
    t = psutil.cpu_times()
    idle = t.idle + sum(getattr(t, f, 0.0) for f in ("iowait", "guest", "guest_nice"))
    busy: float = sum(t) - idle
    return busy


class CpuWindow:
    """From its creation on: how much CPU the rest of the machine used."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.machine0 = machine_busy()
        self.ours0 = tree_cpu(os.getpid())

    def other_cores(self) -> float:
        """Cores used meanwhile by processes outside this benchmark."""
        wall = time.monotonic() - self.t0
        other = (machine_busy() - self.machine0) - (tree_cpu(os.getpid()) - self.ours0)
        return max(0.0, other) / wall if wall > 0 else 0.0


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)

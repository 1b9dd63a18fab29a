"""What a process costs while it idles: its CPU over a quiet window (psutil's
cpu_times, and /proc's schedstat, which is finer than clock ticks), its RSS, and
the USS of its workers; recorded alike for bgpool's supervisor and the peers'."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

import bgpool

if TYPE_CHECKING:
    from .harness import Bench

MIB = 1024 * 1024


def supervisor_process(pool: bgpool.PoolClient) -> psutil.Process:
    """The supervisor of `pool`: the parent of its workers."""
    pid = next(s.pid for s in pool.status() if s.pid)
    return psutil.Process(psutil.Process(pid).ppid())


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def schedstat_ns(pid: int) -> int | None:
    """Time on CPU in ns from /proc/PID/schedstat (finer than cpu_times' ticks)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def idle_cost(proc: psutil.Process, seconds: float) -> tuple[float, dict[str, Any]]:
    """% of one core `proc` used over `seconds`, and the details."""
    cpu0, sched0, t0 = cpu_seconds(proc), schedstat_ns(proc.pid), time.monotonic()
    time.sleep(seconds)
    cpu1, sched1, t1 = cpu_seconds(proc), schedstat_ns(proc.pid), time.monotonic()
    extra: dict[str, Any] = {"window_s": round(t1 - t0, 3), "cpu_s": round(cpu1 - cpu0, 4)}
    if sched0 is not None and sched1 is not None:
        extra["schedstat_pct"] = round((sched1 - sched0) / 1e9 / (t1 - t0) * 100, 4)
    return (cpu1 - cpu0) / (t1 - t0) * 100, extra


def uss_mib(pids: list[int]) -> list[float]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid).memory_full_info().uss / MIB)
    return found


def add_idle_costs(
    bench: Bench,
    kind: str,
    daemon: psutil.Process,
    subject: str,
    worker_pids: Callable[[], list[int]],
    worker_subject: str | None,
    params: dict[str, Any],
) -> None:
    """The idle_cpu, supervisor_rss and (with a `worker_subject`) worker_uss rows
    of one supervising daemon whose workers are all up: its CPU over the idle
    window, then its RSS, then the USS of five of its workers (asked for only
    then, so that asking is not charged to the daemon's idle window or its RSS).
    bgpool's worker_uss rows have a phase of their own (cases.worker_uss)."""
    cpu, extra = idle_cost(daemon, bench.config.idle_seconds)
    bench.add("idle_cpu", subject, kind, [cpu], params, extra=extra)
    rss = daemon.memory_info().rss / MIB
    bench.add("supervisor_rss", subject, kind, [rss], params)
    if worker_subject is not None:
        bench.add("worker_uss", worker_subject, kind, uss_mib(worker_pids()[:5]))

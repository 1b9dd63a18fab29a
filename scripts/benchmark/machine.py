"""The machine the run is on and the run's hygiene: a description of both for the
JSON (platform, CPU, versions, the commit, how slow a job runs after a sleep), how
much CPU other processes took during the run, and the processes the run left
behind."""

from __future__ import annotations

import contextlib
import datetime
import marshal
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench_workers
import psutil

ROOT = Path(__file__).resolve().parents[2]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "loadavg_at_start": os.getloadavg(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "bgpool": version_of("bgpool"),
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        info["cpu"] = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?"
        )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "bgpool")
        info["git"] = commit + (" (bgpool/ has uncommitted changes)" if dirty else "")
    for package in ("supervisor", "circus"):
        info[package] = version_of(package)
    info["wakeup_penalty"] = wakeup_penalty()
    return info


def _git(*args: str) -> str:
    """The output of a read-only git command in the checkout."""
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
    ).stdout.strip()


def wakeup_penalty() -> dict[str, float]:
    """How much slower this machine runs a small job (about 5 us: encode a
    10 kB string snapshot, a short loop) right after a sleep than back to back:
    cold caches and, in a VM, a vCPU that was descheduled. It weighs on every
    microsecond-scale case that runs after a pause (set_vars 1 ms apart)."""
    snap = bench_workers.snapshot(1, "flat")

    def job() -> None:
        marshal.dumps(dict(snap))
        total = 0
        for i in range(200):
            total += i

    result = {}
    for label, gap in (("back_to_back_us", 0.0), ("after_1ms_sleep_us", 0.001)):
        samples = []
        for _ in range(200):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter_ns()
            job()
            samples.append((time.perf_counter_ns() - t0) / 1000)
        result[label] = round(statistics.median(samples), 2)
    return result


def version_of(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def pm2_version() -> str | None:
    """The version of pm2 in daemons.PM2_MODULE (installed on a run's first use
    of it: ask once the run is over), if any."""
    import json

    from .daemons import PM2_MODULE  # (daemons imports this module)

    try:
        return str(json.loads((PM2_MODULE / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


class ForeignCpu:
    """How busy the machine was with processes that are not this benchmark's:
    system-wide busy CPU time minus this process's and its reaped descendants'
    (every process the benchmark starts is reaped by it or by a supervisor it
    reaps), as % of one core over the run."""

    def __init__(self) -> None:
        self.start = time.monotonic(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()  # guest time is already in user: leave it out
        busy = ("user", "nice", "system", "irq", "softirq", "steal")
        return float(sum(getattr(times, name, 0.0) for name in busy))

    @staticmethod
    def _own() -> float:
        times = psutil.Process().cpu_times()
        return float(times.user + times.system + times.children_user + times.children_system)

    def pct(self) -> float:
        t0, busy0, own0 = self.start
        elapsed = time.monotonic() - t0
        foreign = (self._busy() - busy0) - (self._own() - own0)
        return round(max(0.0, foreign) / elapsed * 100, 1)


def leftover_children() -> list[psutil.Process]:
    """Every live process this one started, directly or not, still running."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def kill_leftovers(procs: list[psutil.Process]) -> None:
    """SIGKILL those of `procs` still running and reap them (5 s at most)."""
    alive = [p for p in procs if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)

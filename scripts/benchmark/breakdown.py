"""Where the time and memory of a start go: `./scripts/breakdown`.

Splits what the benchmark's cases measure whole, from outside and through the
public API only, so that the README's "Where the time goes" can be checked:

- the cold path of `ensure()`: request -> spawn (the supervisor's spawn time,
  `WorkerStatus.started_at`), spawn -> ready (`ready_at`), ready -> the call
  returns;
- crash recovery: the crash (the worker's own clock, just before it exits) ->
  the respawn -> ready;
- a start of N eager workers: CPU time of the supervisor, of the code
  generation and of each worker (/proc/<pid>/schedstat, nanoseconds), and
  each worker's page faults;
- a start of 1,000 as it comes and once the memory it needs was touched just
  before (what the host's backing of fresh memory costs it);
- memory: an idle worker's USS beside a forked child that does nothing at all,
  of a plain interpreter, of one that has imported `threading`, of one that
  has imported what a generation imports, and of the latter once its parent
  forked again.
"""

from __future__ import annotations

import functools
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bgpool

from .cases import IDLE, _crash, _stamps, pool_of, running
from .channels import wait_until

FORK_PROBE = Path(__file__).resolve().parent / "fork_probe.py"
SCRIPTS = FORK_PROBE.parent.parent  # where bench_workers.py lies


def _median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.2f} ms"


def cold_path(reps: int) -> None:
    names = [f"w{i}" for i in range(reps)]
    parts: dict[str, list[float]] = {"request -> spawn": [], "spawn -> ready": [],
                                     "ready -> returned": [], "whole ensure()": []}  # fmt: skip
    with running([bgpool.WorkerSpec(name=n, target=IDLE) for n in names]) as pool:
        for name in names:
            time.sleep(0.05)  # a pool at rest: the generation's spare is forked
            t0 = time.time()
            pool.ensure(name)
            t1 = time.time()
            (status,) = [s for s in pool.status() if s.name == name]
            assert status.started_at is not None and status.ready_at is not None
            spawned, ready = status.started_at.timestamp(), status.ready_at.timestamp()
            parts["request -> spawn"].append(spawned - t0)
            parts["spawn -> ready"].append(ready - spawned)
            parts["ready -> returned"].append(t1 - ready)
            parts["whole ensure()"].append(t1 - t0)
    print(f"cold ensure(), medians of {reps}:")
    for part, values in parts.items():
        print(f"  {part:20} {_median_ms(values)}")


def crash_path(reps: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="bgpool-breakdown-"))
    spec = bgpool.WorkerSpec(
        target="bench_workers:crash_on_trigger", max_instances=reps,
        env={"BENCH_DIR": str(directory)},
    )  # fmt: skip
    parts: dict[str, list[float]] = {"crash -> respawn": [], "respawn -> ready": []}
    try:
        with running([spec]) as pool:
            for rep in range(reps):
                name = f"crash-{rep}"
                time.sleep(0.05)  # at rest, as in cold_path
                old, new = _crash(pool, directory, name)
                read = functools.partial(_stamps, directory / f"{name}.log", new.pid)
                stamps = wait_until(read, 30, f"{name}'s log")
                crashed = stamps[("crash", old.pid)][1] / 1e9
                spawned, ready = new.started_at.timestamp(), new.ready_at.timestamp()
                parts["crash -> respawn"].append(spawned - crashed)
                parts["respawn -> ready"].append(ready - spawned)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"crash to ready, medians of {reps}:")
    for part, values in parts.items():
        print(f"  {part:20} {_median_ms(values)}")


def _cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e6


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def _children(pid: int) -> list[tuple[int, str]]:
    import psutil

    return [(c.pid, c.name()) for c in psutil.Process(pid).children()]


def _started(count: int) -> tuple[float, float, float, list[float], list[int]]:
    """A start of `count` eager workers: the wall time until all are ready,
    the supervisor's CPU, its generations' CPU, each worker's CPU and page
    faults (ms, from /proc/<pid>/schedstat)."""
    pool = pool_of([bgpool.WorkerSpec(name="e", target=IDLE, num=count)], ensure_timeout=600)
    t0 = time.perf_counter()
    try:
        pool.start()
        wait_until(
            lambda: sum(s.state == "ready" for s in pool.status()) == count, 600,
            f"{count} ready workers", poll=0.002,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        sup = _supervisor_pid(pool)
        kids = _children(sup)
        generation = sum(_cpu_ms(p) for p, name in kids if name.startswith("bgpool-gen"))
        workers = [p for p, name in kids if not name.startswith("bgpool-")]
        return (wall, _cpu_ms(sup), generation, [_cpu_ms(p) for p in workers],
                [_minor_faults(p) for p in workers])  # fmt: skip
    finally:
        pool.shutdown()


def start_split(n: int) -> None:
    base_wall, base_sup, base_gen, _, _ = _started(1)
    wall, sup, gen, workers, faults = _started(n)
    per = n - 1
    print(f"start of {n} eager workers (CPU from /proc/<pid>/schedstat):")
    print(f"  all ready after          {wall * 1000:.0f} ms (1 worker: {base_wall * 1000:.0f} ms)")
    print(f"  supervisor               {base_sup:.0f} ms to start, "
          f"{(sup - base_sup) / per:.3f} ms per more worker")  # fmt: skip
    print(f"  code generation          {(gen - base_gen) / per:.3f} ms per worker (its forks)")
    print(f"  each worker, to ready    {statistics.median(workers):.3f} ms, "
          f"{statistics.median(faults):.0f} page faults")  # fmt: skip


def _touch(mib: int) -> float:
    """Map `mib` MiB of anonymous memory, write one byte per page, unmap it:
    microseconds per page."""
    size = mib << 20
    t0 = time.perf_counter()
    with mmap.mmap(-1, size) as memory:
        for offset in range(0, size, mmap.PAGESIZE):
            memory[offset] = 1
    return (time.perf_counter() - t0) / (size // mmap.PAGESIZE) * 1e6


def fresh_memory(n: int, mib_per_worker: int = 3) -> None:
    """A start of `n` eager workers as it comes, then right after this process
    touched (and freed) what they need: in a VM whose balloon takes back freed
    memory (free page reporting), a page the host no longer backs costs a
    host fault on its first write, which a worker's copy-on-write pays and a
    bare fork, which writes almost nothing, does not."""
    print(f"start of {n} eager workers, as it comes and with its memory backed beforehand:")
    for label in ("as it comes", "memory backed"):
        if label == "memory backed":
            cost = _touch(n * mib_per_worker)
            print(f"  (touched {n * mib_per_worker} MiB first: {cost:.1f} us per page)")
        wall, _, gen, workers, _ = _started(n)
        print(f"  {label:14} all ready after {wall * 1000:5.0f} ms; CPU per worker "
              f"{statistics.median(workers):.3f} ms, per fork of the generation "
              f"{gen / n:.3f} ms")  # fmt: skip


def _supervisor_pid(pool: bgpool.Pool) -> int:
    from .costs import supervisor_process

    return int(supervisor_process(pool).pid)


def _uss_kib(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_full_info().uss // 1024)


def memory_split() -> None:
    def probe(modules: list[str], forks_after: int = 0) -> int:
        command = [sys.executable, str(FORK_PROBE), str(forks_after), *modules]
        env = {**os.environ, "PYTHONPATH": str(SCRIPTS)}
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout is not None
            child = int(proc.stdout.readline())
            time.sleep(0.2)
            uss = _uss_kib(child)
            os.kill(child, signal.SIGKILL)
            return uss
        finally:
            proc.kill()
            proc.wait()

    generation = ["bgpool.worker.zygote", "bench_workers"]
    rows: list[tuple[str, Callable[[], int]]] = [
        ("child of a plain interpreter, doing nothing", lambda: probe([])),
        ("... of one that imported threading", lambda: probe(["threading"])),
        ("... of one that imported what a generation does", lambda: probe(generation)),
        ("... the same, once its parent forked again", lambda: probe(generation, 1)),
        ("a bgpool idle worker", _idle_worker_uss),
    ]
    print("USS of a forked child:")
    for label, measure in rows:
        print(f"  {label:52} {measure()} KiB")


def _idle_worker_uss() -> int:
    with running([bgpool.WorkerSpec(name="e", target=IDLE, num=4)]) as pool:
        time.sleep(0.3)
        return int(statistics.median(_uss_kib(s.pid) for s in pool.status() if s.pid))


def main() -> None:
    cold_path(20)
    crash_path(10)
    start_split(256)
    fresh_memory(1000)
    memory_split()


if __name__ == "__main__":
    main()

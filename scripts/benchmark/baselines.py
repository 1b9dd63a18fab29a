"""The baselines: what each case's bgpool row is compared with, measured the same
way in the same run. Bare children (multiprocessing's fork context) with a pipe
handshake and a stop pipe stand for a supervisor with nothing to do; `dict.get()`
for an in-process lookup; multiprocessing's Event and Manager dict for the shared
state a Python user would reach for first. (vars_read's baseline, `pickle.loads`,
is measured beside bgpool's decoding in vars_cases, in the same loop.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench_workers

from .channels import FORK, in_child, polling_reader, wait_file
from .costs import uss_mib
from .harness import Bench, add_visibility, after_warmup, per_call_us

# ------------------------------------------------------------------ bare forks


def _bare_child(ready_w: int, stop_r: int, inherited: list[int], report_w: int | None) -> None:
    """The baseline's trivial function: handshake, then wait on the stop pipe.
    A byte (not EOF) on it means "crash": stamp the wall clock and exit 1."""
    for fd in inherited:  # our own and older siblings' stop pipes' write ends
        os.close(fd)
    os.write(ready_w, b"r")
    if os.read(stop_r, 1) and report_w is not None:
        os.write(report_w, str(time.time_ns()).encode())
        os._exit(1)


class Bare:
    """Children forked with multiprocessing, each with a handshake pipe and a
    stop pipe, like a supervisor's workers."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.stops: list[int] = []
        self.readies: list[int] = []

    def start(self, report_w: int | None = None) -> int:
        """Start one child; return the read end of its handshake pipe."""
        ready_r, ready_w = os.pipe()
        stop_r, stop_w = os.pipe()
        self.stops.append(stop_w)
        proc = FORK.Process(
            target=_bare_child, args=(ready_w, stop_r, list(self.stops), report_w), daemon=True
        )
        proc.start()
        os.close(ready_w)
        os.close(stop_r)
        self.procs.append(proc)
        self.readies.append(ready_r)
        return ready_r

    def start_ready(self, count: int) -> None:
        """Start `count` children, one after the other, then read every handshake."""
        readers = [self.start() for _ in range(count)]
        for fd in readers:
            os.read(fd, 1)

    def stop(self) -> None:
        """Close every stop pipe (EOF), join every child."""
        for fd in self.stops:
            os.close(fd)
        for proc in self.procs:
            proc.join(30)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        for fd in self.readies:
            os.close(fd)
        self.procs, self.stops, self.readies = [], [], []


def bare_start_ms(count: int) -> float:
    """Fork `count` children, read every handshake; ms from the first fork to the
    last handshake. The children are stopped afterwards (not timed)."""
    bare = Bare()
    try:
        t0 = time.perf_counter_ns()
        bare.start_ready(count)
        return (time.perf_counter_ns() - t0) / 1e6
    finally:
        bare.stop()


def cold_ensure(bench: Bench) -> None:
    samples = after_warmup(bench.config.reps, lambda: bare_start_ms(1))
    subject = "baseline: multiprocessing fork + pipe handshake"
    bench.add("cold_ensure", subject, "baseline", samples)


def batch_ensure(bench: Bench) -> None:
    n = bench.config.batch
    samples = after_warmup(bench.config.batch_reps, lambda: bare_start_ms(n))
    subject = f"baseline: {n} forks + handshakes"
    bench.add("batch_ensure", subject, "baseline", samples, {"names": n})


def _crash_to_ready_ms() -> float:
    """The parent reads the crash stamp, reaps, forks anew, reads the new child's
    handshake."""
    report_r, report_w = os.pipe()
    bare = Bare()
    try:
        os.read(bare.start(report_w), 1)
        os.write(bare.stops[0], b"c")  # crash now
        crashed_at = int(os.read(report_r, 64))
        bare.procs[0].join()
        os.read(bare.start(), 1)
        return (time.time_ns() - crashed_at) / 1e6
    finally:
        bare.stop()
        os.close(report_r)
        os.close(report_w)


def crash_to_ready(bench: Bench) -> None:
    samples = after_warmup(bench.config.reps, _crash_to_ready_ms)
    bench.add("crash_to_ready", "baseline: reap + fork + handshake", "baseline", samples)


def drain(bench: Bench, n: int, params: dict[str, Any]) -> None:
    samples = []
    for _ in range(bench.config.drain_reps):
        bare = Bare()
        try:
            bare.start_ready(n)
        except BaseException:
            bare.stop()
            raise
        t0 = time.perf_counter_ns()
        bare.stop()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    bench.add("drain", f"baseline: close {n} stop pipes, join all", "baseline", samples, params)


def reload_cold_ensure(bench: Bench) -> None:
    """cold_ensure's baseline, again, for the reload_cold_ensure rows."""
    samples = after_warmup(bench.config.reload_reps, lambda: bare_start_ms(1))
    subject = "baseline: multiprocessing fork + pipe handshake"
    bench.add("reload_cold_ensure", subject, "baseline", samples)


_FORK_FLOOR = """
import os, sys
pid = os.fork()
if pid == 0:
    os.read(0, 1)  # EOF: the benchmark closed stdin
    os._exit(0)
sys.stdout.write(f"{pid}\\n")
sys.stdout.flush()
os.read(0, 1)
os.waitpid(pid, 0)
"""


def worker_uss(bench: Bench, count: int = 5, settle_s: float = 0.5) -> None:
    """The floor of a forked worker's USS: `count` plain `python -c` processes
    (no bgpool, no benchmark) each os.fork() a child that waits on stdin; the
    children's USS once they have idled `settle_s`."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pids = []
        for _ in range(count):
            proc = subprocess.Popen(
                [sys.executable, "-c", _FORK_FLOOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            procs.append(proc)
            assert proc.stdout is not None
            pids.append(int(proc.stdout.readline()))
        time.sleep(settle_s)
        samples = uss_mib(pids)
    finally:
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()  # the parent and its child both read EOF and exit
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    subject = "baseline: bare os.fork() child of a plain python"
    bench.add("worker_uss", subject, "baseline", samples, {"processes": count})


def scale(bench: Bench, params: dict[str, Any]) -> None:
    n = bench.config.scale
    samples = [bare_start_ms(n) / 1000 for _ in range(bench.config.scale_reps)]
    bench.add("scale", f"baseline: {n} forks + handshakes", "baseline", samples, params)


# ------------------------------------------------------------- in-process lookup


def hot_ensure_owner(bench: Bench) -> None:
    calls = bench.config.calls
    table = {"hot": True}
    samples = per_call_us(table.get, ("hot",), calls, bench.config.batches)
    subject = "baseline: dict.get()"
    bench.add("hot_ensure_owner", subject, "baseline", samples, {"calls_per_sample": calls})


# ------------------------------------------------------------ multiprocessing


def _event_per_call(event: Any, calls: int, batches: int) -> list[float]:
    return per_call_us(event.is_set, (), calls, batches)


def hot_ensure_client(bench: Bench) -> None:
    c = bench.config
    event = FORK.Event()
    event.set()
    samples = in_child(_event_per_call, event, c.calls, c.batches)
    subject = "baseline: multiprocessing Event.is_set()"
    bench.add("hot_ensure_client", subject, "baseline", samples, {"calls_per_sample": c.calls})


_MANAGER_READ = "baseline: Manager().dict() read"


def _manager_per_call(shared: Any, calls: int, batches: int) -> list[float]:
    return per_call_us(shared.__getitem__, ("snap",), calls, batches)


def get_vars_owner(bench: Bench, shared: Any) -> None:
    """`shared`: a Manager dict whose "snap" is the snapshot bgpool publishes."""
    c = bench.config
    samples = _manager_per_call(shared, c.rpc_calls, c.batches)
    params = {"calls_per_sample": c.rpc_calls}
    bench.add("get_vars_owner", _MANAGER_READ, "baseline", samples, params)


def get_vars_client(bench: Bench, shared: Any) -> None:
    c = bench.config
    samples = in_child(_manager_per_call, shared, c.rpc_calls, c.batches)
    params = {"calls_per_sample": c.rpc_calls}
    bench.add("get_vars_client", _MANAGER_READ, "baseline", samples, params)


def set_vars(bench: Bench, shared: Any) -> None:
    """Manager dict writes of distinct snapshots, 1 ms apart, timed here."""
    samples = []
    base = bench_workers.snapshot(0)
    for seq in range(1, bench.config.vars_count + 1):
        snap = dict(base)
        snap["seq"] = seq
        time.sleep(0.001)
        t0 = time.perf_counter_ns()
        shared["snap"] = snap
        samples.append((time.perf_counter_ns() - t0) / 1000)
    subject = "baseline: Manager().dict() write (1 ms apart)"
    bench.add("set_vars", subject, "baseline", samples, {"gap_ms": 1})


def _manager_reader(shared: Any, first: int, count: int, out: Path) -> None:
    """Runs in a forked child: poll the Manager dict until publication
    `first + count - 1`, stamping each new seq when it is first seen."""
    seen: dict[int, int] = {}
    last = shared["snap"]["seq"]
    bench_workers.write_atomic(f"{out}.ready", "1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seq = shared["snap"]["seq"]
        if seq != last:
            seen[seq] = time.monotonic_ns()
            last = seq
            if seq == first + count - 1:
                break
    bench_workers.write_atomic(str(out), json.dumps(seen))


def visibility(bench: Bench, shared: Any, vars_dir: Path) -> None:
    """This process writes the Manager dict 5 ms apart, a forked child polls it."""
    count = bench.config.vis_count
    first = 1_000_000
    seen_path = vars_dir / "mgr-seen.json"
    base = bench_workers.snapshot(0)
    with polling_reader(_manager_reader, (shared, first, count), seen_path):
        returned = {}
        for seq in range(first, first + count):
            snap = dict(base)
            snap["seq"] = seq
            time.sleep(0.005)
            shared["snap"] = snap
            returned[seq] = time.monotonic_ns()
        seen = {int(k): v for k, v in wait_file(seen_path, 60).items()}
    subject = "baseline: Manager().dict() write -> read elsewhere"
    add_visibility(bench, subject, "baseline", returned, seen, {"gap_ms": 5})

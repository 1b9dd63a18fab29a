"""The bare floors: each worker case's physical limit, measured in the same run
from two helper processes (floor_helper.py's program), beside the case's
baseline. "sized" is a process of a bgpool supervisor's size (it first imports
bgpool.supervisor.main, what the supervisor has loaded), "clean" a plain
`python -c` with nothing imported. Both do what the case asks of a supervisor
with os.fork() and one-byte pipe handshakes, and nothing else: fork +
handshake (cold), reap + fork + handshake (crash), N forks (start), close N
stop pipes and reap N (drain). The multiprocessing baselines are neither: they
fork this process (the benchmark, bgpool and the peers' clients loaded, so not
the supervisor's size) and add multiprocessing's own work to every fork.

A row of each floor is recorded before the case's baseline; harness.Bench
sets every later row's ratio to both (ratio_to_bare_sized, ratio_to_bare_clean)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

import bgpool

from .cases import IDLE, raise_nofile_limit, running
from .costs import MIB, supervisor_process
from .harness import Bench, after_warmup
from .targets import CASES

SOURCE = (Path(__file__).parent / "floor_helper.py").read_text()
ROOT = Path(bgpool.__file__).resolve().parent.parent  # what the sized helper imports from
KINDS = {"sized": "bare_sized", "clean": "bare_clean"}
LABELS = {"sized": "bare, supervisor-sized", "clean": "bare, clean python"}


class Floor:
    """One helper process: started, asked for timed requests, stopped."""

    def __init__(self, size: str) -> None:
        self.size = size
        args = [sys.executable, "-c", SOURCE, size, *([str(ROOT)] if size == "sized" else [])]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self._line() != "ok":
            raise RuntimeError(f"the {size} floor helper did not start")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, op: str, *args: int) -> float:
        """The milliseconds the helper measured for one request."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join([op, *map(str, args)]) + "\n")
        self.proc.stdin.flush()
        reply = self._line()
        try:
            return float(reply)
        except ValueError:
            raise RuntimeError(f"{self.size} floor helper, {op} {args}: {reply!r}") from None

    def rss_mib(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss / MIB)

    def close(self) -> None:
        """EOF on its stdin: it exits (its children are stopped after each request)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _supervisor_rss_mib() -> tuple[float, list[float]]:
    """The RSS of a bgpool supervisor with one idle ready worker, and of its
    children other than the worker (its code generations, which fork workers)."""
    with running([bgpool.WorkerSpec(name="one", target=IDLE, num=1)]) as pool:
        supervisor = supervisor_process(pool)
        workers = {s.pid for s in pool.status()}
        others = [c for c in supervisor.children() if c.pid not in workers]
        return supervisor.memory_info().rss / MIB, [c.memory_info().rss / MIB for c in others]


@contextlib.contextmanager
def floors(bench: Bench) -> Iterator[list[Floor]]:
    """Both helpers for a block (the sized one first). Records their RSS in
    supervisor_rss, as reference rows beside a real supervisor's, and prints it."""
    raise_nofile_limit()  # inherited: a helper holds a pipe per child of 1,000
    started: list[Floor] = []
    try:
        for size in KINDS:
            started.append(Floor(size))
        sized, clean = (floor.rss_mib() for floor in started)
        supervisor, generations = _supervisor_rss_mib()
        gens = ", ".join(f"{g:.1f}" for g in generations) or "none"
        print(
            f"  (floor helpers' RSS: supervisor-sized {sized:.1f} MiB, clean {clean:.1f} MiB; "
            f"a bgpool supervisor with one worker: {supervisor:.1f} MiB, its code "
            f"generation(s): {gens} MiB)",
            flush=True,
        )
        for floor, rss in zip(started, (sized, clean), strict=True):
            subject = f"{LABELS[floor.size]} floor helper"
            extra = {"bgpool_supervisor_mib": supervisor, "bgpool_generations_mib": generations}
            bench.add("supervisor_rss", subject, "reference", [rss], extra=extra)
        yield started
    finally:
        for floor in started:
            floor.close()


def add_rows(
    bench: Bench,
    helpers: list[Floor],
    case: str,
    what: str,
    request: tuple[Any, ...],
    reps: int,
    params: dict[str, Any] | None = None,
    *,
    per: int = 1,
    warmup: bool = True,
) -> None:
    """A row of each floor for `case`: `reps` samples (after a warm-up, unless
    the helpers are warm already and a sample is long) of the helper's
    `request`, each divided by `per` (cost per worker), in seconds where the
    case's unit is."""
    scale = 1000.0 if CASES[case].unit == "s" else 1.0
    for floor in helpers:

        def measure(f: Floor = floor) -> float:
            return f.ask(*request) / per / scale

        samples = after_warmup(reps, measure) if warmup else [measure() for _ in range(reps)]
        params_ = {**(params or {}), "helper_rss_mib": round(floor.rss_mib(), 1)}
        bench.add(case, f"{LABELS[floor.size]}: {what}", KINDS[floor.size], samples, params_)

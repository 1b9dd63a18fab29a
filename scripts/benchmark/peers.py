"""What the cases measure of the peers (daemons.PEERS: supervisord, circus, pm2),
each through its own requests (daemons.Daemon): a status round trip
(hot_ensure_client); starting its lazy process until the request returned and
the process's first line ran (cold_ensure); its own restart of a process that
crashed after its first line, from the crash trigger until the new process's
first line ran (crash_to_ready); starting a group of N until every first line
ran (scale, start_scaling); stopping them until the request returned (drain);
and its idle cost with N idle processes (at --workers). Every wait is bounded
by the run's peer_timeout_s, and groups larger than peer_max_workers are not
started: a peer that fails, or would take longer, is skipped with the reason,
and the run goes on."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psutil

from .channels import drain_fd, wait_bytes, wait_readable
from .costs import add_idle_costs
from .daemons import PEERS, Daemon, Setup, peer
from .harness import Bench, after_warmup
from .targets import CASES

T = TypeVar("T")
SETTLE_S = 1.0  # how long a group idles before its daemon's idle cost is measured


def _measure(
    bench: Bench, kind: type[Daemon], what: str, setup: Setup, measure: Callable[[Daemon], T]
) -> T | None:
    """`measure(daemon)` on a `kind` daemon run for it, or None when the peer
    is skipped: not available, or `measure` failed (the reason printed)."""
    label = f"{kind.NAME} ({what})"
    with peer(bench, kind, label, setup) as daemon:
        if daemon is None:
            return None
        try:
            return measure(daemon)
        except Exception as exc:
            bench.skip(label, f"it failed or took too long here: {type(exc).__name__}: {exc}")
            return None


def _each(bench: Bench, what: str, setup: Setup, measure: Callable[[Daemon], Any]) -> None:
    for kind in PEERS:
        _measure(bench, kind, what, setup, measure)


def _ms_since(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


# --------------------------------------------------------- one process at a time


def _hot(bench: Bench, daemon: Daemon) -> None:
    c = bench.config
    samples, calls = daemon.hot_per_call(c.rpc_calls, c.batches)
    params = {"calls_per_sample": calls}
    bench.add("hot_ensure_client", daemon.SUBJECTS["hot"], "peer", samples, params)


def _first_line_ms(daemon: Daemon) -> float:
    """ms from asking `daemon` to start its lazy process until the request
    returned and the process's first line ran; then it is stopped (not timed)."""
    drain_fd(daemon.fifo)
    t0 = time.perf_counter_ns()
    daemon.start_lazy()
    wait_readable(daemon.fifo, daemon.timeout, f"the {daemon.NAME} worker's first line")
    elapsed = _ms_since(t0)
    daemon.stop_lazy()
    return elapsed


def _cold(bench: Bench, daemon: Daemon) -> None:
    samples = after_warmup(bench.config.reps, lambda: _first_line_ms(daemon))
    bench.add("cold_ensure", daemon.SUBJECTS["cold"], "peer", samples)


def hot_and_cold(bench: Bench, hot: bool, cold: bool) -> None:
    """hot_ensure_client's and cold_ensure's rows of every peer (one daemon each)."""

    def measure(daemon: Daemon) -> None:
        if hot:
            _hot(bench, daemon)
        if cold:
            _cold(bench, daemon)

    _each(bench, "hot, cold", Setup(), measure)


def _restart_ms(daemon: Daemon) -> float:
    """ms from the crash trigger (a byte on the daemon's trigger FIFO: the
    worker reads it and exits 1) until the restarted worker's first line ran."""
    drain_fd(daemon.fifo)
    t0 = time.perf_counter_ns()
    os.write(daemon.trigger, b"c")
    wait_readable(daemon.fifo, daemon.timeout, f"the restarted {daemon.NAME} worker's first line")
    return _ms_since(t0)


def _crash(bench: Bench, daemon: Daemon) -> None:
    wait_readable(daemon.fifo, daemon.timeout, f"the {daemon.NAME} crash worker's first line")
    samples = after_warmup(bench.config.peer_reps, lambda: _restart_ms(daemon))
    note = "from writing the trigger to the restarted process's first line"
    bench.add("crash_to_ready", daemon.SUBJECTS["crash"], "peer", samples, note=note)


def crash_to_ready(bench: Bench) -> None:
    _each(bench, "crash", Setup(hot_and_lazy=False, crash=True), lambda d: _crash(bench, d))


# ------------------------------------------------------------------ groups of N


def _start_group_ms(daemon: Daemon, n: int) -> float:
    """ms from asking `daemon` to start its group of `n` until every first line ran."""
    drain_fd(daemon.fifo)
    t0 = time.perf_counter_ns()
    daemon.start_group()
    wait_bytes(daemon.fifo, n, daemon.timeout, f"{daemon.NAME}'s {n} first lines")
    return _ms_since(t0)


def _stop_group_ms(daemon: Daemon) -> float:
    t0 = time.perf_counter_ns()
    daemon.stop_group()
    elapsed = _ms_since(t0)
    daemon.forget_group()
    return elapsed


def _add_start_row(bench: Bench, daemon: Daemon, case: str, n: int, samples: list[float]) -> None:
    """A start row: in seconds (scale) or in ms per process (start_scaling)."""
    per_process = CASES[case].unit == "ms/worker"
    values = [ms / n if per_process else ms / 1000 for ms in samples]
    subject = daemon.SUBJECTS["start"].format(n=n) + (", per process" if per_process else "")
    bench.add(case, subject, "peer", values, {"workers": n})


def _group(
    bench: Bench,
    daemon: Daemon,
    start_case: str | None,
    drain: bool,
    idle_costs: bool,
    reps: int,
) -> float:
    """`reps` starts of the daemon's group until every first line ran, each
    stopped again (drain: timed) but for the last without `drain`; rows for
    those `start_case` and `drain` ask for (and, the first time with
    `idle_costs`, the idle daemon's). The median start in seconds."""
    n = daemon.setup.group
    params = {"workers": n}
    starts, stops = [], []
    for rep in range(reps):
        starts.append(_start_group_ms(daemon, n))
        if rep == 0 and idle_costs:
            time.sleep(SETTLE_S)
            add_idle_costs(
                bench,
                "peer",
                psutil.Process(daemon.supervisor_pid()),
                f"{daemon.NAME}, {n} idle processes",
                daemon.worker_pids,
                f"{daemon.NAME} idle worker (python)",
                params,
            )
        if drain or rep + 1 < reps:  # (the last start of start_scaling: close() stops it)
            stops.append(_stop_group_ms(daemon))
    if start_case is not None:
        _add_start_row(bench, daemon, start_case, n, starts)
    if drain:
        bench.add("drain", daemon.SUBJECTS["drain"].format(n=n), "peer", stops, params)
    return statistics.median(starts) / 1000


def _too_many(bench: Bench, n: int) -> str | None:
    limit = bench.config.peer_max_workers
    return (
        f"{n} processes is more than this run starts under a peer ({limit})" if n > limit else None
    )


def groups(
    bench: Bench,
    n: int,
    reps: int,
    *,
    start_case: str | None,
    drain: bool,
    idle_costs: bool = False,
) -> None:
    """Every peer's group of `n`, started and stopped `reps` times: the rows of
    `start_case` (its start), of the drain (its stop), of its idle cost."""
    what = f"{n} processes"
    if (reason := _too_many(bench, n)) is not None:
        bench.skip(f"the peers ({what})", reason)
        return
    setup = Setup(hot_and_lazy=False, group=n)
    _each(bench, what, setup, lambda d: _group(bench, d, start_case, drain, idle_costs, reps))


def start_scaling(bench: Bench, sizes: tuple[int, ...]) -> None:
    """Every peer's start of a group of each of `sizes` (one daemon each), once
    (a start of N is a mean over N already, and the peers' starts take seconds
    to a minute), in ms per process; a size its smaller one says would exceed
    the time bound (the cost per process the same) is skipped."""
    bound = bench.config.peer_timeout_s
    for kind in PEERS:
        last_n, last_s = 1, 0.0  # the last size measured and its start, in seconds
        for n in sorted(sizes):
            what = f"start_scaling, {n} processes"
            predicted = last_s * n / last_n
            reason = _too_many(bench, n)
            if reason is None and predicted > bound:
                reason = f"its start of {last_n} predicts {predicted:.0f} s, over {bound:.0f} s"
            if reason is not None:
                bench.skip(f"{kind.NAME} ({what})", reason)
                break
            setup = Setup(hot_and_lazy=False, group=n)
            seconds = _measure(
                bench,
                kind,
                what,
                setup,
                lambda d: _group(bench, d, "start_scaling", False, False, 1),
            )
            if seconds is None:
                break
            last_n, last_s = n, seconds

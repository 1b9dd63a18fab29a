"""The run: which cases run (--only) and in which order, and what the cases of a
phase share (the steady pool of a ready "hot" worker and the "pub" publisher, the
peer daemons, the Manager dict, the temp dir, the bare floors' helper processes,
which run for the whole run). Each phase records a case's bare floors, then its
baseline, then bgpool, then the peers, so that every row's ratios are to the
floors, the baseline and bgpool's row recorded before it (of the same N). The
peers' daemons run for their rows only (peers.py: one per peer and phase, or per
N). A phase that fails is recorded as an error, with its traceback printed, and
the run goes on with the next."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_workers

import bgpool

from . import (
    asgi_cases,
    baselines,
    cases,
    floors,
    peers,
    policy_cases,
    reload_cases,
    vars_cases,
)
from .channels import FORK
from .config import Config
from .harness import Bench

HOT_CASES = ("hot_ensure_owner", "hot_ensure_client")
VARS_CASES = ("get_vars_owner", "get_vars_client", "set_vars", "vars_visibility")
IDLE_CASES = ("drain", "idle_cpu", "supervisor_rss")  # (and the peer's worker_uss row)
FLOOR_CASES = (
    "cold_ensure",
    "batch_ensure",
    "crash_to_ready",
    "reload_cold_ensure",
    "drain",
    "scale",
    "start_scaling",
)  # the cases with bare floors (floors.py): their helpers run while any of these does


def _hot_ensure(bench: Bench, steady: bgpool.Pool) -> None:
    baselines.hot_ensure_owner(bench)
    cases.hot_ensure_owner(bench, steady)
    baselines.hot_ensure_client(bench)
    cases.hot_ensure_client(bench, steady)


def _vars(bench: Bench, steady: bgpool.Pool, vars_dir: Path) -> None:
    manager = FORK.Manager()
    fifo = os.open(vars_dir / "publisher.fifo", os.O_WRONLY)
    try:
        shared = manager.dict()
        shared["snap"] = bench_workers.snapshot(0)
        baselines.get_vars_owner(bench, shared)
        vars_cases.get_vars_owner(bench, steady)
        baselines.get_vars_client(bench, shared)
        vars_cases.get_vars_client(bench, steady)
        baselines.set_vars(bench, shared)
        vars_cases.set_vars(bench, fifo, vars_dir)
        baselines.visibility(bench, shared, vars_dir)
        vars_cases.visibility(bench, steady, fifo, vars_dir)
    finally:
        os.close(fifo)
        manager.shutdown()


def _cold_ensure(bench: Bench, helpers: list[floors.Floor]) -> None:
    floors.add_rows(bench, helpers, "cold_ensure", "fork + handshake", ("cold",), bench.config.reps)
    baselines.cold_ensure(bench)
    cases.cold_ensure(bench)


def _batch(bench: Bench, helpers: list[floors.Floor]) -> None:
    n = bench.config.batch
    what, reps = f"{n} forks + handshakes", bench.config.batch_reps
    floors.add_rows(bench, helpers, "batch_ensure", what, ("start", n), reps, {"names": n})
    baselines.batch_ensure(bench)
    cases.batch_ensure(bench)


def _crash(bench: Bench, helpers: list[floors.Floor]) -> None:
    what, reps = "reap + fork + handshake", bench.config.reps
    floors.add_rows(bench, helpers, "crash_to_ready", what, ("crash",), reps)
    baselines.crash_to_ready(bench)
    cases.crash_to_ready(bench)
    peers.crash_to_ready(bench)


def _reload_cold_ensure(bench: Bench, helpers: list[floors.Floor]) -> None:
    what, reps = "fork + handshake", bench.config.reload_reps
    floors.add_rows(bench, helpers, "reload_cold_ensure", what, ("cold",), reps)
    baselines.reload_cold_ensure(bench)
    reload_cases.reload_cold_ensure(bench)


def _worker_uss(bench: Bench) -> None:
    baselines.worker_uss(bench)
    cases.worker_uss(bench)


def _drain(bench: Bench, helpers: list[floors.Floor], n: int, *, idle_costs: bool) -> None:
    """The drain of `n`: its floors, its baseline, bgpool's (with `idle_costs`,
    the idle supervisor's rows first)."""
    params = {"workers": n}
    what, reps = f"close {n} stop pipes, reap {n}", bench.config.drain_reps
    floors.add_rows(bench, helpers, "drain", what, ("drain", n), reps, params)
    baselines.drain(bench, n, params)
    cases.drain(bench, n, params, idle_costs=idle_costs)


def _idle_and_drain(bench: Bench, helpers: list[floors.Floor]) -> None:
    n = bench.config.workers
    _drain(bench, helpers, n, idle_costs=True)
    peers.groups(
        bench, n, bench.config.peer_drain_reps, start_case=None, drain=True, idle_costs=True
    )


def _scale(bench: Bench, helpers: list[floors.Floor], start: bool, drain: bool) -> None:
    """At --scale N: with `start`, the scale case (start N); with `drain`, the
    drain of N; then the peers' start and stop of a group of N (one daemon for
    both rows)."""
    n = bench.config.scale
    params = {"workers": n, "nofile": cases.raise_nofile_limit()}
    if start:
        what, reps = f"{n} forks + handshakes", bench.config.scale_reps
        floors.add_rows(bench, helpers, "scale", what, ("start", n), reps, params)
        baselines.scale(bench, params)
        cases.scale(bench, params)
    if drain:
        _drain(bench, helpers, n, idle_costs=False)
    start_case = "scale" if start else None
    peers.groups(bench, n, bench.config.scale_reps, start_case=start_case, drain=drain)


def _start_scaling(bench: Bench, helpers: list[floors.Floor]) -> None:
    """Per N: the floors' N forks, then bgpool's N eager workers (per worker).
    The floors' helpers are warm by then (no warm-up sample: 1,000 forks take
    a second or more)."""
    cases.raise_nofile_limit()
    cases.warm_start(min(bench.config.start_sizes))
    for n in bench.config.start_sizes:
        params = {"workers": n}
        what, reps = f"{n} forks + handshakes, per fork", bench.config.start_reps
        request = ("start", n)
        floors.add_rows(
            bench, helpers, "start_scaling", what, request, reps, params, per=n, warmup=False
        )
        cases.start_eager(bench, n)
    cases.start_linearity(bench)
    peers.start_scaling(bench, bench.config.start_sizes)


def _steady_pool(vars_dir: Path) -> bgpool.Pool:
    """A ready worker for the hot cases and the publisher for the vars cases."""
    return cases.pool_of(
        [
            bgpool.WorkerSpec(name="hot", target=cases.IDLE, num=1),
            bgpool.WorkerSpec(
                name="pub",
                target="bench_workers:publisher",
                num=1,
                ready_on="vars",
                env={"BENCH_DIR": str(vars_dir)},
            ),
        ]
    )


def run(config: Config, only: set[str] | None) -> tuple[Bench, dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="bgbench-"))
    bench = Bench(config, tmp)
    started = time.monotonic()

    def wanted(*ids: str) -> bool:
        return only is None or bool(only & set(ids))

    def phase(title: str, function: Callable[..., None], *args: Any) -> None:
        print(f"== {title}", flush=True)
        try:
            function(*args)
        except Exception as exc:
            bench.errors.append(f"{title}: {type(exc).__name__}: {exc}")
            print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()

    stack = contextlib.ExitStack()  # the floors' helpers, for the whole run
    helpers_cm = floors.floors(bench) if wanted(*FLOOR_CASES) else contextlib.nullcontext([])
    try:
        helpers = stack.enter_context(helpers_cm)
        vars_dir = Path(tempfile.mkdtemp(prefix="vars-", dir=tmp))
        os.mkfifo(vars_dir / "publisher.fifo", 0o600)
        if wanted(*HOT_CASES, *VARS_CASES):
            steady = _steady_pool(vars_dir)
            steady.start()
            try:
                if wanted(*HOT_CASES):
                    phase("hot ensure()", _hot_ensure, bench, steady)
                if wanted(*VARS_CASES):
                    phase("get_vars() / set_vars() / visibility", _vars, bench, steady, vars_dir)
            finally:
                steady.shutdown()
        if wanted("cold_ensure"):
            phase("cold ensure()", _cold_ensure, bench, helpers)
        if wanted("hot_ensure_client", "cold_ensure"):
            hot, cold = wanted("hot_ensure_client"), wanted("cold_ensure")
            phase("hot and cold ensure(): peers", peers.hot_and_cold, bench, hot, cold)
        if wanted("vars_read"):
            phase("decode and read a new snapshot", vars_cases.vars_read, bench)
        if wanted("asgi_requests"):
            title = "requests/s of a uvicorn app, with and without the bgpool calls"
            phase(title, asgi_cases.asgi_requests, bench)
        if wanted("batch_ensure"):
            phase(f"batch ensure() of {config.batch} names", _batch, bench, helpers)
        if wanted("crash_to_ready"):
            phase("crash to ready again", _crash, bench, helpers)
        if wanted("edit_to_new_code"):
            phase("edit a module -> new code ready", reload_cases.edit_to_new_code, bench)
        if wanted("reload_cold_ensure"):
            phase(
                "cold ensure() before and after a new generation",
                _reload_cold_ensure,
                bench,
                helpers,
            )
        if wanted("rolling_ready"):
            title = f"ready instances during a rolling restart of {reload_cases.ROLLING_NUM}"
            phase(title, reload_cases.rolling_ready, bench)
        if wanted("worker_uss"):
            phase(f"idle worker USS, {cases.USS_WORKERS} workers", _worker_uss, bench)
        if wanted(*IDLE_CASES):
            phase(f"idle cost and drain, {config.workers} workers", _idle_and_drain, bench, helpers)
        if wanted("idle_cost_policies"):
            title = f"idle cost without and with every lifecycle policy, {config.workers} workers"
            phase(title, policy_cases.idle_cost_policies, bench)
        if wanted("scale", "drain"):
            title = f"start and drain of {config.scale} workers"
            phase(title, _scale, bench, helpers, wanted("scale"), wanted("drain"))
        if wanted("start_scaling"):
            sizes = ", ".join(map(str, config.start_sizes))
            phase(f"start scaling: {sizes} eager workers", _start_scaling, bench, helpers)
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    bench.finish()
    return bench, {"duration_s": round(time.monotonic() - started, 1)}

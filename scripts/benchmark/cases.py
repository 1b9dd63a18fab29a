"""bgpool's worker cases, through the public API: ensure() of a ready worker (in
the owner and in another process) and of a lazy one, a batch of catch-all names,
a crash until the restarted run is ready, shutdown() of idle workers and the idle
supervisor's cost, starting N workers, and how the cost of starting N eager
workers grows with N. The workers are bench_workers' trivial
targets, so what is measured is bgpool."""

from __future__ import annotations

import functools
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bgpool

from .channels import in_child, make_fifo, wait_until
from .costs import add_idle_costs, supervisor_process, uss_mib
from .harness import Bench, after_warmup, per_call_us

IDLE = "bench_workers:idle"  # takes its handle, waits for the stop signal


def pool_of(workers: list[bgpool.WorkerSpec], **kwargs: Any) -> bgpool.Pool:
    """A pool with generous timeouts: a loaded machine must not fail a case."""
    kwargs.setdefault("ensure_timeout", 120.0)
    kwargs.setdefault("grace_period", 10.0)
    return bgpool.Pool(bgpool.PoolConfig(workers=workers, **kwargs))


@contextmanager
def running(workers: list[bgpool.WorkerSpec]) -> Iterator[bgpool.Pool]:
    """A started pool for a block, shut down afterwards (neither is timed)."""
    pool = pool_of(workers)
    pool.start()
    try:
        yield pool
    finally:
        pool.shutdown()


def ready_count(pool: bgpool.PoolClient, name: str | None = None) -> int:
    return sum(1 for s in pool.status() if s.state == "ready" and (name is None or s.name == name))


def client_per_call(address: str, what: str, name: str, calls: int, batches: int) -> list[float]:
    """Runs in a forked child: per_call_us() of connect()'s ensure or get_vars."""
    client = bgpool.connect(address)
    try:
        fn = client.ensure if what == "ensure" else client.get_vars
        fn(name)
        return per_call_us(fn, (name,), calls, batches)
    finally:
        client.close()


def add_owner_per_call(
    bench: Bench, case: str, subject: str, fn: Callable[[str], Any], name: str
) -> None:
    """The row of `fn(name)` per call, in this process (the pool's owner)."""
    c = bench.config
    samples = per_call_us(fn, (name,), c.calls, c.batches)
    bench.add(case, subject, "bgpool", samples, {"calls_per_sample": c.calls})


def add_client_per_call(
    bench: Bench, case: str, subject: str, address: str, what: str, name: str
) -> None:
    """The row of `connect(address).<what>(name)` per call, in a forked child."""
    c = bench.config
    samples = in_child(client_per_call, address, what, name, c.calls, c.batches)
    bench.add(case, subject, "bgpool", samples, {"calls_per_sample": c.calls})


def hot_ensure_owner(bench: Bench, steady: bgpool.Pool) -> None:
    add_owner_per_call(bench, "hot_ensure_owner", "bgpool Pool.ensure()", steady.ensure, "hot")


def hot_ensure_client(bench: Bench, steady: bgpool.Pool) -> None:
    subject = "bgpool connect().ensure()"
    add_client_per_call(bench, "hot_ensure_client", subject, steady.address, "ensure", "hot")


def _cold_ensure_ms() -> float:
    with running([bgpool.WorkerSpec(name="lazy", target=IDLE)]) as pool:
        t0 = time.perf_counter_ns()
        pool.ensure("lazy")
        return (time.perf_counter_ns() - t0) / 1e6


def cold_ensure(bench: Bench) -> None:
    samples = after_warmup(bench.config.reps, _cold_ensure_ms)
    subject = "bgpool Pool.ensure() (a fresh pool each time)"
    bench.add("cold_ensure", subject, "bgpool", samples)


def batch_ensure(bench: Bench) -> None:
    n = bench.config.batch
    names = [f"tenant-{i}" for i in range(n)]

    def once() -> float:
        with running([bgpool.WorkerSpec(target=IDLE, max_instances=n)]) as pool:
            t0 = time.perf_counter_ns()
            pool.ensure(names)
            return (time.perf_counter_ns() - t0) / 1e6

    samples = after_warmup(bench.config.batch_reps, once)
    subject = f"bgpool Pool.ensure([{n} catch-all names])"
    bench.add("batch_ensure", subject, "bgpool", samples, {"names": n})


def _crash(pool: bgpool.Pool, directory: Path, name: str) -> tuple[Any, Any]:
    """Make `name` ready, trigger its crash; its status before and once the
    restarted run is ready."""
    trigger = make_fifo(directory / f"{name}.fifo")
    try:
        pool.ensure(name)
        (old,) = [s for s in pool.status() if s.name == name]

        def restarted() -> Any:
            return next(
                (s for s in pool.status()
                 if s.name == name and s.state == "ready" and s.pid != old.pid),
                None,
            )  # fmt: skip

        os.write(trigger, b"c")
        new = wait_until(restarted, 30, f"{name} to be ready again", poll=0.001)
    finally:
        os.close(trigger)
    return old, new


def _stamps(log: Path, new_pid: int | None) -> Any:
    """The (kind, pid) -> (monotonic_ns, time_ns) lines of a crash worker's log,
    once the new run's "ready" line is there: that run logs it after
    get_worker_handle() returned, possibly after the supervisor marked it ready."""
    found = {}
    for line in log.read_text().splitlines():
        if len(fields := line.split()) == 4:  # (a line being written: later)
            kind, pid, mono, wall = fields
            found[(kind, int(pid))] = (int(mono), int(wall))
    return found if ("ready", new_pid) in found else None


def crash_to_ready(bench: Bench) -> None:
    """A new catch-all name per sample, so that each crash is a first crash (no
    backoff); the first sample is a warm-up."""
    reps = bench.config.reps
    directory = Path(tempfile.mkdtemp(prefix="crash-", dir=bench.tmp))
    spec = bgpool.WorkerSpec(
        target="bench_workers:crash_on_trigger",
        max_instances=reps + 1,
        env={"BENCH_DIR": str(directory)},
    )
    pool = pool_of([spec])
    pool.start()
    samples, to_handle, to_spawn = [], [], []
    try:
        for rep in range(reps + 1):
            name = f"crash-{rep}"
            old, new = _crash(pool, directory, name)
            log = directory / f"{name}.log"
            stamps = wait_until(functools.partial(_stamps, log, new.pid), 10, f"{name}'s log")
            crash_mono, crash_wall = stamps[("crash", old.pid)]
            ready_mono, _ = stamps[("ready", new.pid)]
            samples.append((new.ready_at.timestamp() * 1e9 - crash_wall) / 1e6)
            to_handle.append((ready_mono - crash_mono) / 1e6)
            to_spawn.append((new.started_at.timestamp() * 1e9 - crash_wall) / 1e6)
    finally:
        pool.shutdown()
        shutil.rmtree(directory, ignore_errors=True)
    bench.add(
        "crash_to_ready",
        "bgpool: crash -> restarted run ready in the table",
        "bgpool",
        samples[1:],
        note="to the supervisor's ready_at stamp (wall clock)",
        extra={
            # the supervisor's started_at stamp (wall clock, right after the fork)
            "crash_to_respawn_ms": to_spawn[1:],
            # the new run's own stamp right after get_worker_handle() returned
            "crash_to_new_run_handle_ms": to_handle[1:],
        },
    )


def _drain_ms(bench: Bench, n: int, params: dict[str, Any], *, idle_costs: bool) -> float:
    """ms for shutdown() of a fresh pool of `n` idle ready workers; with
    `idle_costs`, the idle supervisor's rows first."""
    pool = pool_of([bgpool.WorkerSpec(name="idle", target=IDLE, num=n)])
    pool.start()
    try:
        wait_until(lambda: ready_count(pool) == n, 120, f"{n} ready workers")
        if idle_costs:
            supervisor = supervisor_process(pool)
            time.sleep(0.5)  # let start-up settle
            add_idle_costs(
                bench,
                "bgpool",
                supervisor,
                f"bgpool supervisor, {n} idle workers",
                lambda: [s.pid for s in pool.status() if s.pid],
                None,  # bgpool's worker_uss: worker_uss() below
                params,
            )
    finally:
        t0 = time.perf_counter_ns()
        pool.shutdown()
        elapsed = (time.perf_counter_ns() - t0) / 1e6
    return elapsed


def drain(bench: Bench, n: int, params: dict[str, Any], *, idle_costs: bool) -> None:
    """`n` idle ready workers: with `idle_costs`, the supervisor's idle cost
    (the first pool only); then shutdown() of all of them, a fresh pool per
    sample."""
    samples = [
        _drain_ms(bench, n, params, idle_costs=idle_costs and rep == 0)
        for rep in range(bench.config.drain_reps)
    ]
    subject = f"bgpool Pool.shutdown() of {n} idle workers"
    bench.add("drain", subject, "bgpool", samples, params)


USS_WORKERS = 16  # idle workers whose USS worker_uss measures
SETTLE_S = 0.5  # how long processes idle before their USS is read


def worker_uss(bench: Bench) -> None:
    """The USS of USS_WORKERS idle ready workers of one pool, read once they
    have idled SETTLE_S: a row of all of them (median) and one of the largest."""
    n = USS_WORKERS
    with running([bgpool.WorkerSpec(name="idle", target=IDLE, num=n)]) as pool:
        wait_until(lambda: ready_count(pool) == n, 60, f"{n} ready workers")
        time.sleep(SETTLE_S)
        samples = uss_mib([s.pid for s in pool.status() if s.pid])
    if len(samples) != n:
        raise RuntimeError(f"read the USS of {len(samples)} workers of {n}")
    params = {"count": n}
    subject = f"bgpool idle worker (forked), each of {n}"
    bench.add("worker_uss", subject, "bgpool", samples, params)
    bench.add("worker_uss", f"bgpool idle worker, the largest of {n}", "reference", [max(samples)])


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _start_all(n: int, names: list[str]) -> tuple[float, dict[str, Any]]:
    """Seconds for start() plus ensure() of every name, and what happened."""
    spec = bgpool.WorkerSpec(target=IDLE, max_instances=n)
    pool = pool_of([spec], ensure_timeout=600.0, grace_period=30.0)
    run: dict[str, Any] = {"success": False}
    t0 = time.perf_counter_ns()
    try:
        pool.start()
        t1 = time.perf_counter_ns()
        pool.ensure(names, timeout=600)
        t2 = time.perf_counter_ns()
        ready = ready_count(pool)
        run.update(success=ready == n, ready=ready, start_s=(t1 - t0) / 1e9)
        run["ensure_s"] = (t2 - t1) / 1e9
        seconds = (t2 - t0) / 1e9
    except Exception as exc:
        run["error"] = f"{type(exc).__name__}: {exc}"
        seconds = (time.perf_counter_ns() - t0) / 1e9
    finally:
        t3 = time.perf_counter_ns()
        pool.shutdown()
        run["shutdown_s"] = (time.perf_counter_ns() - t3) / 1e9
    return seconds, run


def scale(bench: Bench, params: dict[str, Any]) -> None:
    n = bench.config.scale
    names = [f"w{i}" for i in range(n)]
    samples, runs = [], []
    for _ in range(bench.config.scale_reps):
        seconds, run = _start_all(n, names)
        samples.append(seconds)
        runs.append(run)
    success = all(r["success"] for r in runs)
    failures = "; ".join(str(r.get("error", r)) for r in runs if not r["success"])
    bench.add(
        "scale",
        f"bgpool start() + ensure({n} names)",
        "bgpool",
        samples,
        params,
        note="" if success else f"FAILED: {failures}",
        extra={"success": success, "runs": runs},
    )


def _eager_start(n: int) -> tuple[float, float]:
    """ms from Pool.start() of a pool of `n` eager idle instances until all `n`
    are ready in the table (start() returns at the first), and ms of its
    shutdown()."""
    pool = pool_of([bgpool.WorkerSpec(name="eager", target=IDLE, num=n)], ensure_timeout=600.0)
    t0 = time.perf_counter_ns()
    try:
        pool.start()
        wait_until(lambda: ready_count(pool) == n, 600, f"{n} ready workers", poll=0.002)
        elapsed = (time.perf_counter_ns() - t0) / 1e6
    finally:
        t1 = time.perf_counter_ns()
        pool.shutdown()
        drained = (time.perf_counter_ns() - t1) / 1e6
    return elapsed, drained


def warm_start(n: int) -> None:
    """One start of `n` eager workers, not recorded: the first pool of a series
    pays for cold caches."""
    _eager_start(n)


def start_eager(bench: Bench, n: int) -> None:
    """start_scaling's row for `n`: ms per worker until all `n` are ready."""
    runs = [_eager_start(n) for _ in range(bench.config.start_reps)]
    bench.add(
        "start_scaling",
        f"bgpool start() of {n} eager workers, per worker",
        "bgpool",
        [total / n for total, _ in runs],
        {"workers": n},
        extra={"total_ms": [t for t, _ in runs], "shutdown_ms": [d for _, d in runs]},
    )


def start_linearity(bench: Bench) -> None:
    """Each start_scaling row's total (median) as a multiple of the smallest N's,
    beside N's own multiple (linear): in the row's extra, its note and printed."""
    rows = [r for r in bench.rows if r.case == "start_scaling" and r.kind == "bgpool"]
    first = min(rows, key=lambda r: r.params["workers"])
    for row in rows:
        n, n0 = row.params["workers"], first.params["workers"]
        total_x = row.median * n / (first.median * n0)
        row.extra["total_x_smallest"] = total_x
        row.note = f"total {total_x:.1f}x that of {n0} (linear: {n / n0:.0f}x)"
        print(f"  (start_scaling: {n} workers cost {row.note})", flush=True)

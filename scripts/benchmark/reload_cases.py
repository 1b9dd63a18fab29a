"""bgpool's reload cases, through the public API: an edited module running after
`restart_workers()` (beside a cold ensure() of the same module and the time a
fresh interpreter takes to import it), cold ensure() of a lazy module and script
target before and after a new code generation, and how many instances of a pool
stay ready during a rolling restart (the table read every millisecond from
another thread). The edited module is written into the run's temp dir (put on
sys.path for the pool's supervisor), one version string per edit."""

from __future__ import annotations

import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

import bgpool

from .cases import IDLE, pool_of, ready_count
from .channels import wait_until
from .costs import supervisor_process
from .daemons import WORKERS_SCRIPT
from .harness import Bench, after_warmup

MODULE = "bench_reload_target"  # the edited module (its own temp dir on sys.path)
ROLLING_NUM = 8  # instances of the rolling_ready pool
SAMPLE_GAP_S = 0.001  # the rolling_ready sampler's period

_SOURCE = '''"""A module bgpool's benchmark edits (scripts/benchmark/reload_cases.py)."""

import os

VERSION = @VERSION@


def run() -> None:
    """Publish the version, take the handle (ready once both are done, ready_on
    "vars"), wait for the stop signal."""
    import bgpool

    bgpool.set_vars({"version": VERSION, "pid": os.getpid()})
    bgpool.get_worker_handle().wait()
'''


def write_module(directory: Path, version: str) -> Path:
    """(Re)write the module with `version`, in place, as an editor saves it."""
    path = directory / f"{MODULE}.py"
    path.write_text(_SOURCE.replace("@VERSION@", repr(version)))
    return path


@contextlib.contextmanager
def on_sys_path(directory: Path) -> Iterator[None]:
    """`directory` first on sys.path for a block: PoolConfig checks module
    targets with it and start() hands it to the supervisor."""
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def generations(pool: bgpool.PoolClient) -> list[int]:
    """The numbers of the pool's code generations alive now (the supervisor's
    children named bgpool-gen<N>)."""
    found = []
    for child in supervisor_process(pool).children():
        with contextlib.suppress(psutil.Error):
            if match := re.fullmatch(r"bgpool-gen(\d+)", child.name()):
                found.append(int(match[1]))
    return sorted(found)


# ------------------------------------------------------------ edit_to_new_code


def _cold_module_ensure_ms() -> float:
    spec = bgpool.WorkerSpec(name="lazy", target=f"{MODULE}:run", ready_on="vars")
    pool = pool_of([spec])
    pool.start()
    try:
        t0 = time.perf_counter_ns()
        pool.ensure("lazy")
        return (time.perf_counter_ns() - t0) / 1e6
    finally:
        pool.shutdown()


def _python(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter in `directory` (on its sys.path for -c), no .pyc:
    the module is compiled each time, as a generation does after an edit."""
    shutil.rmtree(directory / "__pycache__", ignore_errors=True)
    return subprocess.run(
        [sys.executable, "-B", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def _importtime_ms(directory: Path) -> float:
    """The module's cumulative line of `-X importtime` (its own imports included)."""
    err = _python(directory, "-X", "importtime", "-c", f"import {MODULE}").stderr
    for line in err.splitlines():
        fields = [f.strip() for f in line.removeprefix("import time:").split("|")]
        if len(fields) == 3 and fields[2] == MODULE:
            return int(fields[1]) / 1000
    raise RuntimeError(f"no -X importtime line for {MODULE}: {err[-400:]}")


def _wall_ms(directory: Path, code: str) -> float:
    t0 = time.perf_counter_ns()
    _python(directory, "-c", code)
    return (time.perf_counter_ns() - t0) / 1e6


def _edit_and_restart(pool: bgpool.Pool, directory: Path, version: str) -> tuple[float, float]:
    """Edit the module to `version`, restart_workers(["edited"]); ms from the
    edit until the call returned and the new version was read back, and until
    the call returned."""
    t0 = time.perf_counter_ns()
    write_module(directory, version)
    pool.restart_workers(["edited"])
    returned = time.perf_counter_ns()
    wait_until(
        lambda: pool.get_vars("edited")["version"] == version,
        30,
        f"version {version} to be published",
        poll=0.0002,
    )
    done = time.perf_counter_ns()
    return (done - t0) / 1e6, (returned - t0) / 1e6


def edit_to_new_code(bench: Bench) -> None:
    """Rows: a cold ensure() of the module (the baseline), its import in a fresh
    interpreter, the budget (import + 2 x cold ensure), then edit -> new code."""
    reps = bench.config.reload_reps
    directory = Path(tempfile.mkdtemp(prefix="edit-", dir=bench.tmp))
    try:
        write_module(directory, "v0")
        with on_sys_path(directory):
            cold = after_warmup(reps, _cold_module_ensure_ms)
            subject = "baseline: bgpool cold ensure() of the module (fresh pool)"
            bench.add("edit_to_new_code", subject, "baseline", cold)
            imports = after_warmup(reps, lambda: _importtime_ms(directory))
            bare = [_wall_ms(directory, "pass") for _ in range(reps + 1)][1:]
            full = [_wall_ms(directory, f"import {MODULE}") for _ in range(reps + 1)][1:]
            difference = statistics.median(full) - statistics.median(bare)
            bench.add(
                "edit_to_new_code",
                "import of the module, fresh interpreter (-X importtime)",
                "reference",
                imports,
                note="compiled from source (no .pyc), as after an edit",
                extra={
                    "python_c_import_minus_pass_ms": round(difference, 3),
                    "python_c_pass_ms": bare,
                    "python_c_import_ms": full,
                },
            )
            print(
                f"  (python -c 'import {MODULE}' minus python -c pass: {difference:.2f} ms, "
                f"medians of {reps} runs each)",
                flush=True,
            )
            budget = statistics.median(imports) + 2 * statistics.median(cold)
            bench.add(
                "edit_to_new_code", "budget: import + 2 x cold ensure()", "reference", [budget]
            )
            spec = bgpool.WorkerSpec(name="edited", target=f"{MODULE}:run", num=1, ready_on="vars")
            pool = pool_of([spec])
            pool.start()
            try:
                assert pool.get_vars("edited")["version"] == "v0"
                samples, returned = [], []
                for rep in range(1, reps + 2):
                    total, call = _edit_and_restart(pool, directory, f"v{rep}")
                    samples.append(total)
                    returned.append(call)
                live = generations(pool)
            finally:
                pool.shutdown()
        bench.add(
            "edit_to_new_code",
            "bgpool edit -> restart_workers() -> new version read",
            "bgpool",
            samples[1:],
            note="until restart_workers() returned and get_vars() showed the new VERSION",
            extra={"restart_workers_returned_ms": returned[1:], "generations_alive": live},
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------- reload_cold_ensure


def _reload_pool(script: str) -> bgpool.Pool:
    """A running module worker and a running script worker (so that
    restart_workers() has instances to move to a new generation) and a lazy
    worker of each target."""
    return pool_of(
        [
            bgpool.WorkerSpec(name="keep-module", target=IDLE, num=1),
            bgpool.WorkerSpec(name="keep-script", target=script, args=["idle"], num=1),
            bgpool.WorkerSpec(name="lazy-module", target=IDLE),
            bgpool.WorkerSpec(name="lazy-script", target=script, args=["idle"]),
        ]
    )


def _lazy_pair_ms(*, restarted: bool) -> tuple[float, float, list[int]]:
    """A fresh pool (after restart_workers() if `restarted`): ms of the cold
    ensure() of the lazy module worker, then of the lazy script worker, and the
    generations alive afterwards."""
    pool = _reload_pool(WORKERS_SCRIPT)
    pool.start()
    try:
        if restarted:
            pool.restart_workers()
        t0 = time.perf_counter_ns()
        pool.ensure("lazy-module")
        t1 = time.perf_counter_ns()
        pool.ensure("lazy-script")
        t2 = time.perf_counter_ns()
        live = generations(pool)
    finally:
        pool.shutdown()
    if restarted and (not live or max(live) < 2):
        raise RuntimeError(f"restart_workers() loaded no new generation (alive: {live})")
    return (t1 - t0) / 1e6, (t2 - t1) / 1e6, live


def reload_cold_ensure(bench: Bench) -> None:
    """Per sample a fresh pool; the first sample of each series is a warm-up."""
    reps = bench.config.reload_reps
    for restarted, when in ((False, "first generation"), (True, "after restart_workers()")):
        runs = [_lazy_pair_ms(restarted=restarted) for _ in range(reps + 1)][1:]
        for index, what in ((0, "module target"), (1, "script target (.py)")):
            bench.add(
                "reload_cold_ensure",
                f"bgpool cold ensure(), {what}, {when}",
                "bgpool",
                [run[index] for run in runs],
                {"generation": "new" if restarted else "first"},
                extra={"generations_alive": [run[2] for run in runs]},
            )


# --------------------------------------------------------------- rolling_ready


class ReadySampler:
    """A thread that counts `name`'s ready instances in `pool.status()` (a
    shared-memory read, no round trip) every SAMPLE_GAP_S, while it runs."""

    def __init__(self, pool: bgpool.PoolClient, name: str) -> None:
        self.pool, self.name = pool, name
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ready-sampler", daemon=True)

    def _run(self) -> None:
        """On a fixed schedule (a slow read or a late wake-up is caught up on,
        not added to every later period)."""
        tick = time.monotonic()
        while not self._stop.is_set():
            self.counts.append(ready_count(self.pool, self.name))
            tick += SAMPLE_GAP_S
            time.sleep(max(0.0, tick - time.monotonic()))

    def __enter__(self) -> ReadySampler:
        self._thread.start()
        wait_until(lambda: self.counts, 10, "the first ready count", poll=0.0005)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def rolling_ready(bench: Bench) -> None:
    """A pool of ROLLING_NUM idle instances: per sample, the fewest ready ones
    the sampler saw over 100 ms of nothing happening (the baseline), then during
    a restart_workers() of them."""
    reps, n = bench.config.reload_reps, ROLLING_NUM
    pool = pool_of([bgpool.WorkerSpec(name="rolling", target=IDLE, num=n)])
    pool.start()
    steady: list[dict[str, Any]] = []
    rolling: list[dict[str, Any]] = []
    try:
        wait_until(lambda: ready_count(pool, "rolling") == n, 60, f"{n} ready instances")
        for _ in range(reps + 1):
            with ReadySampler(pool, "rolling") as sampler:
                time.sleep(0.1)
            steady.append({"min": min(sampler.counts), "samples": len(sampler.counts)})
            with ReadySampler(pool, "rolling") as sampler:
                t0 = time.perf_counter_ns()
                pool.restart_workers(["rolling"])
                elapsed = (time.perf_counter_ns() - t0) / 1e6
            rolling.append(
                {"min": min(sampler.counts), "samples": len(sampler.counts), "ms": elapsed}
            )
            wait_until(lambda: ready_count(pool, "rolling") == n, 60, f"{n} ready again")
        live = generations(pool)
    finally:
        pool.shutdown()
    steady, rolling = steady[1:], rolling[1:]
    params = {"workers": n, "sample_gap_ms": SAMPLE_GAP_S * 1000}
    bench.add(
        "rolling_ready",
        "baseline: fewest ready, 100 ms with nothing happening",
        "baseline",
        [s["min"] for s in steady],
        params,
        extra={"status_samples": [s["samples"] for s in steady]},
    )
    counts = [r["samples"] for r in rolling]
    lowest = min(r["min"] for r in rolling)
    bench.add(
        "rolling_ready",
        "bgpool fewest ready during restart_workers()",
        "bgpool",
        [r["min"] for r in rolling],
        params,
        note=f"min {lowest} over {sum(counts)} status() samples",
        extra={
            "status_samples": counts,
            "restart_workers_ms": [r["ms"] for r in rolling],
            "generations_alive": live,
        },
    )
    ms = statistics.median(r["ms"] for r in rolling)
    print(
        f"  (rolling_ready: {len(rolling)} restarts of {n}, {sum(counts)} status() samples "
        f"(per restart: {min(counts)}-{max(counts)}), fewest ready {lowest}; "
        f"restart_workers() median {ms:.0f} ms)",
        flush=True,
    )

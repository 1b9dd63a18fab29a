"""What the lifecycle policies cost an idle supervisor (idle_cost_policies): N
idle ready workers without any policy, then N that set every one of them
(boot_timeout, heartbeat_timeout with workers that `tick(1.0)`, max_restarts,
max_memory, max_lifetime), each measured as idle_cpu is (the supervisor's CPU
over the idle window, as % of one core, from /proc's schedstat where there is
one: finer than cpu_times' clock ticks)."""

from __future__ import annotations

import time
from typing import Any

import bgpool

from .cases import IDLE, pool_of, ready_count
from .channels import wait_until
from .costs import idle_cost, supervisor_process
from .harness import Bench

TICKING = "bench_workers:ticking"  # takes its handle, then tick(1.0) until stopped

POLICIES: dict[str, Any] = {
    "boot_timeout": 60.0,
    "heartbeat_timeout": 5.0,
    "max_restarts": 5,
    "max_memory": 1 << 30,  # 1 GiB: sampled, never reached
    "max_lifetime": 24 * 3600.0,  # a timer per instance, never due in the window
}
"""Every policy on, none of them ever acting during the window."""


def idle_cost_policies(bench: Bench) -> None:
    """The two rows: without policies (workers wait on their handle), and with
    every policy on (workers heartbeat through tick(1.0))."""
    n = bench.config.workers
    params = {"workers": n, **POLICIES}
    for subject, spec in (
        (f"bgpool supervisor, {n} idle workers, no policy", bgpool.WorkerSpec(
            name="idle", target=IDLE, num=n)),
        (f"bgpool supervisor, {n} idle workers, every policy", bgpool.WorkerSpec(
            name="idle", target=TICKING, num=n, **POLICIES)),
    ):  # fmt: skip
        pool = pool_of([spec])
        pool.start()
        try:
            wait_until(lambda p=pool: ready_count(p) == n, 120, f"{n} ready workers")
            supervisor = supervisor_process(pool)
            time.sleep(1.0)  # let start-up settle (and every worker's first beats pass)
            cpu, extra = idle_cost(supervisor, bench.config.idle_seconds)
            # schedstat's ns, not cpu_times' 10 ms ticks: a fraction of a percent shows
            sample = extra.get("schedstat_pct", cpu)
            bench.add("idle_cost_policies", subject, "bgpool", [sample], params, extra=extra)
        finally:
            pool.shutdown()

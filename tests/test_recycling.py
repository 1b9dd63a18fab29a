"""Recycling (SPEC, "Lifecycle policies"): `max_memory` and `max_lifetime` with
`lifetime_jitter` trigger a graceful restart (drain, then respawn), rolling in a
pool, recorded in diagnostics (`last_recycle_reason`), in `status()` and in
`bgpool_worker_recycles_total{reason=...}`. Real processes; workers are
``fixtures.policy_workers``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import gone, statuses, wait_for
from test_policies import metric, noted_pool, start_lines, status_command

MakePool = Callable[..., Any]

MiB = 1 << 20


def test_a_worker_past_max_memory_is_recycled(make_pool: MakePool, sentinel_dir: Path) -> None:
    """Only the instance over the limit is recycled, gracefully (no crash), and
    its pool keeps a ready instance."""
    pool, starts = noted_pool(
        make_pool, sentinel_dir, "hog", "memory_hog", num=2, max_memory=96 * MiB,
        env={"ONCE": str(sentinel_dir / "once"), "HOG_BYTES": str(192 * MiB)},
    )  # fmt: skip
    wait_for(lambda: len(start_lines(starts)) == 2, 10, "both instances started")
    hog = [pid for pid, _, _ in start_lines(starts)]

    def recycled() -> Any:
        found = [s for s in statuses(pool, "hog") if s.recycles]
        return found[0] if found and found[0].state == "ready" else None

    status = wait_for(recycled, 15, "the instance over max_memory recycled")
    assert status.last_recycle_reason == "memory"
    assert status.pid not in hog
    assert sum(gone(pid) for pid in hog) == 1  # the other one kept running
    assert [s.recycles for s in statuses(pool, "hog")].count(0) == 1
    diag = pool.diagnostics("hog")
    assert diag.last_recycle_reason == "memory"
    assert diag.last_error is None  # a recycle is not a failure
    assert metric(pool, "bgpool_worker_recycles_total", "hog", reason="memory") == 1
    assert metric(pool, "bgpool_worker_recycles_total", "hog", reason="lifetime") == 0
    assert metric(pool, "bgpool_worker_crashes_total", "hog") == 0
    assert metric(pool, "bgpool_worker_restarts_total", "hog") == 1
    shown = status_command(pool)
    assert f"hog.{status.instance}: recycled once (last: memory)" in shown.stdout, shown.stdout
    shown = status_command(pool, "diagnostics", "hog")
    assert "recycled:     last for memory" in shown.stdout, shown.stdout


@pytest.mark.parametrize("jitter", [0.5, 0.0])
def test_max_lifetime_recycles_a_pool_at_distinct_times_rolling(
    make_pool: MakePool, sentinel_dir: Path, jitter: float
) -> None:
    """Each instance is recycled once its (jittered) lifetime is over, one at a
    time: at every moment we look, at most one instance of the pool is not
    ready. Without jitter, every instance comes due at once: only the rolling
    spreads them."""
    num = 3
    pool, _ = noted_pool(
        make_pool, sentinel_dir, "aging", "idle_until_stopped", num=num, max_lifetime=1.5,
        lifetime_jitter=jitter,
    )  # fmt: skip
    spawned: dict[int, dict[int, float]] = {i: {} for i in range(num)}  # by pid: started_at
    up, looks, deadline = False, 0, time.monotonic() + 20
    while True:
        now = statuses(pool, "aging")
        for s in now:
            if s.pid is not None and s.started_at is not None:
                spawned[s.instance].setdefault(s.pid, s.started_at.timestamp())
        ready = sum(s.state == "ready" for s in now)
        up = up or ready == num  # from when all were ready at once (spawn starts slowly)
        if up:
            looks += 1
            assert ready >= num - 1, now
        if all(s.recycles >= 1 and s.state == "ready" for s in now):
            break
        assert time.monotonic() < deadline, f"not every instance was recycled: {now}"
        time.sleep(0.002)
    assert looks > 50  # we looked often enough for a gap to be seen
    assert all(s.last_recycle_reason == "lifetime" for s in now)
    replaced = []
    for runs in spawned.values():  # each instance's first run and its replacement
        first, second = sorted(runs.values())[:2]
        assert second - first >= 1.5, spawned  # not before its lifetime was over
        replaced.append(second)
    times = sorted(replaced)
    assert all(b > a for a, b in itertools.pairwise(times)), times
    assert pool.diagnostics("aging").last_recycle_reason == "lifetime"
    assert metric(pool, "bgpool_worker_recycles_total", "aging", reason="lifetime") >= num
    assert metric(pool, "bgpool_worker_crashes_total", "aging") == 0


def test_a_single_instance_is_recycled_by_drain_then_respawn(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    pool, starts = noted_pool(
        make_pool, sentinel_dir, "solo", "idle_until_stopped", num=1, max_lifetime=0.5,
        lifetime_jitter=0,
    )  # fmt: skip
    wait_for(lambda: len(start_lines(starts)) >= 3, 10, "two recycles")
    pids = [pid for pid, _, _ in start_lines(starts)]
    assert len(set(pids)) == len(pids)
    pool.ensure("solo", timeout=5)  # readiness stays sticky
    assert metric(pool, "bgpool_worker_recycles_total", "solo", reason="lifetime") >= 2
    assert pool.diagnostics("solo").last_error is None


def test_a_recycle_waits_while_no_other_instance_of_the_pool_is_ready(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    """Instance 1 is down (crashing at every boot): instance 0's lifetime passes,
    but recycling it would leave the pool with no ready instance, so it waits."""
    pool, starts = noted_pool(
        make_pool, sentinel_dir, "pair", "second_falls_over", num=2, max_lifetime=1.0,
        lifetime_jitter=0, max_consecutive_failures=-1, env={"ONCE": str(sentinel_dir / "once")},
    )  # fmt: skip
    first = next(s.pid for s in statuses(pool, "pair") if s.instance == 0)
    # instance 1's attempts, paced by the backoff, take well over instance 0's 1 s
    wait_for(lambda: [i for _, i, _ in start_lines(starts)].count(1) >= 6, 20, "six attempts")
    zero = next(s for s in statuses(pool, "pair") if s.instance == 0)
    assert (zero.state, zero.pid, zero.recycles) == ("ready", first, 0)

"""Churn: many cycles of start, ensure, crash, restart_workers and shutdown in one
process; the process's file descriptors, threads and children are the same at the
end as at the start, and every pool's own resources (table, vars segments, socket,
directory) are gone after its cycle, and still gone at the end.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import psutil
import pytest
from helpers import (
    LeakCheck,
    Resources,
    assert_clean,
    fd_count,
    state,
    the_status,
    thread_count,
    wait_for,
)

import bgpool


def _config() -> bgpool.PoolConfig:
    return bgpool.PoolConfig(
        grace_period=5.0,
        ensure_timeout=10.0,
        workers=[
            bgpool.WorkerSpec(name="eager", target="fixtures.workers:crashable", num=1),
            bgpool.WorkerSpec(name="lazy", target="fixtures.workers:crashable"),
            bgpool.WorkerSpec(target="fixtures.workers:idle", max_instances=2),
        ],
    )


def _cycle(config: bgpool.PoolConfig, check: LeakCheck) -> Resources:
    pool = bgpool.Pool(config)
    try:
        pool.start()
        res = check.track(pool)
        pool.ensure(["lazy", "tenant"])
        # crash: one worker raises (SIGUSR1), another is SIGKILLed
        crashed, killed = the_status(pool, "eager").pid, the_status(pool, "lazy").pid
        os.kill(crashed, signal.SIGUSR1)
        os.kill(killed, signal.SIGKILL)

        def restarted(name: str) -> bool:
            row = the_status(pool, name)
            return state(row.state) == "ready" and row.pid not in (crashed, killed)

        wait_for(lambda: restarted("eager") and restarted("lazy"), what="both restarted")
        assert pool.diagnostics("eager").last_exit_status == 1
        assert pool.diagnostics("lazy").last_signal == "SIGKILL"
        before = {s.name: s.pid for s in pool.status()}
        pool.restart_workers()
        after = {s.name: s.pid for s in pool.status()}
        assert set(before) == set(after) and not set(before.values()) & set(after.values())
        pool.ensure(["eager", "lazy", "tenant"])
    finally:
        pool.shutdown()
    assert_clean(res)
    return res


def _snapshot() -> dict[str, Any]:
    me = psutil.Process()
    return {
        "fds": fd_count(),
        "threads": threading.active_count(),
        "tasks": thread_count(),
        "children": len(me.children(recursive=True)),
    }


def _churn(cycles: int, check: LeakCheck) -> None:
    config = _config()
    start = _snapshot()
    t0 = time.monotonic()
    pools = [_cycle(config, check) for _ in range(cycles)]
    elapsed = time.monotonic() - t0
    end = _snapshot()
    assert end["fds"] == start["fds"], (start, end)
    assert end["threads"] == start["threads"], (start, end)
    # OS threads too: a joined thread's OS task ends a moment after join() returns,
    # and the interpreter's helpers (pytest's faulthandler watchdog) come and go
    # between tests, so wait briefly, and only growth counts.
    wait_for(
        lambda: thread_count() <= start["tasks"],
        timeout=2.0,
        what=f"OS threads back to {start['tasks']} (now {thread_count()})",
    )
    assert end["children"] == start["children"] == 0, (start, end)
    # no segment of any cycle's pool came back (/dev/shm is shared with whatever else
    # runs here: only our pools' segments count)
    assert not [left for res in pools for left in res.left_behind()]
    assert "BGPOOL_ADDRESS" not in os.environ
    assert elapsed / cycles < 2.0, f"{elapsed / cycles:.2f}s per cycle"


def test_churn_quick(no_leaks: LeakCheck) -> None:
    _churn(10, no_leaks)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_churn_200_cycles(no_leaks: LeakCheck) -> None:
    _churn(200, no_leaks)

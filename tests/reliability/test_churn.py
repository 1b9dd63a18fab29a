"""Issue 7, item 5: churn. Many cycles of start, ensure, crash, restart_workers and
shutdown in one process; the process's file descriptors, threads, children and the
``/dev/shm`` segments are the same at the end as at the start, and every pool's
own resources (table, vars segments, socket, directory) are gone after its cycle.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import psutil
import pytest
from helpers import shm_in_use_by_others, state, wait_for

import bgpool

from .relutil import (
    assert_clean,
    fd_count,
    resources,
    shm_entries,
    thread_count,
)


def _config() -> bgpool.PoolConfig:
    return bgpool.PoolConfig(
        grace_period=5.0,
        ensure_timeout=10.0,
        workers=[
            bgpool.WorkerSpec(name="eager", target="fixtures.rel_workers:crashable", num=1),
            bgpool.WorkerSpec(name="lazy", target="fixtures.rel_workers:crashable"),
            bgpool.WorkerSpec(target="fixtures.rel_workers:steady", max_instances=2),
        ],
    )


def _the(pool: Any, name: str) -> Any:
    (row,) = [s for s in pool.status() if s.name == name]
    return row


def _cycle(config: bgpool.PoolConfig) -> None:
    pool = bgpool.Pool(config)
    try:
        pool.start()
        res = resources(pool)
        pool.ensure(["lazy", "tenant"])
        # crash: one worker raises (SIGUSR1), another is SIGKILLed
        crashed, killed = _the(pool, "eager").pid, _the(pool, "lazy").pid
        os.kill(crashed, signal.SIGUSR1)
        os.kill(killed, signal.SIGKILL)
        wait_for(
            lambda: all(
                state(_the(pool, n).state) == "ready" and _the(pool, n).pid not in (crashed, killed)
                for n in ("eager", "lazy")
            ),
            what="both restarted",
        )
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


def _snapshot() -> dict[str, Any]:
    me = psutil.Process()
    return {
        "fds": fd_count(),
        "threads": threading.active_count(),
        "tasks": thread_count(),
        "children": len(me.children(recursive=True)),
        "shm": shm_entries(),
    }


def _churn(cycles: int) -> None:
    config = _config()
    start = _snapshot()
    t0 = time.monotonic()
    for _ in range(cycles):
        _cycle(config)
    elapsed = time.monotonic() - t0
    end = _snapshot()
    foreign = shm_in_use_by_others()
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
    # /dev/shm is shared with whatever else runs here: segments that other processes
    # have mapped (another test run) come and go; nothing else may be new.
    assert not (end["shm"] - start["shm"]) - foreign, sorted(end["shm"] - start["shm"])
    assert "BGPOOL_ADDRESS" not in os.environ
    assert elapsed / cycles < 2.0, f"{elapsed / cycles:.2f}s per cycle"


def test_churn_quick(no_leaks: None) -> None:
    _churn(10)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_churn_200_cycles(no_leaks: None) -> None:
    _churn(200)

"""SIGKILL the supervisor while workers run, boot, back off and drain. Every worker
exits within 2 s of the kill, including one that ignores its handle and SIGTERM
(``hostile:ignores_everything``) and one whose grandchild started its own session
(``hostile:forks_session_leader``); the application's ``Pool`` then raises
``PoolClosed("pool is closed")`` on every call, and ``shutdown()`` still removes
everything the pool owned (table, vars segments, socket, directory): the
owner removes them as soon as it sees the supervisor die, before ``shutdown()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ROOT,
    Background,
    Resources,
    assert_clean,
    assert_pool_closed,
    describe,
    gone,
    kill_all,
    live_children,
    notes,
    procs_with_address,
    raises_closed,
    reaping,
    resources,
    spec,
    starts,
    state,
    subprocess_env,
    wait_all_gone,
    wait_for,
)

import bgpool

DEATH_BOUND = 2.0
"""Seconds from the supervisor's SIGKILL by which every process of the pool is gone."""


def _workers(notes_dir: Path, *extra: bgpool.WorkerSpec) -> list[bgpool.WorkerSpec]:
    env = {"NOTES": str(notes_dir)}
    return [
        spec("plain", "idle", num=2),
        bgpool.WorkerSpec(
            name="deaf", target="fixtures.hostile:ignores_everything", num=1, env=env
        ),
        bgpool.WorkerSpec(
            name="forker", target="fixtures.hostile:forks_session_leader", num=1, env=env
        ),
        spec("lazy", "idle"),
        spec(None, "idle", max_instances=4),
        *extra,
    ]


def _pids(pool: Any) -> list[int]:
    return [s.pid for s in pool.status() if s.pid is not None]


def _grandchild(notes_dir: Path) -> int:
    found = wait_for(lambda: notes(notes_dir, "grandchild"), what="the setsid grandchild")
    assert len(found) == 1, found
    return found[0]


def _state_of(pool: Any, name: str) -> str:
    return state(next(s.state for s in pool.status() if s.name == name))


def _kill_supervisor_and_check(
    pool: Any, res: Resources, pids: list[int], blocked: Sequence[tuple[Background, str]] = ()
) -> None:
    """SIGKILL the supervisor; check that the pool's processes are gone within
    DEATH_BOUND, that blocked calls and every later call raise PoolClosed (a new
    client finds no pool listening), and that shutdown() cleans what the supervisor
    could not (the shared memory and the socket at once, before shutdown())."""
    with reaping(lambda: res.address):
        t0 = time.monotonic()
        os.kill(res.supervisor, signal.SIGKILL)
        wait_all_gone(
            [res.supervisor, *pids], DEATH_BOUND, "workers after the supervisor's SIGKILL"
        )
        left = DEATH_BOUND - (time.monotonic() - t0)
        try:
            wait_for(lambda: not procs_with_address(res.address), timeout=max(left, 0.05))
        except AssertionError:
            raise AssertionError(
                f"processes of the pool alive {DEATH_BOUND}s after the supervisor's SIGKILL: "
                + describe(procs_with_address(res.address))
            ) from None

        for call, what in blocked:
            call.wait(max(DEATH_BOUND - (time.monotonic() - t0), 0.05), what)
            assert isinstance(call.error, bgpool.PoolClosed), f"{what}: {call.error!r}"
            assert call.ended_at - t0 < DEATH_BOUND, f"{what} took {call.ended_at - t0:.2f}s"

        wait_for(lambda: raises_closed(pool), timeout=DEATH_BOUND, what="Pool to notice")
        assert_pool_closed(pool, "plain", "lazy", "pool is closed")
        wait_for(  # an application killed now leaves nothing behind
            lambda: not res.left_behind(),
            timeout=DEATH_BOUND,
            what="the owner to remove the shared memory and the socket before shutdown()",
        )
        with pytest.raises(bgpool.BgpoolError) as info:  # a new client: nobody listens there
            bgpool.connect(res.address)
        assert str(info.value) == f"no pool is listening at {res.address}"

        t1 = time.monotonic()
        pool.shutdown()
        assert time.monotonic() - t1 < DEATH_BOUND, "shutdown() after the supervisor's death"
        assert_clean(res)
        assert_pool_closed(pool, "plain", "lazy", "pool is closed")
        assert "BGPOOL_ADDRESS" not in os.environ or os.environ["BGPOOL_ADDRESS"] != res.address


# ------------------------------------------------------------------------ phases


def test_supervisor_killed_while_workers_run(make_pool: Any, sentinel_dir: Path) -> None:
    pool = make_pool(_workers(sentinel_dir))
    pool.ensure(["lazy", "tenant-a", "tenant-b"])
    res = resources(pool)
    grandchild = _grandchild(sentinel_dir)
    assert notes(sentinel_dir, "ignorer"), "ignores_everything never noted itself"
    pids = _pids(pool)
    assert len(pids) == 7, pool.status()
    _kill_supervisor_and_check(pool, res, [*pids, grandchild])


def test_supervisor_killed_while_workers_boot(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "booting.starts"
    pool = make_pool(
        _workers(sentinel_dir, spec("booting", "never_ready", env={"STARTS": str(log)}))
    )
    res = resources(pool)
    grandchild = _grandchild(sentinel_dir)
    waiter = Background(lambda: pool.ensure("booting", timeout=60))
    tenant = Background(lambda: pool.ensure(["tenant-x", "booting"], timeout=60))
    wait_for(lambda: starts(log), what="the booting worker to start")
    # the supervisor publishes the slot once the fork or spawn returned: under load
    # the worker can run first; its pid must be in status() for the check below
    wait_for(lambda: _state_of(pool, "booting") == "starting", what="booting in the table")
    assert not waiter.done.is_set() and not tenant.done.is_set()
    _kill_supervisor_and_check(
        pool,
        res,
        [*_pids(pool), grandchild],
        blocked=[(waiter, "ensure() of a booting worker"), (tenant, "batch ensure()")],
    )


def test_supervisor_killed_during_start(make_pool: Any, sentinel_dir: Path) -> None:
    """start() is blocked on an eager worker that never becomes ready: it must raise
    (not wait out ensure_timeout) and leave nothing behind."""
    log = sentinel_dir / "slow.starts"
    pool = make_pool(
        _workers(sentinel_dir, spec("slow", "never_ready", num=1, env={"STARTS": str(log)})),
        start=False,
        ensure_timeout=60,
    )
    starting = Background(pool.start)
    first = wait_for(lambda: starts(log), what="the eager worker to start")[0][0]
    grandchild = _grandchild(sentinel_dir)
    res = resources(pool)
    assert not starting.done.is_set()
    # the supervisor's children, not status(): the Pool may not have attached its
    # table yet (its eager workers can start first)
    pids = sorted(live_children(res.supervisor))
    assert first in pids
    with reaping(lambda: res.address):
        t0 = time.monotonic()
        os.kill(res.supervisor, signal.SIGKILL)
        starting.wait(DEATH_BOUND, "start()")
        assert isinstance(starting.error, bgpool.BgpoolError), repr(starting.error)
        wait_all_gone([res.supervisor, *pids, grandchild], DEATH_BOUND, "workers")
        assert time.monotonic() - t0 < DEATH_BOUND + 0.5
        assert_clean(res)  # start() failed: it shut the pool down itself
        assert_pool_closed(pool, "plain", "lazy", "pool is closed")


def test_supervisor_killed_while_a_worker_backs_off(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "looper.starts"
    pool = make_pool(
        _workers(
            sentinel_dir,
            spec("looper", "crash_at_boot", max_consecutive_failures=-1, env={"STARTS": str(log)}),
        )
    )
    res = resources(pool)
    grandchild = _grandchild(sentinel_dir)
    with pytest.raises(bgpool.WorkerBootFailed):
        pool.ensure("looper", fail_fast=True, timeout=10)
    # From the 4th failure on, each backoff lasts 0.9 s or more: a wide window.
    wait_for(
        lambda: len(starts(log)) >= 4 and _state_of(pool, "looper") == "backoff",
        timeout=5,
        what="looper in backoff after 4 boot failures",
    )
    waiter = Background(lambda: pool.ensure("looper", timeout=60))
    _kill_supervisor_and_check(
        pool,
        res,
        [*_pids(pool), grandchild],
        blocked=[(waiter, "ensure() of a backing-off worker")],
    )


def _draining(
    pool: Any, sentinel_dir: Path, drain: Callable[[], object]
) -> tuple[Resources, int, list[int], Background]:
    """Ensure a lazy and a catch-all name too, then start ``drain`` (a call of
    ``pool``) in a thread, and wait until it is under way: ``plain`` leaves at once
    on its EOF (a drain reaches every worker at once), ``deaf`` ignores it. Returns
    (the pool's resources, the grandchild, the pids before the drain, the drain)."""
    pool.ensure(["lazy", "tenant-a"])
    res = resources(pool)
    grandchild = _grandchild(sentinel_dir)
    pids = _pids(pool)
    plain = [s.pid for s in pool.status() if s.name == "plain"]
    call = Background(drain)
    # (not through status(): during a shutdown it raises PoolClosed)
    wait_for(lambda: all(gone(p) for p in plain), what="the drain to reach the workers")
    return res, grandchild, pids, call


def test_supervisor_killed_during_a_restart_drain(make_pool: Any, sentinel_dir: Path) -> None:
    pool = make_pool(_workers(sentinel_dir), restart_grace_period=30.0)
    res, grandchild, pids, restarting = _draining(pool, sentinel_dir, pool.restart_workers)
    wait_for(lambda: _state_of(pool, "deaf") == "stopping", what="deaf draining")
    _kill_supervisor_and_check(
        pool,
        res,
        [*pids, *_pids(pool), grandchild],
        blocked=[(restarting, "restart_workers() during its drain")],
    )


def test_supervisor_killed_during_a_shutdown_drain(make_pool: Any, sentinel_dir: Path) -> None:
    """shutdown() is draining (grace_period 30 s, ``deaf`` ignores the drain) when the
    supervisor dies: shutdown() returns at once and nothing survives, not even the
    setsid grandchild that the supervisor was keeping (as subreaper) for its exit."""
    pool = make_pool(_workers(sentinel_dir), grace_period=30.0)
    res, grandchild, pids, closing = _draining(pool, sentinel_dir, pool.shutdown)
    t0 = time.monotonic()
    os.kill(res.supervisor, signal.SIGKILL)
    closing.wait(DEATH_BOUND, "shutdown() whose supervisor died")
    assert closing.error is None, repr(closing.error)
    try:
        wait_all_gone([res.supervisor, *pids, grandchild], DEATH_BOUND, "pool processes")
    finally:
        alive = procs_with_address(res.address)
        kill_all(alive)  # do not leave them to the next test
    assert not alive, f"survived the supervisor's death during shutdown: {describe(alive)}"
    assert time.monotonic() - t0 < DEATH_BOUND + 0.5
    assert_clean(res)
    assert_pool_closed(pool, "plain", "lazy", "pool is closed")


# ----------------------------------------------------------- collateral damage


def test_supervisor_death_spares_the_applications_own_processes(
    make_pool: Any, sentinel_dir: Path
) -> None:
    """start() puts BGPOOL_ADDRESS in the application's environment so that the
    processes it starts afterwards can connect (README). Those processes belong to
    the application, not to the pool: when the supervisor dies, cleaning up the
    pool must not kill them."""
    pool = make_pool(_workers(sentinel_dir))
    res = resources(pool)
    grandchild = _grandchild(sentinel_dir)
    pids = _pids(pool)
    helper = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        cwd=ROOT,
        env=subprocess_env(),
        stdin=subprocess.PIPE,
    )
    try:
        # (polled: Popen returns as the child's exec begins, and /proc shows
        # the new environment only a moment later)
        wait_for(
            lambda: helper.pid in {p.pid for p in procs_with_address(res.address)},
            what="the application's subprocess to inherit BGPOOL_ADDRESS (documented)",
        )
        os.kill(res.supervisor, signal.SIGKILL)
        wait_all_gone([res.supervisor, *pids, grandchild], DEATH_BOUND, "pool processes")
        wait_for(lambda: raises_closed(pool), timeout=DEATH_BOUND, what="Pool to notice")
        pool.shutdown()
        assert helper.poll() is None, (
            f"the application's own subprocess (pid {helper.pid}) was killed when the "
            f"supervisor died: exit status {helper.returncode}"
        )
    finally:
        if helper.poll() is None:
            assert helper.stdin is not None
            helper.stdin.close()
        else:
            helper.stdin.close()  # type: ignore[union-attr]
        helper.wait(10)
    assert_clean(res)

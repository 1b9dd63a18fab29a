"""Stuck and hostile workers (``fixtures/hostile.py``).

Each one is handled as README's "Lifecycle" says: a drain closes the stop pipe; after
the grace period the worker's process tree gets SIGTERM, then SIGKILL one second
later; boot failures back off ``min(1.0, 0.1*(k-1)**2)`` and abort at
``max_consecutive_failures``; crashes after readiness back off the same way and are
never aborted. ``shutdown()`` stays within ``grace_period`` plus a small bound, and
afterwards nothing is left: no process of the pool anywhere (psutil over the whole
process tree and /proc), no ``/dev/shm`` segment, no socket, no extra fd in the
test process.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    assert_clean,
    fd_count,
    live,
    live_children,
    notes,
    reaping,
    resources,
    spec,
    state,
    supervisor_pid,
    the_status,
    wait_for,
)

import bgpool

GRACE = 1.0
FORCE_KILL = 1.0  # SIGKILL follows SIGTERM by one second
BOUND = 2.0  # shutdown() within grace_period + BOUND


def _hostile(target: str, **kw: Any) -> bgpool.WorkerSpec:
    return bgpool.WorkerSpec(target=f"fixtures.hostile:{target}", **kw)


# How each hostile worker's drain ends: (exit status, least and most seconds it may
# take). The ones that ignore the drain wait out the grace period, then SIGTERM, then
# (if that is ignored or blocked) SIGKILL a second later; the ones that leave on EOF
# are done at once (the setsid grandchild that ignores SIGTERM costs one more second).
DRAIN_CASES = {
    "ignores_everything": (-9, GRACE + FORCE_KILL - 0.1, GRACE + BOUND),
    "blocks_sigterm": (-9, GRACE + FORCE_KILL - 0.1, GRACE + BOUND),
    "closes_its_handle": (-15, GRACE - 0.1, GRACE + BOUND),
    "exits_during_drain": (7, 0.0, 0.5),
    "forks_session_leader": (0, 0.0, FORCE_KILL + BOUND),
}


def _started(pool: Any, sentinel_dir: Path, target: str) -> list[int]:
    """Pids of the hostile worker and whatever it forked (noted by the fixture)."""
    pids = [the_status(pool, "hostile").pid]
    if target == "forks_session_leader":
        pids += wait_for(lambda: notes(sentinel_dir, "grandchild"), what="the grandchild")
    if target == "ignores_everything":
        wait_for(lambda: notes(sentinel_dir, "ignorer"), what="SIGTERM ignored")
    return pids


def _with_witness(make_pool: Any, sentinel_dir: Path, target: str, **config: Any) -> Any:
    """A pool of the hostile worker ``hostile`` and a well-behaved ``witness``."""
    return make_pool(
        [
            _hostile(target, name="hostile", num=1, env={"NOTES": str(sentinel_dir)}),
            spec("witness", "idle", num=1),
        ],
        grace_period=GRACE,
        **config,
    )


def _expected_window(target: str) -> tuple[float, float]:
    """(least, most) seconds a drain of this worker may take."""
    _, least, most = DRAIN_CASES[target]
    return least, most


@pytest.mark.parametrize("target", list(DRAIN_CASES))
def test_shutdown_with_a_hostile_worker(make_pool: Any, sentinel_dir: Path, target: str) -> None:
    fds = fd_count()
    pool = _with_witness(make_pool, sentinel_dir, target)
    res = resources(pool)
    with reaping(lambda: res.address):
        pids = [*_started(pool, sentinel_dir, target), the_status(pool, "witness").pid]
        t0 = time.monotonic()
        pool.shutdown()
        elapsed = time.monotonic() - t0
        least, most = _expected_window(target)
        assert least <= elapsed <= most, (
            f"shutdown() with {target} took {elapsed:.2f}s, expected {least:.1f}..{most:.1f}s"
        )
        assert not live(pids), f"left running after shutdown(): {live(pids)}"
        assert not psutil.Process().children(recursive=True)
        assert_clean(res)
    assert fd_count() == fds, "shutdown() left file descriptors open in the application"


@pytest.mark.parametrize("target", list(DRAIN_CASES))
def test_restart_workers_with_a_hostile_worker(
    make_pool: Any, sentinel_dir: Path, target: str
) -> None:
    """restart_workers() drains the instance as shutdown() does, records how it
    ended, respawns it, and leaves nothing of the old run behind."""
    status, _, _ = DRAIN_CASES[target]
    pool = _with_witness(make_pool, sentinel_dir, target, restart_grace_period=GRACE)
    res = resources(pool)
    with reaping(lambda: res.address):
        old = _started(pool, sentinel_dir, target)
        t0 = time.monotonic()
        pool.restart_workers()
        elapsed = time.monotonic() - t0
        least, most = _expected_window(target)
        assert least <= elapsed <= most, (
            f"restart_workers() with {target} took {elapsed:.2f}s, "
            f"expected {least:.1f}..{most:.1f}s"
        )
        wait_for(
            lambda: state(the_status(pool, "hostile").state) == "ready",
            what="the respawned instance to be ready",
        )
        new = the_status(pool, "hostile")
        assert new.pid not in old and new.attempts == 2, new
        diag = pool.diagnostics("hostile")
        assert diag.last_exit_status == status, diag
        assert diag.last_signal == (signal.Signals(-status).name if status < 0 else None), diag
        assert diag.consecutive_failures == 0, "a drained exit is not a failure"
        # Nothing of the old run survives the restart (a drain leaves nothing
        # behind), including what it forked into another session: by the
        # time a SIGTERM and the SIGKILL a second later would have done it.
        try:
            wait_for(lambda: not live(old), timeout=FORCE_KILL + BOUND)
        except AssertionError:
            raise AssertionError(
                f"still running {FORCE_KILL + BOUND}s after restart_workers() returned: "
                f"{live(old)} (the drained run's processes: {old})"
            ) from None
        assert live_children(supervisor_pid(pool)) == {
            new.pid,
            the_status(pool, "witness").pid,
        }
        pool.shutdown()
        assert_clean(res)


def test_all_hostile_workers_at_once(make_pool: Any, sentinel_dir: Path) -> None:
    fds = fd_count()
    env = {"NOTES": str(sentinel_dir)}
    pool = make_pool(
        [_hostile(t, name=t, num=1, env=env) for t in DRAIN_CASES]
        + [spec("witness", "idle", num=2)],
        grace_period=GRACE,
    )
    res = resources(pool)
    with reaping(lambda: res.address):
        grandchild = wait_for(lambda: notes(sentinel_dir, "grandchild"), what="grandchild")
        pids = [s.pid for s in pool.status()] + grandchild
        t0 = time.monotonic()
        pool.shutdown()
        elapsed = time.monotonic() - t0
        # grace, SIGTERM, SIGKILL a second later; then the supervisor's exit gives
        # the orphaned grandchild SIGTERM and SIGKILL a second later.
        assert GRACE + FORCE_KILL - 0.1 <= elapsed <= GRACE + FORCE_KILL + BOUND, elapsed
        assert not live(pids), live(pids)
        assert_clean(res)
    assert fd_count() == fds


# ------------------------------------------------------------ crash and boot loops


def _attempts(pool: Any, name: str) -> int:
    return sum(s.attempts for s in pool.status() if s.name == name)


def test_crash_loop_after_readiness_is_paced_and_never_aborted(make_pool: Any) -> None:
    """``crash_loop`` crashes right after readiness, forever: restarts follow the
    backoff (0, 0.1, 0.4, 0.9, 1.0 s), the instance is never aborted, ensure() stays
    satisfied (sticky readiness), the supervisor does not spin, and a shutdown during
    a backoff wait is immediate."""
    pool = make_pool([_hostile("crash_loop", name="looper", num=1, max_consecutive_failures=2)])
    sup = psutil.Process(supervisor_pid(pool))
    cpu0 = sum(sup.cpu_times()[:2])
    t0 = time.monotonic()
    wait_for(lambda: _attempts(pool, "looper") >= 6, timeout=8, what="6 attempts")
    elapsed = time.monotonic() - t0
    cpu = sum(sup.cpu_times()[:2]) - cpu0
    assert elapsed >= 0.1 + 0.4 + 0.9 + 1.0 - 0.2, f"restarts not paced: 6 attempts in {elapsed}s"
    assert cpu < 0.5 * elapsed, f"supervisor used {cpu:.2f}s of CPU in {elapsed:.2f}s"
    st = the_status(pool, "looper")
    assert state(st.state) != "aborted" and st.ever_ready, st
    t1 = time.monotonic()
    pool.ensure("looper", timeout=1)
    assert time.monotonic() - t1 < 0.5
    diag = pool.diagnostics("looper")
    assert diag.last_error is not None and diag.last_error.type == "RuntimeError", diag
    assert diag.last_error.message == "crash loop"
    assert diag.consecutive_failures >= 5, diag
    wait_for(lambda: state(the_status(pool, "looper").state) == "backoff", what="a backoff wait")
    res = resources(pool)
    t2 = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - t2 < 1.0, "a backoff wait must be cut short by a drain"
    assert_clean(res)


def test_boot_loop_is_aborted_then_retried_afresh(make_pool: Any) -> None:
    pool = make_pool([_hostile("boot_loop", name="never", max_consecutive_failures=3)])
    sup = supervisor_pid(pool)
    for round_ in (1, 2):
        with pytest.raises(bgpool.WorkerAborted) as info:
            pool.ensure("never", timeout=10)
        text = str(info.value)
        assert '"never" failed to start: 3 consecutive failures' in text, text
        assert "RuntimeError: boot loop" in text, text
        diag = info.value.diagnostics
        assert diag is not None and diag.state == "aborted", diag
        assert diag.last_error is not None and diag.last_error.type == "RuntimeError"
        st = the_status(pool, "never")
        assert state(st.state) == "aborted" and st.pid is None, st
        assert st.attempts == 3 * round_, st
        assert not live_children(sup), "an aborted worker left a process"


def test_endless_boot_loop_backs_off(make_pool: Any) -> None:
    pool = make_pool([_hostile("boot_loop", name="never", max_consecutive_failures=-1)])
    t0 = time.monotonic()
    with pytest.raises(bgpool.WorkerBootFailed):
        pool.ensure("never", timeout=10, fail_fast=True)
    wait_for(lambda: _attempts(pool, "never") >= 5, timeout=8, what="5 attempts")
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.1 + 0.4 + 0.9 - 0.2, f"boot failures not paced: {elapsed}s"
    with pytest.raises(bgpool.EnsureTimeout) as info:
        pool.ensure("never", timeout=0.5)
    assert "RuntimeError: boot loop" in str(info.value)
    assert state(the_status(pool, "never").state) in {"backoff", "starting", "crashed"}
    res = resources(pool)
    wait_for(lambda: state(the_status(pool, "never").state) == "backoff", what="a backoff wait")
    t1 = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - t1 < 1.0
    assert_clean(res)

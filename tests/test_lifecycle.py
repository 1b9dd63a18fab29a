"""Lifecycle: start, readiness, ensure(), crash restarts, boot failures, abort,
drain and force-kill, restart_workers(), the context manager, reporting models and
the error hierarchy (README, "Using the pool", "Lifecycle" and "Errors").

Every test that makes a pool runs once per start method (``fork``, ``spawn``): the
module's ``start_method`` fixture is parametrized, and ``make_pool`` applies it.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Literal

import psutil
import pytest
from helpers import (
    FIXTURES,
    ROOT,
    Background,
    alive,
    file_line,
    gone,
    read_json,
    run_together,
    since,
    source_line,
    spec,
    starts,
    state,
    statuses,
    supervisor_of,
    supervisor_pid,
    the_status,
    time_while_stopped,
    wait_for,
    worker_children,
)
from pydantic import BaseModel

import bgpool
from bgpool import PoolConfig, WorkerSpec
from fixtures import workers

BOOM_LINE = source_line(workers.crash_at_boot, "BOOM_LINE")
SCRIPT_BOOM_LINE = file_line(FIXTURES / "script_crash.py", "SCRIPT_BOOM_LINE")


StartMethod = Literal["fork", "spawn"]


@pytest.fixture(params=["fork", "spawn"])
def start_method(request: pytest.FixtureRequest) -> StartMethod:
    """Each pool of this module starts its workers one way, then the other."""
    method: StartMethod = request.param
    return method


fork_only = pytest.mark.parametrize("start_method", ["fork"])
"""For a test where the start method plays no part (the client's own deadlines and
table reads, the Pool's context manager, configuration): it runs once."""


def _diagnostics_when(pool: Any, name: str, holds: Any, what: str) -> Any:
    """``pool.diagnostics(name)``, once ``holds(diagnostics)`` is true."""

    def check() -> Any:
        diag = pool.diagnostics(name)
        return diag if holds(diag) else None

    return wait_for(check, what=what)


# ------------------------------------------------------------ start / ready / shutdown


def test_eager_worker_is_ready_when_start_returns(make_pool: Any, sentinel_dir: Path) -> None:
    pidfile = sentinel_dir / "eager.pid"
    pool = make_pool(
        [
            spec("eager", "idle", num=1, env={"SENTINEL": str(pidfile)}),
            spec("lazy", "idle"),
        ]
    )
    st = the_status(pool, "eager")
    assert state(st.state) == "ready"
    assert st.ever_ready is True
    assert st.instance == 0
    assert st.attempts == 1
    assert st.pid is not None
    assert int(pidfile.read_text()) == st.pid  # the worker wrote it before its handle
    assert supervisor_of(st.pid).pid != os.getpid()
    lazy = the_status(pool, "lazy")
    assert state(lazy.state) == "stopped"
    assert lazy.pid is None
    assert lazy.ever_ready is False


def test_shutdown_drains_promptly_with_default_grace_period(make_pool: Any) -> None:
    # grace_period=30: only the drain (EOF on the handle) can make this fast.
    pool = make_pool([spec("a", "idle", num=1), spec("b", "idle", num=1)], grace_period=30.0)
    pids = [the_status(pool, n).pid for n in ("a", "b")]
    sup = supervisor_of(pids[0])
    t0 = time.monotonic()
    pool.shutdown()
    assert since(t0) < 3.0
    assert all(gone(p) for p in pids)
    assert gone(sup.pid)
    assert psutil.Process().children() == []


def test_lazy_worker_starts_on_first_ensure(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "lazy.starts"
    pool = make_pool([spec("lazy", "idle", env={"STARTS": str(log)})])
    assert state(the_status(pool, "lazy").state) == "stopped"
    assert starts(log) == []
    pool.ensure("lazy", timeout=5)
    st = the_status(pool, "lazy")
    assert state(st.state) == "ready"
    assert st.ever_ready is True
    assert [pid for pid, _ in starts(log)] == [st.pid]
    pool.ensure("lazy", timeout=5)  # second call: already ready, nothing new started
    assert len(starts(log)) == 1


@fork_only
def test_ensure_of_ready_worker_needs_no_round_trip(
    make_pool: Any, sigcont_on_exit: list[int]
) -> None:
    pool = make_pool([spec("eager", "idle", num=1)])
    sup = supervisor_of(the_status(pool, "eager").pid)
    took = time_while_stopped(lambda: pool.ensure("eager", timeout=2), sup.pid, sigcont_on_exit)
    assert took < 0.5, took


@fork_only
def test_ensure_undeclared_name(make_pool: Any) -> None:
    pool = make_pool([spec("known", "idle")])
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.ensure("x", timeout=5)
    assert str(info.value) == 'no background worker configured for name "x"'
    assert isinstance(info.value, LookupError)
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        pool.diagnostics("x")
    assert str(info.value) == 'no background worker configured for name "x"'


# ------------------------------------------------------------------ timeouts


def test_timeout_message_for_worker_that_never_takes_its_handle(make_pool: Any) -> None:
    pool = make_pool([spec("nr", "never_ready")], grace_period=0.2)
    t0 = time.monotonic()
    with pytest.raises(bgpool.EnsureTimeout) as info:
        pool.ensure("nr", timeout=1)
    assert 0.9 <= since(t0) < 2.5
    assert str(info.value) == 'background worker "nr" did not call get_worker_handle() within 1s'
    assert isinstance(info.value, TimeoutError)
    diag = info.value.diagnostics
    assert diag.name == "nr"
    assert diag.ever_ready is False
    assert diag.last_error is None


@fork_only
def test_default_deadline_is_pool_ensure_timeout(make_pool: Any) -> None:
    pool = make_pool([spec("nr", "never_ready")], grace_period=0.2, ensure_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(bgpool.EnsureTimeout) as info:
        pool.ensure("nr")
    assert 0.9 <= since(t0) < 2.5
    assert re.fullmatch(
        r'background worker "nr" did not call get_worker_handle\(\) within 1(\.0)?s',
        str(info.value),
    ), str(info.value)


@fork_only
def test_batch_shares_one_deadline(make_pool: Any) -> None:
    pool = make_pool([spec("a", "never_ready"), spec("b", "never_ready")], grace_period=0.2)
    t0 = time.monotonic()
    with pytest.raises(bgpool.EnsureTimeout):
        pool.ensure(["a", "b"], timeout=1)
    assert 0.9 <= since(t0) < 1.8  # one deadline, not one per name
    # both were started by the one call
    assert the_status(pool, "a").pid is not None
    assert the_status(pool, "b").pid is not None


def test_timeout_message_carries_boot_failure_metadata(make_pool: Any) -> None:
    pool = make_pool([spec("x", "crash_at_boot", max_consecutive_failures=-1)])
    with pytest.raises(bgpool.EnsureTimeout) as info:
        pool.ensure("x", timeout=1)
    m = re.fullmatch(
        r'background worker "x" did not become ready within 1s; last attempt (\d+) failed '
        r"\(exit status 1, target fixtures\.workers:crash_at_boot\): "
        r"RuntimeError: boom \((.+), line (\d+)\)",
        str(info.value),
    )
    assert m, str(info.value)
    assert int(m.group(1)) >= 1
    assert m.group(2).endswith("workers.py")
    assert int(m.group(3)) == BOOM_LINE
    diag = info.value.diagnostics
    assert diag.name == "x"
    assert diag.target == "fixtures.workers:crash_at_boot"
    assert diag.ever_ready is False
    assert diag.attempts >= int(m.group(1))
    assert diag.last_exit_status == 1
    assert diag.last_signal is None
    err = diag.last_error
    assert err.type == "RuntimeError"
    assert err.message == "boom"
    assert err.filename.endswith("workers.py")
    assert err.lineno == BOOM_LINE
    assert "crash_at_boot" in err.traceback


def test_boot_failure_of_script_target_names_the_script(
    make_pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    pool = make_pool([WorkerSpec(name="s", target="fixtures/script_crash.py")])
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.ensure("s", timeout=10, fail_fast=True)
    m = re.fullmatch(
        r'background worker "s" failed to boot: attempt 1 failed '
        r"\(exit status 1, target fixtures/script_crash\.py\): "
        r"RuntimeError: script boom \((.+), line (\d+)\)",
        str(info.value),
    )
    assert m, str(info.value)
    assert m.group(1).endswith("script_crash.py")
    assert int(m.group(2)) == SCRIPT_BOOM_LINE


# ----------------------------------------------------- boot failures, abort, fail_fast


def test_ensure_waits_through_boot_failures_by_default(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "x.starts"
    pool = make_pool([spec("x", "flaky_boot", env={"STARTS": str(log), "BOOT_CRASHES": "2"})])
    pool.ensure("x", timeout=10)  # tolerant: two boot failures, then ready
    pids = [pid for pid, _ in starts(log)]
    assert len(pids) == 3
    st = the_status(pool, "x")
    assert state(st.state) == "ready"
    assert st.pid == pids[2]
    assert st.attempts == 3
    assert pool.diagnostics("x").last_error.type == "RuntimeError"


def test_fail_fast_on_a_healthy_worker_just_waits_for_ready(make_pool: Any) -> None:
    pool = make_pool([spec("x", "slow_ready", env={"DELAY": "0.2"})])
    pool.ensure("x", timeout=10, fail_fast=True)
    assert state(the_status(pool, "x").state) == "ready"


def test_fail_fast_raises_worker_boot_failed_at_first_failure(make_pool: Any) -> None:
    pool = make_pool([spec("x", "crash_at_boot", max_consecutive_failures=-1)])
    t0 = time.monotonic()
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.ensure("x", timeout=20, fail_fast=True)
    assert since(t0) < 3.0
    assert not isinstance(info.value, bgpool.WorkerAborted)
    m = re.fullmatch(
        r'background worker "x" failed to boot: attempt 1 failed '
        r"\(exit status 1, target fixtures\.workers:crash_at_boot\): "
        r"RuntimeError: boom \((.+), line (\d+)\)",
        str(info.value),
    )
    assert m, str(info.value)
    assert int(m.group(2)) == BOOM_LINE
    assert info.value.diagnostics.last_error.type == "RuntimeError"


def test_abort_after_max_consecutive_failures_then_fresh_try(
    make_pool: Any, sentinel_dir: Path
) -> None:
    flag = sentinel_dir / "fail"
    flag.touch()
    log = sentinel_dir / "x.starts"
    pool = make_pool(
        [
            spec(
                "x",
                "fail_while_flag",
                max_consecutive_failures=2,
                env={"FAIL_FLAG": str(flag), "STARTS": str(log)},
            )
        ]
    )
    t0 = time.monotonic()
    with pytest.raises(bgpool.WorkerAborted) as info:
        pool.ensure("x", timeout=10)
    assert since(t0) < 5.0
    assert isinstance(info.value, bgpool.WorkerBootFailed)
    assert str(info.value).startswith(
        'background worker "x" failed to start: 2 consecutive failures '
        "(last exit status 1, target fixtures.workers:fail_while_flag): RuntimeError: boom"
    ), str(info.value)
    assert info.value.diagnostics.consecutive_failures == 2
    assert len(starts(log)) == 2
    assert state(pool.diagnostics("x").state) == "aborted"

    # a later ensure() tries afresh: two more attempts, aborted again
    with pytest.raises(bgpool.WorkerAborted):
        pool.ensure("x", timeout=10)
    assert len(starts(log)) == 4

    # and once the cause is gone, the fresh try succeeds
    flag.unlink()
    pool.ensure("x", timeout=10)
    st = the_status(pool, "x")
    assert state(st.state) == "ready"
    assert st.pid == starts(log)[-1][0]
    assert len(starts(log)) == 5


def test_sys_exit_at_boot_is_recorded_in_abort(make_pool: Any) -> None:
    pool = make_pool(
        [spec("x", "exit_at_boot", max_consecutive_failures=2, env={"EXIT_CODE": "3"})]
    )
    with pytest.raises(bgpool.WorkerAborted) as info:
        pool.ensure("x", timeout=10)
    assert str(info.value).startswith(
        'background worker "x" failed to start: 2 consecutive failures '
        "(last exit status 3, target fixtures.workers:exit_at_boot)"
    ), str(info.value)
    assert pool.diagnostics("x").last_exit_status == 3


def test_backoff_schedule_between_boot_failures(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "x.starts"
    pool = make_pool(
        [spec("x", "crash_at_boot", max_consecutive_failures=-1, env={"STARTS": str(log)})]
    )
    with pytest.raises(bgpool.EnsureTimeout):
        pool.ensure("x", timeout=0.2)
    wait_for(lambda: len(starts(log)) >= 5, timeout=10, what="five attempts")
    times = [ts for _, ts in starts(log)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # after the k-th failure: min(1.0, 0.1*(k-1)**2) = 0, 0.1, 0.4, 0.9
    assert gaps[0] < 0.5, gaps
    assert 0.09 <= gaps[1] < 0.6, gaps
    assert 0.38 <= gaps[2] < 0.9, gaps
    assert 0.85 <= gaps[3] < 1.5, gaps


# ----------------------------------------------------------- after readiness


def test_crash_after_ready_restarts_with_new_pid(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "x.starts"
    pool = make_pool([spec("x", "crash_after_ready", env={"STARTS": str(log), "CRASHES": "2"})])
    pool.ensure("x", timeout=5)
    wait_for(lambda: len(starts(log)) == 3, what="two restarts")
    pids = [pid for pid, _ in starts(log)]
    assert len(set(pids)) == 3
    wait_for(
        lambda: (
            the_status(pool, "x").pid == pids[2] and state(the_status(pool, "x").state) == "ready"
        ),
        what="third attempt ready",
    )
    assert all(gone(p) for p in pids[:2])
    diag = pool.diagnostics("x")
    assert diag.ever_ready is True
    assert diag.attempts == 3
    assert diag.last_exit_status == 1
    assert diag.last_error.type == "RuntimeError"
    assert diag.last_error.message == "crash after ready"


def test_crashes_after_ready_are_never_aborted(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "x.starts"
    pool = make_pool(
        [
            spec(
                "x",
                "crash_after_ready",
                max_consecutive_failures=2,
                env={"STARTS": str(log), "CRASHES": "3"},
            )
        ]
    )
    pool.ensure("x", timeout=5)
    wait_for(lambda: len(starts(log)) == 4, timeout=10, what="three restarts")
    last = starts(log)[3][0]
    wait_for(
        lambda: the_status(pool, "x").pid == last and state(the_status(pool, "x").state) == "ready",
        what="fourth attempt ready",
    )
    assert pool.diagnostics("x").attempts == 4


def test_readiness_is_sticky_across_crash_restarts(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "x.starts"
    pool = make_pool(
        [spec("x", "ready_once_then_hang", env={"STARTS": str(log)})], grace_period=0.2
    )
    pool.ensure("x", timeout=5)
    wait_for(lambda: len(starts(log)) == 2, what="the restart after the crash")
    # The new process may write its start line before the supervisor, back from
    # fork(), publishes it: wait for the table to show it.
    st = wait_for(
        lambda: (s := the_status(pool, "x")).pid == starts(log)[1][0] and s,
        what="the table showing the restarted process",
    )
    assert state(st.state) == "starting"  # the new attempt never takes its handle
    assert st.ever_ready is True
    t0 = time.monotonic()
    pool.ensure("x", timeout=1)  # sticky: no wait for the new attempt
    assert since(t0) < 0.5


def test_clean_exit_is_restarted(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "x.starts"
    pool = make_pool([spec("x", "exit_after_ready", env={"STARTS": str(log), "EXITS": "2"})])
    pool.ensure("x", timeout=5)
    wait_for(lambda: len(starts(log)) == 3, what="two restarts after clean exits")
    pids = [pid for pid, _ in starts(log)]
    assert len(set(pids)) == 3
    wait_for(lambda: the_status(pool, "x").pid == pids[2], what="third attempt running")
    diag = pool.diagnostics("x")
    assert diag.last_exit_status == 0
    assert diag.last_signal is None


def test_clean_exit_loop_is_paced(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "x.starts"
    pool = make_pool([spec("x", "exit_after_ready", env={"STARTS": str(log)})])
    pool.ensure("x", timeout=5)
    wait_for(lambda: len(starts(log)) >= 6, timeout=10, what="six attempts")
    times = [ts for _, ts in starts(log)][:6]
    assert times[5] - times[0] >= 0.45, times  # at most 10 restarts a second


def test_sys_exit_status_after_ready_is_recorded(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "x.starts"
    pool = make_pool(
        [spec("x", "exit_after_ready", env={"STARTS": str(log), "EXIT_CODE": "3", "EXITS": "1"})]
    )
    pool.ensure("x", timeout=5)
    wait_for(lambda: len(starts(log)) == 2, what="restart after sys.exit(3)")
    diag = _diagnostics_when(
        pool, "x", lambda d: d.last_exit_status == 3, what="exit status 3 recorded"
    )
    assert diag.last_signal is None


def test_sigkill_is_recorded_and_worker_restarted(make_pool: Any, sentinel_dir: Path) -> None:
    log = sentinel_dir / "x.starts"
    pool = make_pool([spec("x", "idle", env={"STARTS": str(log)})])
    pool.ensure("x", timeout=5)
    old = the_status(pool, "x").pid
    os.kill(old, signal.SIGKILL)
    diag = _diagnostics_when(
        pool, "x", lambda d: d.last_exit_status == -9, what="exit status -9 recorded"
    )
    assert diag.last_signal == "SIGKILL"
    wait_for(lambda: len(starts(log)) == 2, what="restart after SIGKILL")
    new = starts(log)[1][0]
    assert new != old
    wait_for(
        lambda: the_status(pool, "x").pid == new and state(the_status(pool, "x").state) == "ready",
        what="the new pid ready in status",
    )


# -------------------------------------------------------------- concurrency


def test_sixteen_threads_ensuring_one_lazy_name_start_one_process(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log = sentinel_dir / "lazy.starts"
    pool = make_pool([spec("lazy", "slow_ready", env={"STARTS": str(log), "DELAY": "0.3"})])
    errors = run_together([lambda: pool.ensure("lazy", timeout=10)] * 16, timeout=15)
    assert errors == []
    assert len(starts(log)) == 1
    (st,) = statuses(pool, "lazy")
    assert state(st.state) == "ready"
    assert st.pid == starts(log)[0][0]
    assert [p.pid for p in worker_children(supervisor_of(st.pid).pid)] == [st.pid]


# ------------------------------------------------------------- drain and kill


def test_stuck_worker_and_its_child_are_force_killed_after_grace_period(
    make_pool: Any, sentinel_dir: Path
) -> None:
    pidfile, childfile = sentinel_dir / "stuck.pid", sentinel_dir / "child.pid"
    pool = make_pool(
        [
            spec(
                "stuck",
                "stuck",
                num=1,
                env={"SENTINEL": str(pidfile), "CHILD_PIDFILE": str(childfile)},
            )
        ],
        grace_period=0.5,
    )
    pid, child = int(pidfile.read_text()), int(childfile.read_text())
    assert alive(pid) and alive(child)
    try:
        t0 = time.monotonic()
        pool.shutdown()
        elapsed = since(t0)
        # drain, 0.5 s grace, SIGTERM (ignored), SIGKILL one second later
        assert 1.4 <= elapsed < 5.0
        assert gone(pid)
        wait_for(lambda: gone(child), timeout=2, what="the worker's child killed")
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_restart_force_kills_stuck_worker_and_its_setsid_child(
    make_pool: Any, sentinel_dir: Path
) -> None:
    log, childfile = sentinel_dir / "stuck.starts", sentinel_dir / "child.pid"
    pool = make_pool(
        [
            spec(
                "stuck",
                "stuck",
                num=1,
                env={
                    "STARTS": str(log),
                    "CHILD_PIDFILE": str(childfile),
                    "CHILD_NEW_SESSION": "1",  # escapes the process group, not the tree
                },
            )
        ],
        restart_grace_period=0.3,
        grace_period=0.3,
    )
    old = the_status(pool, "stuck").pid
    child = int(childfile.read_text())
    assert alive(child)
    try:
        t0 = time.monotonic()
        pool.restart_workers()
        assert 0.25 <= since(t0) < 5.0
        assert gone(old)
        # the supervisor keeps running: the old worker's child must not survive it
        wait_for(lambda: gone(child), timeout=2, what="the old worker's child killed")
        wait_for(lambda: len(starts(log)) == 2, what="respawn")
        assert starts(log)[1][0] != old
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_backoff_wait_is_cut_short_by_shutdown(make_pool: Any) -> None:
    pool = make_pool([spec("x", "crash_at_boot", max_consecutive_failures=-1)])
    with pytest.raises(bgpool.EnsureTimeout):
        pool.ensure("x", timeout=0.2)

    def in_long_backoff() -> bool:
        st = the_status(pool, "x")
        return state(st.state) == "backoff" and st.consecutive_failures >= 5  # waits 1.0 s

    wait_for(in_long_backoff, timeout=10, what="a 1 s backoff")
    t0 = time.monotonic()
    pool.shutdown()
    assert since(t0) < 0.7


def test_waiter_gets_pool_closed_when_pool_shuts_down(make_pool: Any) -> None:
    pool = make_pool([spec("nr", "never_ready")], grace_period=0.2)
    waiter = Background(lambda: pool.ensure("nr", timeout=30))
    try:
        wait_for(lambda: the_status(pool, "nr").pid is not None, what="lazy start")
        pool.shutdown()
    finally:
        waiter.wait(10, "ensure() of a worker that never gets ready")
    assert isinstance(waiter.error, bgpool.PoolClosed), repr(waiter.error)
    assert str(waiter.error) in ("pool is shutting down", "pool is closed")


def test_restart_workers_respawns_running_instances_only(
    make_pool: Any, sentinel_dir: Path
) -> None:
    logs = {n: sentinel_dir / f"{n}.starts" for n in ("eager", "lazy", "never")}
    pool = make_pool(
        [
            spec("eager", "idle", num=1, env={"STARTS": str(logs["eager"])}),
            spec("lazy", "idle", env={"STARTS": str(logs["lazy"])}),
            spec("never", "idle", env={"STARTS": str(logs["never"])}),
        ]
    )
    pool.ensure("lazy", timeout=5)
    old = {n: the_status(pool, n).pid for n in ("eager", "lazy")}
    pool.restart_workers()
    assert all(gone(p) for p in old.values())
    new = {n: the_status(pool, n).pid for n in ("eager", "lazy")}
    for n in ("eager", "lazy"):  # respawned (forked) before restart_workers() returned
        assert new[n] is not None, n
        assert new[n] != old[n], n
        assert the_status(pool, n).ever_ready is True, n
    assert starts(logs["never"]) == []
    assert state(the_status(pool, "never").state) == "stopped"
    assert the_status(pool, "never").pid is None
    t0 = time.monotonic()
    pool.ensure(["eager", "lazy"], timeout=1)  # readiness stays sticky
    assert since(t0) < 0.5

    def respawned_once(n: str) -> bool:
        return [pid for pid, _ in starts(logs[n])] == [old[n], new[n]]

    def ready_again(n: str) -> bool:
        st = the_status(pool, n)
        return bool(st.pid == new[n] and state(st.state) == "ready")

    for n in ("eager", "lazy"):
        wait_for(functools.partial(respawned_once, n), what=f"{n} respawned once")
        wait_for(functools.partial(ready_again, n), what=f"{n} ready again")


# ---------------------------------------------------- context manager, closed pool


@fork_only
def test_context_manager_starts_and_shuts_down(make_pool: Any) -> None:
    pool = make_pool([spec("eager", "idle", num=1)], start=False)
    with pool as entered:
        assert entered is pool
        st = the_status(pool, "eager")
        assert state(st.state) == "ready"
        pid = st.pid
    assert gone(pid)
    assert psutil.Process().children() == []
    with pytest.raises(bgpool.PoolClosed) as info:
        pool.ensure("eager")
    assert str(info.value) == "pool is closed"


@fork_only
def test_context_manager_shuts_down_on_exception(make_pool: Any) -> None:
    pool = make_pool([spec("eager", "idle", num=1)], start=False)
    with pytest.raises(ZeroDivisionError), pool:
        pid = the_status(pool, "eager").pid
        1 / 0  # noqa: B018
    assert gone(pid)
    assert psutil.Process().children() == []


@fork_only
def test_shutdown_is_idempotent_and_pool_is_closed_after(make_pool: Any) -> None:
    pool = make_pool([spec("eager", "idle", num=1)])
    pool.shutdown()
    pool.shutdown()
    with pytest.raises(bgpool.PoolClosed) as info:
        pool.ensure("eager", timeout=1)
    assert str(info.value) == "pool is closed"
    assert isinstance(info.value, bgpool.BgpoolError)


# -------------------------------------------------------------- start-up errors


def test_start_raises_startup_error_when_eager_worker_aborts(make_pool: Any) -> None:
    pool = make_pool(
        [
            spec("good", "idle", num=1),
            spec("bad", "crash_at_boot", num=1, max_consecutive_failures=2),
        ],
        start=False,
    )
    t0 = time.monotonic()
    with pytest.raises(bgpool.StartupError) as info:
        pool.start()
    assert since(t0) < 8.0
    assert "bad" in str(info.value)
    assert "boom" in str(info.value)
    assert info.value.diagnostics is not None
    assert psutil.Process().children() == []  # nothing left running


def test_start_raises_startup_error_when_eager_worker_never_ready(make_pool: Any) -> None:
    pool = make_pool(
        [spec("nr", "never_ready", num=1)], start=False, ensure_timeout=1.0, grace_period=0.2
    )
    t0 = time.monotonic()
    with pytest.raises(bgpool.StartupError) as info:
        pool.start()
    assert 0.9 <= since(t0) < 5.0
    assert "nr" in str(info.value)
    assert "get_worker_handle" in str(info.value)
    assert info.value.diagnostics is not None
    assert psutil.Process().children() == []


# ----------------------------------------------------------- reporting models


def test_status_and_diagnostics_are_pydantic_models(make_pool: Any) -> None:
    pool = make_pool(
        [
            spec("eager", "idle", num=1),
            spec("lazy", "crash_at_boot", max_consecutive_failures=2),
        ]
    )
    by_name = {s.name: s for s in pool.status()}
    assert set(by_name) == {"eager", "lazy"}
    eager, lazy = by_name["eager"], by_name["lazy"]
    for s in (eager, lazy):
        assert isinstance(s, bgpool.WorkerStatus)
        assert isinstance(s, BaseModel)
        assert s.scope == ""
        assert s.instance == 0
    dumped = json.loads(eager.model_dump_json())
    assert set(dumped) >= {
        "name", "scope", "instance", "pid", "state", "ever_ready", "attempts",
        "consecutive_failures", "last_exit_status", "started_at", "ready_at",
    }  # fmt: skip
    assert dumped["state"] == "ready"
    assert dumped["pid"] == eager.pid
    assert eager.started_at is not None and eager.ready_at is not None
    assert eager.consecutive_failures == 0
    assert json.loads(lazy.model_dump_json())["state"] == "stopped"
    assert lazy.pid is None and lazy.attempts == 0 and lazy.started_at is None

    diag = pool.diagnostics("eager")
    assert isinstance(diag, bgpool.WorkerDiagnostics)
    assert diag.name == "eager"
    assert diag.scope == ""
    assert diag.target == "fixtures.workers:idle"
    assert state(diag.state) == "ready"
    assert diag.ever_ready is True
    assert diag.attempts == 1
    assert diag.consecutive_failures == 0
    assert diag.last_signal is None
    assert diag.last_error is None
    assert [i.pid for i in diag.instances] == [eager.pid]
    assert all(isinstance(i, bgpool.WorkerStatus) for i in diag.instances)
    d = json.loads(diag.model_dump_json())
    assert set(d) >= {
        "name", "scope", "target", "state", "ever_ready", "attempts", "consecutive_failures",
        "last_exit_status", "last_signal", "last_error", "instances",
    }  # fmt: skip

    lazy_diag = pool.diagnostics("lazy")
    assert state(lazy_diag.state) == "stopped"
    assert [i.pid for i in lazy_diag.instances] == [None]

    with pytest.raises(bgpool.WorkerAborted):
        pool.ensure("lazy", timeout=10)
    err = pool.diagnostics("lazy").last_error
    assert isinstance(err, BaseModel)
    e = json.loads(err.model_dump_json())
    assert set(e) >= {"type", "message", "filename", "lineno", "traceback"}
    assert (e["type"], e["message"], e["lineno"]) == ("RuntimeError", "boom", BOOM_LINE)


def test_error_class_hierarchy() -> None:
    assert issubclass(bgpool.BgpoolError, RuntimeError)
    assert issubclass(bgpool.WorkerNotDeclared, LookupError)
    assert issubclass(bgpool.EnsureTimeout, TimeoutError)
    assert issubclass(bgpool.WorkerAborted, bgpool.WorkerBootFailed)
    assert issubclass(bgpool.VarsNotPublished, LookupError)
    for cls in (
        bgpool.WorkerNotDeclared,
        bgpool.CatchAllLimitReached,
        bgpool.EnsureTimeout,
        bgpool.WorkerAborted,
        bgpool.WorkerBootFailed,
        bgpool.StartupError,
        bgpool.PoolClosed,
        bgpool.VarsNotPublished,
    ):
        assert issubclass(cls, bgpool.BgpoolError), cls


# ------------------------------------------------------------------ targets


def test_script_target_runs_as_main_with_args(
    make_pool: Any, sentinel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    out = sentinel_dir / "script.json"
    args = [str(out), "two words", "--flag"]
    pool = make_pool([WorkerSpec(name="script", target="fixtures/script_worker.py", args=args)])
    pool.ensure("script", timeout=5)
    data = wait_for(lambda: read_json(out), what="the script's report")
    assert data["argv"][1:] == args
    assert data["dunder_name"] == "__main__"
    assert data["worker"] == "script"
    assert data["pid"] == the_status(pool, "script").pid


@fork_only
def test_pool_accepts_a_pool_config(make_pool: Any, start_method: StartMethod) -> None:
    config = PoolConfig(
        workers=[spec("eager", "idle", num=1)], grace_period=5.0, start_method=start_method
    )
    pool = make_pool(config=config)
    assert state(the_status(pool, "eager").state) == "ready"


@fork_only
def test_ensure_keeps_its_deadline_when_the_supervisor_is_stopped(
    make_pool: Any, sigcont_on_exit: list[int]
) -> None:
    """A supervisor that cannot answer (SIGSTOPped here) must not stretch the
    caller's deadline by more than the client's small slack."""
    pool = make_pool([spec("lazy", "idle")])
    supervisor = supervisor_pid(pool)
    sigcont_on_exit.append(supervisor)
    os.kill(supervisor, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(bgpool.EnsureTimeout, match="the supervisor did not answer"):
        pool.ensure("lazy", timeout=0.5)
    assert since(t0) < 3.0
    os.kill(supervisor, signal.SIGCONT)
    pool.ensure("lazy", timeout=10)  # and it recovers once it runs again

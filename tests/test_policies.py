"""Lifecycle policies that stop a run (SPEC, "Lifecycle policies"): `boot_timeout`,
`heartbeat_timeout` with `handle.heartbeat()` / `handle.tick()`, and `max_restarts`
within `restart_window`. Each with real processes, its failure visible in
diagnostics and in the metrics; the declarations' checks and the pure rules too.

Workers are ``fixtures.policy_workers``; recycling (`max_memory`, `max_lifetime`)
is tests/test_recycling.py.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import gone, read_text, subprocess_env, the_status, wait_for
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from test_transitions import Clock, Machine, assert_only_allowed_moves, decl, state, the_instance

import bgpool
import bgpool.metrics
from bgpool.states import State
from bgpool.supervisor import policy
from bgpool.supervisor.instances import Instance

MakePool = Callable[..., Any]

ROOT = Path(__file__).resolve().parent.parent


def policy_spec(name: str, target: str, **kwargs: Any) -> bgpool.WorkerSpec:
    return bgpool.WorkerSpec(name=name, target=f"fixtures.policy_workers:{target}", **kwargs)


def metric(pool: Any, family: str, name: str, **labels: str) -> float:
    """One sample of bgpool's metrics for worker ``name`` (global scope), as scraped now."""
    registry = CollectorRegistry()
    bgpool.metrics.collector(pool, registry)
    value = registry.get_sample_value(family, {"worker": f"m#:{name}", **labels})
    assert value is not None, f"no {family} sample for {name} {labels}"
    return value


def noted_pool(
    make_pool: MakePool, sentinel_dir: Path, name: str, target: str, **kwargs: Any
) -> tuple[Any, Path]:
    """A started pool of one policy worker, each attempt of which is noted in
    ``$STARTS`` (returned with it); ``env`` adds to the worker's environment."""
    starts = sentinel_dir / "starts"
    env = {"STARTS": str(starts), **kwargs.pop("env", {})}
    return make_pool([policy_spec(name, target, env=env, **kwargs)]), starts


def status_command(pool: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """``bgpool status`` (or another command given in ``args``) of ``pool``, as an
    operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "bgpool", *(args or ("status",)), "--address", pool.address],
        cwd=ROOT, env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=30, check=False,
    )  # fmt: skip


def start_lines(path: Path) -> list[tuple[int, int, float]]:
    """``(pid, instance, monotonic)`` of each attempt noted in ``$STARTS``."""
    out = []
    for line in (read_text(path) or "").splitlines():
        pid, instance, when = line.split()
        out.append((int(pid), int(instance), float(when)))
    return out


# -------------------------------------------------------------------- boot_timeout


def test_boot_timeout_kills_a_worker_that_never_takes_its_handle(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    pool, starts = noted_pool(
        make_pool, sentinel_dir, "slow", "never_ready", boot_timeout=0.3,
        max_consecutive_failures=2,
    )  # fmt: skip
    with pytest.raises(bgpool.WorkerAborted) as caught:
        pool.ensure("slow", timeout=8)
    expected = "did not call get_worker_handle() within 0.3s of starting"
    assert expected in str(caught.value), caught.value
    assert "2 consecutive failures" in str(caught.value), caught.value
    diag = pool.diagnostics("slow")
    assert diag.state == "aborted"
    assert diag.last_error is not None
    assert diag.last_error.type == "BootTimeout"
    assert diag.last_error.message == expected
    assert diag.last_signal == "SIGTERM"
    attempts = start_lines(starts)
    assert len(attempts) == 2, attempts
    assert all(gone(pid) for pid, _, _ in attempts)
    # stopped at its deadline, not before: the second attempt began after the first's
    # 0.3 s (less what a spawned interpreter's start-up may vary between attempts)
    assert attempts[1][2] - attempts[0][2] >= 0.2
    assert metric(pool, "bgpool_worker_crashes_total", "slow") == 2


def test_boot_timeout_is_a_boot_failure_ensure_reports(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    """EnsureTimeout and (fail_fast) WorkerBootFailed say which deadline was missed;
    a tree that ignores SIGTERM is SIGKILLed a second later."""
    pool = make_pool([
        policy_spec("deaf", "never_ready", boot_timeout=0.3, max_consecutive_failures=-1,
                    env={"IGNORE_TERM": "1"}),
    ])  # fmt: skip
    with pytest.raises(bgpool.WorkerBootFailed) as failed:
        pool.ensure("deaf", timeout=8, fail_fast=True)
    assert not isinstance(failed.value, bgpool.WorkerAborted)
    text = "BootTimeout: did not call get_worker_handle() within 0.3s of starting"
    assert "killed by SIGKILL" in str(failed.value) and text in str(failed.value), failed.value
    assert failed.value.diagnostics is not None
    with pytest.raises(bgpool.EnsureTimeout) as timed_out:
        pool.ensure("deaf", timeout=0.5)
    assert text in str(timed_out.value), timed_out.value


def test_boot_timeout_spares_a_worker_ready_in_time(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    ticks = sentinel_dir / "ticks"
    pool = make_pool([
        policy_spec("quick", "ticker", num=1, boot_timeout=0.3,
                    env={"TICK": "0.2", "TICKS": str(ticks)}),
    ])  # fmt: skip
    pid = the_status(pool, "quick").pid
    wait_for(lambda: len((read_text(ticks) or "").split()) >= 3, 10, "0.6 s of ticks")
    status = the_status(pool, "quick")
    assert (status.state, status.pid, status.attempts) == ("ready", pid, 1)


# ----------------------------------------------------------------------- heartbeats


def test_a_worker_that_stops_heartbeating_is_killed_and_restarted(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    pool, starts = noted_pool(
        make_pool, sentinel_dir, "beater", "hangs_once", num=1, heartbeat_timeout=0.4,
        env={"ONCE": str(sentinel_dir / "once"), "BEAT_SECONDS": "0.3"},
    )  # fmt: skip
    first = the_status(pool, "beater").pid

    def restarted() -> Any:
        s = the_status(pool, "beater")
        return s if s.state == "ready" and s.pid not in (None, first) else None

    status = wait_for(restarted, 10, "the hung worker restarted")
    assert status.hangs == 1
    assert gone(first)
    diag = pool.diagnostics("beater")
    assert diag.last_error is not None
    assert diag.last_error.type == "Hung"
    assert "no heartbeat for" in diag.last_error.message
    assert "heartbeat_timeout 0.4s" in diag.last_error.message
    assert diag.last_signal == "SIGTERM"
    assert metric(pool, "bgpool_worker_hangs_total", "beater") == 1
    assert metric(pool, "bgpool_worker_crashes_total", "beater") == 1  # a hang is a crash
    assert metric(pool, "bgpool_worker_restarts_total", "beater") == 1
    shown = status_command(pool)
    assert shown.returncode == 0, shown
    assert "beater.0: killed as hung once" in shown.stdout, shown.stdout
    shown = status_command(pool, "diagnostics", "beater")
    assert "last error:   Hung: no heartbeat for" in shown.stdout, shown.stdout
    # killed once its heartbeats had stopped for heartbeat_timeout, not while it beat
    attempts = start_lines(starts)
    assert len(attempts) == 2, attempts
    assert attempts[1][2] - attempts[0][2] >= 0.3 + 0.4 - policy.beat_interval(0.4)


def test_tick_heartbeats_while_it_waits_and_returns_false_at_a_drain(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    """tick(timeout) longer than heartbeat_timeout is no hang; once stop() drains
    the worker, tick() returns False."""
    ticks, out = sentinel_dir / "ticks", sentinel_dir / "out"
    pool = make_pool([
        policy_spec("ticker", "ticker", num=1, heartbeat_timeout=0.3,
                    env={"TICK": "0.5", "TICKS": str(ticks), "OUT": str(out)}),
    ])  # fmt: skip
    pid = the_status(pool, "ticker").pid
    wait_for(lambda: len((read_text(ticks) or "").split()) >= 3, 10, "three ticks of 0.5 s")
    status = the_status(pool, "ticker")
    assert (status.pid, status.hangs, status.attempts) == (pid, 0, 1)
    pool.stop("ticker")
    result, count = (read_text(out) or "").split()
    assert result == "False" and int(count) >= 3
    assert metric(pool, "bgpool_worker_hangs_total", "ticker") == 0


def test_tick_async_returns_false_at_a_drain(make_pool: MakePool, sentinel_dir: Path) -> None:
    out = sentinel_dir / "out"
    pool = make_pool([
        policy_spec("aticker", "async_ticker", num=1, heartbeat_timeout=0.3,
                    env={"TICK": "0.5", "OUT": str(out)}),
    ])  # fmt: skip
    pool.stop("aticker")
    assert (read_text(out) or "").split()[0] == "False"
    assert the_status(pool, "aticker").hangs == 0


# --------------------------------------------------------------------- max_restarts


def test_a_crash_loop_after_readiness_is_aborted_past_max_restarts(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    pool, starts = noted_pool(
        make_pool, sentinel_dir, "looper", "crash_loop", num=1, max_restarts=2, restart_window=60
    )
    wait_for(lambda: the_status(pool, "looper").state == "aborted", 10, "the crash loop aborted")
    assert len(start_lines(starts)) == 3  # the first run and max_restarts restarts
    diag = pool.diagnostics("looper")
    assert diag.state == "aborted" and diag.ever_ready
    assert diag.last_error is not None and diag.last_error.type == "RuntimeError"
    assert metric(pool, "bgpool_worker_crashes_total", "looper") == 3
    assert metric(pool, "bgpool_ready_workers", "looper") == 0
    # ensure() does not start it again: it hears why it was given up
    with pytest.raises(bgpool.WorkerAborted) as caught:
        pool.ensure("looper", timeout=5)
    assert "3 crashes within 60s, over max_restarts=2" in str(caught.value), caught.value
    assert "RuntimeError: crash loop after readiness" in str(caught.value), caught.value
    assert caught.value.diagnostics is not None
    assert len(start_lines(starts)) == 3
    # start_workers() is a fresh try; so is ensure() once stop() held it stopped
    pool.start_workers("looper")
    wait_for(lambda: len(start_lines(starts)) == 6, 10, "a fresh crash loop")
    wait_for(lambda: the_status(pool, "looper").state == "aborted", 10, "aborted again")
    pool.stop("looper")
    pool.ensure("looper", timeout=5)
    assert len(start_lines(starts)) >= 7


def test_crashes_further_apart_than_the_window_are_not_aborted(
    make_pool: MakePool, sentinel_dir: Path
) -> None:
    pool, starts = noted_pool(
        make_pool, sentinel_dir, "spaced", "crash_loop", num=1, max_restarts=1,
        restart_window=0.2, env={"CRASH_AFTER": "0.3"},
    )  # fmt: skip
    wait_for(lambda: len(start_lines(starts)) >= 4, 10, "three crash restarts")
    assert the_status(pool, "spaced").state != "aborted"
    pool.ensure("spaced", timeout=5)


# ----------------------------------------------------------------- declarations, rules


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("boot_timeout", 0),
        ("boot_timeout", -1.0),
        ("boot_timeout", float("nan")),
        ("heartbeat_timeout", 0),
        ("heartbeat_timeout", float("inf")),
        ("max_restarts", -1),
        ("restart_window", 0),
        ("max_memory", 0),
        ("max_lifetime", -5),
        ("lifetime_jitter", -0.1),
    ],
)
def test_policy_fields_are_checked_with_their_path(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        bgpool.PoolConfig.model_validate(
            {"workers": [{"name": "w", "target": "fixtures.policy_workers:ticker", field: value}]}
        )
    assert [e["loc"] for e in caught.value.errors()] == [("workers", 0, field)]


def test_policies_are_off_by_default() -> None:
    spec = policy_spec("w", "idle_until_stopped")
    assert spec.policies() == {
        "boot_timeout": None, "heartbeat_timeout": None, "max_restarts": None,
        "restart_window": 60.0, "max_memory": None, "max_lifetime": None,
        "lifetime_jitter": 0.1,
    }  # fmt: skip


def test_restart_intensity_rule() -> None:
    assert not policy.restarts_exhausted(5, None)
    assert policy.restarts_exhausted(1, 0)
    assert not policy.restarts_exhausted(2, 2)
    assert policy.restarts_exhausted(3, 2)


def test_heartbeat_checks_fall_on_a_grid_of_a_quarter_timeout() -> None:
    assert policy.beat_check_time(10.0, 2.0) == 10.0
    assert policy.beat_check_time(10.1, 2.0) == 10.5
    assert policy.beat_check_time(10.5, 2.0) == 10.5
    assert policy.beat_check_time(0.31, 0.4) == pytest.approx(0.4)


def test_lifetime_and_sampling_rules() -> None:
    assert policy.lifetime(10.0, 0.1, 0.0) == 10.0
    assert policy.lifetime(10.0, 0.1, 1.0) == pytest.approx(11.0)
    assert policy.sampling_interval(1) == 1.0
    assert policy.sampling_interval(100) == 2.0
    assert policy.sampling_interval(10_000) == 5.0
    assert policy.beat_interval(0.3) == pytest.approx(0.1)


# ------------------------------------------------------ decisions, on a fake clock


class PolicyMachine(Machine):
    """`Machine`, its fake runs given their boot deadlines as real ones are."""

    def _spawn_all(self, insts: list[Instance], announce: Callable[[], None] | None = None) -> None:
        super()._spawn_all(insts, announce)
        for inst in insts:
            self._arm_boot(inst)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Machine]:
    """test_transitions' supervisor that forks nothing, for one worker with
    policies: max_restarts=2 within 10 s, boot_timeout=1, heartbeat_timeout=2."""
    guarded = dataclasses.replace(
        decl(), max_restarts=2, restart_window=10.0, boot_timeout=1.0, heartbeat_timeout=2.0
    )
    sup = PolicyMachine([guarded], str(tmp_path / "c.sock"), Clock())
    try:
        yield sup
    finally:
        sup.release()


def test_crashes_past_max_restarts_within_the_window_abort(guarded: Machine) -> None:
    inst = the_instance(guarded)
    guarded.start_eager()
    guarded.ready(inst)
    for _ in range(2):  # two crashes within the window: restarted
        guarded.exit(inst, 1)
        guarded.advance(1.0)
        guarded.ready(inst)
    guarded.exit(inst, 1)  # the third: aborted, from ready
    assert state(inst) == State.ABORTED and inst.exhausted is not None
    assert "3 crashes within 10s, over max_restarts=2" in inst.exhausted
    assert not inst.worker.name_ready
    assert guarded.moves[-1] == ("ready", "aborted")
    assert_only_allowed_moves(guarded)


def test_crashes_that_left_the_window_no_longer_count(guarded: Machine) -> None:
    inst = the_instance(guarded)
    guarded.start_eager()
    guarded.ready(inst)
    for _ in range(6):  # a crash every 6 s: never more than two within 10 s
        guarded.exit(inst, 1)
        guarded.advance(1.0)  # the backoff (at most 1 s)
        guarded.ready(inst)
        for _ in range(5):  # heartbeats, well within the 2 s timeout
            guarded.advance(1.0)
            assert inst.run is not None
            inst.run.last_beat = guarded.timers.clock()
    assert state(inst) == State.READY and inst.hangs == 0 and inst.crashes == 6
    assert_only_allowed_moves(guarded)


def verdict(inst: Instance) -> dict[str, Any] | None:
    """Why a policy stopped the current run, if it did (a call: not narrowed)."""
    assert inst.run is not None
    return inst.run.verdict


def test_a_missed_heartbeat_is_a_hang_a_late_boot_a_boot_timeout(guarded: Machine) -> None:
    inst = the_instance(guarded)
    guarded.start_eager()
    guarded.advance(0.99)
    assert verdict(inst) is None
    guarded.advance(0.02)  # boot_timeout passed
    assert (verdict(inst) or {}).get("type") == "BootTimeout"
    guarded.exit(inst, -15)
    assert inst.failures == 1 and state(inst) == State.STARTING  # a boot failure
    guarded.ready(inst)
    guarded.advance(1.5)
    assert inst.run is not None
    inst.run.last_beat = guarded.timers.clock()  # a beat: the deadline moves to 2 s after it
    guarded.advance(1.0)  # the first check finds the beat
    guarded.advance(1.45)  # the deadline, 2 s after the beat, is checked on a 0.5 s grid
    assert verdict(inst) is None
    guarded.advance(0.1)
    hung = verdict(inst) or {}
    assert hung.get("type") == "Hung" and inst.hangs == 1
    assert "no heartbeat for 2.55s" in hung["message"]
    assert_only_allowed_moves(guarded)

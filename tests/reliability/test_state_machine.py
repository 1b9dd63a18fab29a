"""A hypothesis ``RuleBasedStateMachine`` drives one pool through random sequences
of ensure(), a crash (the worker raises), kill -9 of a worker, restart_workers() and
shutdown(), against a simple model of what must be running.

After every step the invariants are checked (allowing the supervisor a moment to
react to the last step): one table row per instance and exactly the names the model
started; a pid exactly in the running states; the supervisor's live children are
exactly the table's pids, and none of its children is a zombie; names never ensured
are untouched; a name ensured once stays ready (sticky); a catch-all never hosts
more names than its cap. Once shut down: every call raises ``PoolClosed`` and
nothing of the pool is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from helpers import (
    LeakCheck,
    assert_clean,
    describe,
    kill_all,
    live_children,
    procs_with_address,
    state,
    wait_for,
    zombie_children,
)
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import bgpool

TENANTS = ["t-1", "t-2", "t-3"]
CAP = 2
INSTANCES = {"eager": 1, "pool": 2, "lazy-a": 1, "lazy-b": 1}
NAMES = [*INSTANCES, *TENANTS]
RUNNING = {"starting", "ready", "stopping"}


def _config() -> bgpool.PoolConfig:
    target = "fixtures.workers:crashable"
    return bgpool.PoolConfig(
        grace_period=5.0,
        restart_grace_period=5.0,
        ensure_timeout=10.0,
        workers=[
            bgpool.WorkerSpec(name="eager", target=target, num=1),
            bgpool.WorkerSpec(name="pool", target=target, num=2),
            bgpool.WorkerSpec(name="lazy-a", target=target),
            bgpool.WorkerSpec(name="lazy-b", target=target),
            bgpool.WorkerSpec(target=target, max_instances=CAP),
        ],
    )


class PoolMachine(RuleBasedStateMachine):
    leak_check: LeakCheck
    """The running test's (``_run`` sets it): each example's pool is counted in it."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="sm-"))
        self.pool = bgpool.Pool(_config())
        self.pool.start()
        self.res = self.leak_check.track(self.pool)
        self.sup = self.res.supervisor
        self.started = {"eager", "pool"}  # names with instances (eager, or ensured)
        self.hosted: set[str] = set()  # catch-all names hosted
        self.closed = False
        self.problem = ""
        self.steps = 0

    # ------------------------------------------------------------------- rules

    @rule(name=st.sampled_from(NAMES))
    def ensure(self, name: str) -> None:
        if self.closed:
            with pytest.raises(bgpool.PoolClosed):
                self.pool.ensure(name, timeout=5)
            return
        if name in TENANTS and name not in self.hosted and len(self.hosted) >= CAP:
            with pytest.raises(bgpool.CatchAllLimitReached):
                self.pool.ensure(name, timeout=10)
            return
        self.pool.ensure(name, timeout=10)
        self.started.add(name)
        if name in TENANTS:
            self.hosted.add(name)

    @rule(names=st.lists(st.sampled_from(NAMES), min_size=2, max_size=3, unique=True))
    def ensure_batch(self, names: list[str]) -> None:
        if self.closed:
            with pytest.raises(bgpool.PoolClosed):
                self.pool.ensure(names, timeout=5)
            return
        new = [n for n in names if n in TENANTS and n not in self.hosted]
        if len(self.hosted) + len(new) > CAP:
            with pytest.raises(bgpool.CatchAllLimitReached):
                self.pool.ensure(names, timeout=10)
            return  # and nothing was started: the invariants check it
        self.pool.ensure(names, timeout=10)
        self.started.update(names)
        self.hosted.update(new)

    def _ready_pid(self, name: str, instance: int) -> int | None:
        rows = [s for s in self.pool.status() if s.name == name and state(s.state) == "ready"]
        if not rows:
            return None
        return rows[instance % len(rows)].pid

    @precondition(lambda self: not self.closed)
    @rule(name=st.sampled_from(NAMES), instance=st.integers(0, 1))
    def crash(self, name: str, instance: int) -> None:
        """The worker raises (SIGUSR1 handler in ``fixtures.workers:crashable``)."""
        pid = self._ready_pid(name, instance)
        if pid is not None:
            # it may be on its way out already (the last step's crash): then no-op
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    @precondition(lambda self: not self.closed)
    @rule(name=st.sampled_from(NAMES), instance=st.integers(0, 1))
    def kill9(self, name: str, instance: int) -> None:
        pid = self._ready_pid(name, instance)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @rule()
    def restart(self) -> None:
        if self.closed:
            with pytest.raises(bgpool.PoolClosed):
                self.pool.restart_workers()
            return
        before = {(s.name, s.instance): s.pid for s in self.pool.status()}
        self.pool.restart_workers()
        for s in self.pool.status():
            if s.name in self.started:
                old = before.get((s.name, s.instance))
                assert s.pid is not None and s.pid != old, f"not respawned: {s}"
            else:
                assert s.pid is None and s.attempts == 0, f"unstarted name restarted: {s}"

    @precondition(lambda self: self.steps >= 5)  # let most runs do something first
    @rule()
    def shutdown(self) -> None:
        self.pool.shutdown()
        self.closed = True
        assert_clean(self.res)

    # -------------------------------------------------------------- invariants

    def _consistent(self) -> bool:
        rows = self.pool.status()
        per_name = Counter(s.name for s in rows)
        expected = {n: c for n, c in INSTANCES.items()} | {t: 1 for t in self.hosted}
        problems = []
        if dict(per_name) != expected:
            problems.append(f"rows per name {dict(per_name)} != {expected}")
        for s in rows:
            running = state(s.state) in RUNNING
            if (s.pid is not None) != running:
                problems.append(f"{s.name}.{s.instance} {s.state} with pid {s.pid}")
            if s.name in self.started:
                if not s.ever_ready and s.instance == 0 and s.name != "pool":
                    problems.append(f"{s.name} lost its readiness")
                if state(s.state) in {"stopped", "aborted"}:
                    problems.append(f"{s.name}.{s.instance} is {s.state}")
            elif state(s.state) != "stopped" or s.attempts:
                problems.append(f"{s.name} was never ensured but is {s}")
        pids = {s.pid for s in rows if s.pid is not None}
        children = live_children(self.sup)
        if children != pids:
            problems.append(f"supervisor children {sorted(children)} != table {sorted(pids)}")
        zombies = zombie_children(self.sup)
        if zombies:
            problems.append(f"zombies {zombies}")
        self.problem = "; ".join(problems)
        return not problems

    @invariant()
    def pool_matches_model(self) -> None:
        self.steps += 1
        if self.closed:
            with pytest.raises(bgpool.PoolClosed):
                self.pool.status()
            assert not procs_with_address(self.res.address)
            return
        try:
            wait_for(self._consistent, timeout=3.0, what="consistency")
        except AssertionError:
            raise AssertionError(f"inconsistent after 3s: {self.problem}") from None
        # readiness is sticky: a name ensured once needs no round trip
        for name in self.started:
            self.pool.ensure(name, timeout=0.5)

    def teardown(self) -> None:
        try:
            if not self.closed:
                self.pool.shutdown()
                assert_clean(self.res)
        finally:
            kill_all(procs_with_address(self.res.address))
            shutil.rmtree(self.dir, ignore_errors=True)
        left = procs_with_address(self.res.address)
        assert not left, describe(left)


def _run(examples: int, steps: int, check: LeakCheck) -> None:
    PoolMachine.leak_check = check
    run_state_machine_as_test(
        PoolMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            derandomize=False,
            phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_state_machine_quick(no_leaks: LeakCheck) -> None:
    _run(examples=5, steps=10, check=no_leaks)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_state_machine_long(no_leaks: LeakCheck) -> None:
    _run(examples=25, steps=20, check=no_leaks)

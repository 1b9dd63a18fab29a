"""The supervisor's state machine on its own: the transition table, and the
lifecycle's decisions driven step by step on a fake clock, with no process
forked (`_spawn` records a run instead). Each scenario checks the states an
instance goes through, and that every move it made is one the table allows.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bgpool.shm.table import TableReader, new_name
from bgpool.states import TRANSITIONS, State, allowed
from bgpool.supervisor.core import Settings
from bgpool.supervisor.instances import Instance, Run
from bgpool.supervisor.loop import Supervisor
from bgpool.supervisor.registry import Decl
from bgpool.supervisor.timers import Timers
from bgpool.supervisor.waiters import Waiter

FAKE_PIDS = itertools.count(2**30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Machine(Supervisor):
    """A supervisor whose spawns fork nothing: each records a run with a fake
    pid, so exits and readiness can be fed in by hand."""

    def __init__(self, decls: list[Decl], address: str, clock: Clock) -> None:
        # spawn: no code generation is loaded, and _spawn_all below forks nothing
        settings = Settings(
            ensure_timeout=5.0, grace_period=3.0, restart_grace_period=2.0,
            start_method="spawn", max_vars_bytes=1 << 16, root=os.getcwd(), log_lines=100,
        )  # fmt: skip
        self.published: list[tuple[State, bool]] = []  # each table write: state, name ready
        super().__init__(decls, settings, os.getpid(), address, new_name())
        self.timers = Timers(clock)
        self.moves: list[tuple[str, str]] = []

    def _transition(
        self, inst: Instance, target: State, detail: str, level: int = logging.INFO
    ) -> None:
        self.moves.append((inst.state.label, target.label))
        super()._transition(inst, target, detail, level)

    def _publish(self, inst: Instance) -> None:
        self.published.append((inst.state, inst.worker.name_ready))
        super()._publish(inst)

    def _newest_code(self) -> None:
        return None  # no code generation is loaded, so no target is checked

    def _spawn_all(self, insts: list[Instance], announce: Callable[[], None] | None = None) -> None:
        if announce is not None:  # as the real one: once the processes are asked for
            announce()
        for inst in insts:
            inst.attempts += 1
            pid = next(FAKE_PIDS)
            inst.run = Run(pid, None, None, [])
            inst.started_mono = self.timers.clock()
            self.by_pid[pid] = inst
            self._transition(inst, State.STARTING, f"pid {pid}")

    def ready(self, inst: Instance) -> None:
        assert inst.run is not None
        inst.run.handle_taken = True
        self._maybe_ready(inst, inst.run)

    def exit(self, inst: Instance, status: int) -> None:
        assert inst.pid is not None
        del self.by_pid[inst.pid]
        self._on_exit(inst, status)

    def advance(self, seconds: float) -> None:
        assert isinstance(self.timers.clock, Clock)
        self.timers.clock.now += seconds
        self.timers.run_due()

    def release(self) -> None:
        """What `close()` releases, without its reaping of our own children."""
        self.selector.close()
        self.listener.close()
        self.table.destroy()
        for fd in (self.wake_r, self.wake_w, self.owner_fd):
            if fd is not None:
                os.close(fd)


def decl(name: str | None = "w", *, num: int = 1, max_failures: int = 3) -> Decl:
    return Decl(
        index=0, name=name, target="fixtures.workers:forever", script=None, num=num,
        cap=max(num, 1) if name is not None else 4, max_failures=max_failures, env={},
        args=[], scope_id=0, scope_label="",
    )  # fmt: skip


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    sup = Machine([decl()], str(tmp_path / "c.sock"), Clock())
    try:
        yield sup
    finally:
        sup.release()


def the_instance(sup: Machine) -> Instance:
    (worker,) = sup.workers.values()
    return worker.instances[0]


def state(inst: Instance) -> State:
    """The state now (a call, so a type checker does not narrow it across steps)."""
    return inst.state


def draining(inst: Instance) -> bool:
    return inst.drain is not None


def assert_only_allowed_moves(sup: Machine) -> None:
    bad = [(a, b) for a, b in sup.moves if not allowed(State[a.upper()], State[b.upper()])]
    assert not bad, f"moves outside the transition table: {bad}"


# -- the table ------------------------------------------------------------------------


def test_every_state_has_its_allowed_moves() -> None:
    assert set(TRANSITIONS) == set(State)
    for source, targets in TRANSITIONS.items():
        assert targets, f"{source.label} is a dead end"
        assert all(isinstance(t, State) for t in targets)


def test_every_state_is_reachable_from_stopped() -> None:
    seen, frontier = {State.STOPPED}, [State.STOPPED]
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(State)


def test_a_stopped_instance_can_only_be_started() -> None:
    """Started, or (a singleton) waiting on standby for its lease, which is
    itself only started or stopped."""
    assert TRANSITIONS[State.STOPPED] == {State.STARTING, State.STANDBY}
    assert TRANSITIONS[State.STANDBY] == {State.STARTING, State.STOPPED}
    assert not allowed(State.STOPPED, State.READY)
    assert not allowed(State.ABORTED, State.READY)
    assert allowed(State.STOPPING, State.STOPPED)


# -- the machine ----------------------------------------------------------------------


def test_start_and_readiness(machine: Machine) -> None:
    inst = the_instance(machine)
    machine.start_eager()
    assert state(inst) == State.STARTING and inst.pid is not None
    machine.ready(inst)
    assert state(inst) == State.READY and inst.ever_ready and inst.worker.name_ready
    reader = TableReader.attach(machine.table.name)
    try:
        assert reader.read(inst.slot).state == State.READY  # published
    finally:
        reader.close()
    assert machine.moves == [("stopped", "starting"), ("starting", "ready")]


def test_boot_failures_back_off_then_abort(machine: Machine) -> None:
    inst = the_instance(machine)
    machine.start_eager()
    machine.exit(inst, 1)  # first failure: restarted at once
    assert state(inst) == State.STARTING and inst.failures == 1
    machine.exit(inst, 1)  # second: 0.1 s of backoff
    assert state(inst) == State.BACKOFF
    machine.advance(0.09)
    assert state(inst) == State.BACKOFF
    machine.advance(0.02)
    assert state(inst) == State.STARTING
    machine.exit(inst, 1)  # third: max_failures=3 reached
    assert state(inst) == State.ABORTED and inst.pid is None
    assert ("starting", "crashed") in machine.moves
    assert ("crashed", "backoff") in machine.moves
    assert machine.moves[-1] == ("starting", "aborted")
    assert_only_allowed_moves(machine)


def test_a_crash_after_readiness_restarts_and_is_never_aborted(machine: Machine) -> None:
    inst = the_instance(machine)
    machine.start_eager()
    machine.ready(inst)
    for _ in range(10):
        machine.exit(inst, -9)
        machine.advance(1.0)
        if state(inst) == State.STARTING:
            machine.ready(inst)
    assert state(inst) == State.READY and inst.crashes == 10
    assert ("ready", "crashed") in machine.moves
    assert_only_allowed_moves(machine)


def test_an_instance_aborted_by_max_restarts_is_never_published_ready(tmp_path: Path) -> None:
    """The name stops being ready in the same table write that shows the
    instance aborted: a reader that saw it aborted, then called `ensure()`,
    could otherwise take the name for ready (found by CI, once)."""
    sup = Machine([dataclasses.replace(decl(), max_restarts=0)], str(tmp_path / "c.sock"), Clock())
    try:
        inst = the_instance(sup)
        sup.start_eager()
        sup.ready(inst)
        sup.exit(inst, 1)
        assert state(inst) == State.ABORTED and not inst.worker.name_ready
        assert (State.ABORTED, True) not in sup.published, sup.published
        assert (State.ABORTED, False) in sup.published
    finally:
        sup.release()


def test_a_clean_exit_is_paced(machine: Machine) -> None:
    inst = the_instance(machine)
    machine.start_eager()
    machine.ready(inst)
    machine.exit(inst, 0)  # 0 s after its start: waits out the pacing interval
    assert state(inst) == State.BACKOFF and inst.crashes == 0
    machine.advance(0.1)
    assert state(inst) == State.STARTING
    assert_only_allowed_moves(machine)


def test_a_drain_cancels_a_pending_restart(machine: Machine) -> None:
    inst = the_instance(machine)
    machine.start_eager()
    machine.exit(inst, 1)
    machine.exit(inst, 1)
    assert state(inst) == State.BACKOFF
    machine._drain(inst, 3.0, respawn=False)
    assert state(inst) == State.STOPPED
    machine.advance(5.0)  # the cancelled restart never fires
    assert state(inst) == State.STOPPED and inst.pid is None
    assert_only_allowed_moves(machine)


def test_a_restart_drain_respawns_and_a_shutdown_drain_stops(machine: Machine) -> None:
    inst = the_instance(machine)
    machine.start_eager()
    machine.ready(inst)
    machine._drain(inst, 3.0, respawn=True)
    assert state(inst) == State.STOPPING
    assert draining(inst)
    machine.exit(inst, 0)
    assert state(inst) == State.STARTING
    assert not draining(inst)
    machine.ready(inst)
    machine._drain(inst, 3.0, respawn=True)
    machine._drain(inst, 3.0, respawn=False)  # a shutdown during a restart wins
    machine.exit(inst, 0)
    assert state(inst) == State.STOPPED
    assert_only_allowed_moves(machine)


class Conn:
    """A control connection that keeps the replies sent on it."""

    def __init__(self) -> None:
        self.on_close: list[object] = []
        self.replies: list[dict[str, object]] = []

    def send(self, message: dict[str, object]) -> None:
        self.replies.append(message)


def test_ensure_waiters_hear_of_readiness(machine: Machine, tmp_path: Path) -> None:
    inst = the_instance(machine)
    conn = Conn()
    machine._wake([inst.worker])
    machine._wait(Waiter(conn, [inst.worker], 5.0))  # type: ignore[arg-type]
    assert not conn.replies
    machine.ready(inst)
    assert conn.replies and conn.replies[0]["ok"] is True


def test_start_hears_of_a_requirement_given_up_before_it_asked(tmp_path: Path) -> None:
    # The owner's start() request reaches the supervisor only after it began
    # the eager starts: on a loaded machine, "db" may have been given up, and
    # "app" with it, by then. start() must still say why, not time out.
    app = Decl(**{**vars(decl("app")), "requires": ["db"]})
    db = Decl(**{**vars(decl("db", num=0, max_failures=2)), "index": 1})
    sup = Machine([app, db], str(tmp_path / "c.sock"), Clock())
    try:
        sup.start_eager()
        (db_inst,) = sup.workers[(0, "db")].instances
        sup.exit(db_inst, 1)
        sup.exit(db_inst, 1)  # the second boot failure: given up
        assert state(db_inst) == State.ABORTED
        conn = Conn()
        sup._start(conn, {})  # type: ignore[arg-type]
        (reply,) = conn.replies
        assert reply["ok"] is False and reply["error"] == "StartupError"
        message = str(reply["message"])
        assert 'background worker "db" failed to start' in message
        assert 'background worker "app" was not started, as it requires "db"' in message
    finally:
        sup.release()


def test_a_move_outside_the_table_is_logged_as_a_bug(
    machine: Machine, caplog: pytest.LogCaptureFixture
) -> None:
    inst = the_instance(machine)
    with caplog.at_level(logging.ERROR, logger="bgpool"):
        machine._transition(inst, State.READY, "a bug")
    assert "not an allowed transition" in caplog.text
    assert "stopped to ready" in caplog.text

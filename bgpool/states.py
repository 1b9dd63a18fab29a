"""The lifecycle states of a worker instance, and the moves between them.

The supervisor moves an instance between states, only along `TRANSITIONS`
(its `_transition()` checks every move); the readiness table publishes the
state; clients, metrics and the CLI read it.

    STOPPED ──spawn──▶ STARTING ──handle taken──▶ READY
       ▲                 │  ▲                       │
       │           exit  │  │ respawn          exit │ drain
       │                 ▼  │                       ▼
       │     ABORTED ◀── CRASHED ──▶ BACKOFF     STOPPING ──exit──▶ STOPPED
       │  (boot failures     (restart waits)        │
       │   reached the cap;                         └──exit, restart──▶ STARTING
       │   or from READY: crashes past max_restarts)
       └── a drain cancels a pending restart (BACKOFF, CRASHED); stop() of an ABORTED one

A singleton (supervisor/leases.py) waits in STANDBY while another pool holds its
lease (or none can be taken):

    STOPPED, CRASHED, BACKOFF, ABORTED, STOPPING ──no lease──▶ STANDBY ──lease──▶ STARTING
                                                                 └──drain, stop()──▶ STOPPED
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    """The lifecycle state of one worker instance."""

    STOPPED = 0  # not running and not scheduled (lazy, drained, stop()ped, or never started)
    STARTING = 1  # process spawned, not ready in this run
    READY = 2  # ready in this run
    BACKOFF = 3  # exited; waiting before the next start
    CRASHED = 4  # exited abnormally; the next step (restart, backoff) follows at once
    ABORTED = 5  # given up: max_consecutive_failures boot failures, or crashes past max_restarts
    STOPPING = 6  # drain in progress
    STANDBY = 7  # a singleton whose lease this pool does not hold: it runs elsewhere, or waits

    @property
    def label(self) -> str:
        """The state as users see it: `"ready"`, `"backoff"`, ..."""
        return self.name.lower()


TRANSITIONS: dict[State, frozenset[State]] = {
    # spawned (eagerly at start(), or by ensure())
    State.STOPPED: frozenset({State.STARTING, State.STANDBY}),
    # ready; or the run ended: a failure (CRASHED, or ABORTED at the cap), a
    # clean exit of a worker that was ready before (restarted, perhaps paced);
    # or a drain began
    State.STARTING: frozenset(
        {State.READY, State.CRASHED, State.ABORTED, State.BACKOFF, State.STARTING, State.STOPPING}
    ),
    # the run ended (a crash, or a clean exit restarted at once or paced; a crash
    # past max_restarts within restart_window aborts), or a drain began
    State.READY: frozenset(
        {State.CRASHED, State.ABORTED, State.BACKOFF, State.STARTING, State.STOPPING}
    ),
    # a failure is followed at once by its restart, or by a backoff wait; a
    # drain cancels the pending restart; a singleton that lost its lease waits for it
    State.CRASHED: frozenset({State.STARTING, State.BACKOFF, State.STOPPED, State.STANDBY}),
    # the wait is over, or a drain cut it short (a singleton without its lease: STANDBY)
    State.BACKOFF: frozenset({State.STARTING, State.STOPPED, State.STANDBY}),
    # ensure() tries afresh after an abort (a singleton: for its lease first); stop()
    # holds it stopped
    State.ABORTED: frozenset({State.STARTING, State.STOPPED, State.STANDBY}),
    # the drained process exited: stopped for good, or respawned by a restart
    # (a singleton that lost its lease: its respawn waits for the lease)
    State.STOPPING: frozenset({State.STOPPED, State.STARTING, State.STANDBY}),
    # a singleton: its lease taken, so it starts; or a drain, stop(), a shutdown
    State.STANDBY: frozenset({State.STARTING, State.STOPPED}),
}
"""Every allowed move: `TRANSITIONS[from]` is the set of states it may go to."""


def allowed(source: State, target: State) -> bool:
    """Whether an instance may move from `source` to `target`."""
    return target in TRANSITIONS[source]

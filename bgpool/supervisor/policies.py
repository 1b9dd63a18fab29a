"""Deadlines a worker's run must meet: `boot_timeout` (ready within so many
seconds of its spawn) and `heartbeat_timeout` (once ready, a heartbeat at
least that often). A run that misses one is killed (SIGTERM to its process
tree, SIGKILL a second later) and its exit goes the usual way
(`Lifecycle._after_run`: a boot failure, or a crash after readiness), with
the policy's verdict as its error. `max_restarts` is decided with the other
abort rules, in `Lifecycle._after_run`.

Each deadline is one timer per run in the loop's heap, never a poll. A
heartbeat costs the supervisor nothing when it is sent: once a run is ready,
its notify pipe leaves the loop's selector (nothing it sends after readiness
needs an answer: a crash report is read at the exit), and the worker stamps
each beat with its CLOCK_MONOTONIC time, the supervisor's own clock (one
clock for the whole machine on Linux). When the deadline's timer fires, it
reads the beats waiting in the pipe (the worker sends at most
`policy.BEATS_PER_TIMEOUT` per timeout) and, if the latest was recent
enough, sets itself again from that beat's time: about one check per run and
timeout, however often the worker beats, and deadlines on a grid
(`policy.beat_check_time`) so one wake-up of the loop checks every run due.
"""

from __future__ import annotations

import functools
import logging
import signal

from .. import texts
from . import policy
from .drains import FORCE_KILL_DELAY
from .instances import Instance, Run, policy_error
from .rollouts import Rollouts

log = logging.getLogger("bgpool")


class Policies(Rollouts):
    """The boot and heartbeat deadlines of each run."""

    def _started(self, inst: Instance, pid: int, fds: list[int]) -> None:
        super()._started(inst, pid, fds)
        self._arm_boot(inst)

    def _arm_boot(self, inst: Instance) -> None:
        """Set the boot deadline of `inst`'s new run, if it has one."""
        timeout, run = inst.worker.decl.boot_timeout, inst.run
        if timeout is not None and run is not None:
            run.watchdog = self.timers.call_at(
                inst.started_mono + timeout,
                functools.partial(self._boot_overdue, inst, run, timeout),
            )

    def _on_ready(self, inst: Instance, run: Run) -> None:
        if run.watchdog is not None:
            run.watchdog.cancel()
            run.watchdog = None
        super()._on_ready(inst, run)
        timeout = inst.worker.decl.heartbeat_timeout
        if timeout is not None and inst.run is run:
            run.last_beat = self.timers.clock()  # readiness is the first heartbeat
            if run.notify_r is not None:  # read at each deadline from now on
                self.selector.unregister(run.notify_r)
            self._check_beat_at(inst, run, timeout)

    def _boot_overdue(self, inst: Instance, run: Run, timeout: float) -> None:
        """`timeout` (the run's `boot_timeout`, as declared when it was
        spawned) passed and the run is not ready: stop it; its exit is a boot
        failure saying which step it missed. A drain does not hold the
        deadline off: a boot that cannot finish would only keep a shutdown or
        a restart waiting for its whole grace period."""
        run.watchdog = None
        if inst.run is not run or run.ready:
            return
        missing = "call set_vars()" if run.handle_taken else "call get_worker_handle()"
        verdict = policy_error("BootTimeout", texts.boot_timed_out(missing, timeout))
        self._kill_run(inst, run, verdict)

    def _beat_overdue(self, inst: Instance, run: Run, timeout: float) -> None:
        """The heartbeat deadline came: set it again from the latest beat, or,
        with none within `timeout` (the run's `heartbeat_timeout`, as declared
        when it became ready: a reload's new value applies to its replacement),
        kill the run as hung."""
        run.watchdog = None
        if inst.run is not run or inst.drain is not None or run.verdict is not None:
            return
        self._on_notify(inst)  # a beat written but not read yet counts
        now = self.timers.clock()
        if now < run.last_beat + timeout:
            self._check_beat_at(inst, run, timeout)
            return
        inst.hangs += 1
        self._kill_run(inst, run, policy_error("Hung", texts.hung(now - run.last_beat, timeout)))
        self._publish(inst)

    def _check_beat_at(self, inst: Instance, run: Run, timeout: float) -> None:
        """Check `run`'s heartbeats once `timeout` has passed since the latest
        (at the next point of the timeout's grid: one wake-up checks them all)."""
        when = policy.beat_check_time(run.last_beat + timeout, timeout)
        run.watchdog = self.timers.call_at(
            when, functools.partial(self._beat_overdue, inst, run, timeout)
        )

    def _kill_run(self, inst: Instance, run: Run, verdict: dict[str, object]) -> None:
        """Stop `run` for a policy: SIGTERM to its process tree, SIGKILL a
        second later if it still runs; its exit is recorded with `verdict`."""
        run.verdict = verdict
        log.warning(
            "%s %s: SIGTERM to its process tree, SIGKILL %gs later",
            inst.label, verdict["message"], FORCE_KILL_DELAY,
        )  # fmt: skip
        self._signal_tree(run.pid, signal.SIGTERM)
        run.killer = self.timers.call_later(
            FORCE_KILL_DELAY, functools.partial(self._force_kill, inst, run)
        )

    def _force_kill(self, inst: Instance, run: Run) -> None:
        run.killer = None
        if inst.run is run:
            log.warning("%s still running 1s after SIGTERM: SIGKILL to its process tree",
                        inst.label)  # fmt: skip
            self._signal_tree(run.pid, signal.SIGKILL)

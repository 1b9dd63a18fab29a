"""Drains: stopping instances in named stages, for a restart or for good.

A drain closes the instance's stop pipe (its handle sees EOF), waits out the
grace period, then sends SIGTERM to the whole process tree, then SIGKILL one
second later; what the worker forked and left running after its exit gets the
same. `restart_workers()` drains every running instance with a respawn and
answers once all are back; a shutdown drains them for good and lets the loop
end once the last one exited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from .. import platform, texts
from ..protocol import error_reply
from ..shm.table import Status
from ..states import State
from .core import Core
from .instances import Drain, Instance
from .listener import Connection

log = logging.getLogger("bgpool")

FORCE_KILL_DELAY = 1.0
"""Seconds between SIGTERM and SIGKILL when a drain's grace period has passed."""


class Drains(Core):
    """Stopping instances: one at a time, all for a restart, all for good."""

    def _drain(self, inst: Instance, grace: float, respawn: bool) -> None:
        """Ask `inst` to stop (STARTING or READY to STOPPING): close its stop
        pipe, then after `grace` seconds SIGTERM its process tree, then SIGKILL.
        A pending restart (BACKOFF, CRASHED) is cut short instead."""
        if inst.drain is not None:  # already STOPPING: a shutdown overrides a restart
            inst.drain.respawn &= respawn
            return
        run = inst.run
        if run is None:
            if inst.state in (State.BACKOFF, State.CRASHED):
                if inst.timer is not None:
                    inst.timer.cancel()
                if respawn:
                    self._respawn(inst)
                else:
                    self._transition(inst, State.STOPPED, "pending restart cancelled by a drain")
            return
        inst.drain = Drain(respawn)
        if run.stop_w is not None:
            os.close(run.stop_w)
            run.stop_w = None
        self._transition(inst, State.STOPPING, f"stop pipe closed, grace period {grace:g}s")
        inst.timer = self.timers.call_later(grace, lambda: self._terminate(inst))

    def _terminate(self, inst: Instance) -> None:
        """The grace period passed: SIGTERM to the instance's process tree."""
        if inst.pid is None:
            return
        log.warning(
            "%s did not stop within its grace period: SIGTERM to its process tree", inst.label
        )
        self._signal_tree(inst.pid, signal.SIGTERM)
        inst.timer = self.timers.call_later(FORCE_KILL_DELAY, lambda: self._kill(inst))

    def _kill(self, inst: Instance) -> None:
        """Still running a second after SIGTERM: SIGKILL to its process tree."""
        if inst.pid is None:
            return
        log.warning("%s still running 1s after SIGTERM: SIGKILL to its process tree", inst.label)
        self._signal_tree(inst.pid, signal.SIGKILL)

    @staticmethod
    def _signal_tree(pid: int, sig: signal.Signals) -> None:
        """Signal a worker, its process group and every descendant (found before
        signalling, so one that moved to another session is still hit). The
        worker itself and its group are signalled even when the process table
        cannot be read (out of descriptors)."""
        procs = platform.process_tree(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        if not procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        platform.signal_tree(procs, sig)

    def _drain_all(self, grace: float, respawn: bool) -> set[Instance]:
        """Drain every instance; return those now stopping. One scan of the
        process table records what each has forked, so a descendant that
        outlives its worker's exit (a daemon in its own session) is stopped too."""
        instances = [inst for worker in self.workers.values() for inst in worker.instances]
        running = [inst.pid for inst in instances if inst.pid is not None and inst.drain is None]
        trees = platform.descendants(running)
        stopping = set()
        for inst in instances:
            tree = trees.get(inst.pid) if inst.pid is not None else None
            self._drain(inst, grace, respawn)
            if inst.drain is not None:
                if tree is not None:
                    inst.drain.tree = tree
                stopping.add(inst)
        return stopping

    def _drained(self, inst: Instance, status: int) -> None:
        """A draining instance exited: stop here, or respawn for a restart.
        What it forked and left running gets SIGTERM, then SIGKILL."""
        assert inst.drain is not None
        if inst.timer is not None:
            inst.timer.cancel()
        drain, inst.drain = inst.drain, None
        survivors = [proc for proc in drain.tree if proc.is_running()]
        if survivors:
            log.warning("%s left %d process(es) behind: SIGTERM, SIGKILL 1s later",
                        inst.label, len(survivors))  # fmt: skip
            platform.signal_tree(survivors, signal.SIGTERM)
            self.timers.call_later(
                FORCE_KILL_DELAY, lambda: platform.signal_tree(survivors, signal.SIGKILL)
            )
        if drain.respawn and not self.closing:
            log.info("%s drained (%s); restarting it", inst.label, texts.exit_words(status))
            self._respawn(inst)
        else:
            self._transition(inst, State.STOPPED, texts.exit_words(status))
        self._progress_restarts(inst)
        if self.closing and not self.by_pid:
            self.finished = True

    def _restart_all(self, conn: Connection | None) -> None:
        """restart_workers(): drain every running instance and respawn it;
        answer `conn` once all are back."""
        if self.closing:
            if conn is not None:
                conn.send(error_reply("PoolClosed", texts.SHUTTING_DOWN))
            return
        batch = self._drain_all(self.settings.restart_grace_period, respawn=True)
        self.restarts.append((batch, conn))
        self._progress_restarts(None)

    def _progress_restarts(self, done: Instance | None) -> None:
        for batch, conn in list(self.restarts):
            if done is not None:
                batch.discard(done)
            if not batch:
                self.restarts.remove((batch, conn))
                if conn is not None:
                    conn.send({"ok": True})

    def _shutdown(self, reason: str) -> None:
        """Drain every instance for good; the loop ends once all have exited.
        Every pending call is answered `PoolClosed` at once."""
        if self.closing:
            return
        self.closing = True
        self.table.set_status(Status.SHUTTING_DOWN)
        log.info("shutting down: %s", reason)
        closed = error_reply("PoolClosed", texts.SHUTTING_DOWN)
        for waiter in list(self.waiters):
            self._answer(waiter, closed)
        for _, conn in self.restarts:
            if conn is not None:
                conn.send(closed)
        self.restarts.clear()
        self._drain_all(self.settings.grace_period, respawn=False)
        if not self.by_pid:
            self.finished = True

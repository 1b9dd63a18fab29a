"""Drains: stopping instances in named stages, for a restart or for good.

A drain closes the instance's stop pipe (its handle sees EOF), waits out the
grace period, then sends SIGTERM to the whole process tree, then SIGKILL one
second later; what the worker forked and left running after its exit gets the
same. A restart drains an instance with a respawn (`rollouts.py` decides
which, and when); a shutdown drains them all for good and lets the loop end
once the last one exited.

A shutdown drains dependants before what they require (`WorkerSpec.requires`):
every instance enters its drain at once, with one deadline (the grace period
from the shutdown's start), but a worker whose dependants still run keeps its
stop pipe open until the last of their processes has exited. At the deadline
every instance still running gets SIGTERM (its stop pipe closed first), then
SIGKILL one second later, so the whole shutdown stays within grace_period + 1 s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from .. import platform, texts
from ..protocol import error_reply
from ..shm.table import Status
from ..states import State
from .core import Core
from .instances import Drain, Instance, Run, Worker

if TYPE_CHECKING:
    import psutil

log = logging.getLogger("bgpool")

FORCE_KILL_DELAY = 1.0
"""Seconds between SIGTERM and SIGKILL when a drain's grace period has passed."""


class Drains(Core):
    """Stopping instances: one at a time, or all for good."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dependants: dict[Worker, list[Worker]] = {}  # at shutdown: who requires each
        self.kept_open: set[Instance] = set()  # draining, stop pipe open until dependants exit

    def _drain(
        self,
        inst: Instance,
        grace: float,
        respawn: bool,
        tree: list[psutil.Process] | None = None,
        keep_open: bool = False,
    ) -> None:
        """Ask `inst` to stop (STARTING or READY to STOPPING): close its stop
        pipe (with `keep_open`, later: `_close_freed`), then after `grace`
        seconds SIGTERM its process tree, then SIGKILL; `tree` is what it had
        forked (found now if not given), stopped too if it outlives the
        worker. A pending restart (BACKOFF, CRASHED) is cut short instead."""
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
        if tree is None:
            tree = platform.descendants([run.pid]).get(run.pid, [])
        inst.drain = Drain(respawn, tree)
        if keep_open:
            self.kept_open.add(inst)
            detail = f"stop pipe closed once its dependants exit, grace period {grace:g}s"
        else:
            self._close_stop_pipe(run)
            detail = f"stop pipe closed, grace period {grace:g}s"
        self._transition(inst, State.STOPPING, detail)
        inst.timer = self.timers.call_later(grace, lambda: self._terminate(inst))

    def _terminate(self, inst: Instance, why: str = "did not stop within its grace period") -> None:
        """The grace period passed (or was skipped): SIGTERM to the instance's
        process tree, SIGKILL a second later."""
        run = inst.run
        if run is None:
            return
        if inst in self.kept_open:  # its dependants outlived the grace period
            self.kept_open.discard(inst)
            self._close_stop_pipe(run)
        log.warning("%s %s: SIGTERM to its process tree", inst.label, why)
        if inst.drain is not None:
            inst.drain.terminated = True
        self._signal_tree(run.pid, signal.SIGTERM)
        inst.timer = self.timers.call_later(FORCE_KILL_DELAY, lambda: self._kill(inst))

    def _kill(self, inst: Instance) -> None:
        """Still running a second after SIGTERM: SIGKILL to its process tree."""
        if inst.pid is None:
            return
        log.warning("%s still running 1s after SIGTERM: SIGKILL to its process tree", inst.label)
        self._signal_tree(inst.pid, signal.SIGKILL)

    @staticmethod
    def _close_stop_pipe(run: Run) -> None:
        """The drain signal: the worker's handle sees EOF."""
        if run.stop_w is not None:
            os.close(run.stop_w)
            run.stop_w = None

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

    def _drain_all(
        self,
        instances: list[Instance],
        grace: float,
        respawn: bool,
        keep_open: Collection[Instance] = (),
    ) -> None:
        """Drain `instances` (those in `keep_open` with their stop pipe left
        open). One scan of the process table records what each has forked,
        so a descendant that outlives its worker's exit (a daemon in its own
        session) is stopped too."""
        running = [inst.pid for inst in instances if inst.pid is not None and inst.drain is None]
        trees = platform.descendants(running)
        for inst in instances:
            tree = trees.get(inst.pid, []) if inst.pid is not None else None
            self._drain(inst, grace, respawn, tree, keep_open=inst in keep_open)

    def _drained(self, inst: Instance, status: int) -> None:
        """A draining instance exited: stop here, or respawn for a restart.
        What it forked and left running gets SIGTERM, then SIGKILL."""
        assert inst.drain is not None
        if inst.timer is not None:
            inst.timer.cancel()
        drain, inst.drain = inst.drain, None
        self.kept_open.discard(inst)
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
        if self.kept_open:
            self._close_freed()
        if self.closing and not self.by_pid:
            self.finished = True

    def _skip_grace(self) -> None:
        """Asked to stop at once (SIGQUIT: the owner got a second SIGINT or
        SIGTERM during its drain): shut down if not yet, and SIGTERM every
        draining instance's tree now instead of at the end of its grace period,
        SIGKILL a second later. A tree that got SIGTERM already keeps its
        SIGKILL timer."""
        self._shutdown("asked to stop at once")
        draining = [inst for worker in self.workers.values() for inst in worker.instances
                    if inst.drain is not None and not inst.drain.terminated]  # fmt: skip
        if draining:
            log.warning("grace period skipped: SIGTERM to %d worker(s), SIGKILL 1s later",
                        len(draining))  # fmt: skip
        for inst in draining:
            if inst.timer is not None:
                inst.timer.cancel()
            self._terminate(inst, "grace period skipped")

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
        instances = [inst for worker in self.workers.values() for inst in worker.instances]
        for worker in self.workers.values():
            for required in self._requirements(worker):
                self.dependants.setdefault(required, []).append(worker)
        kept = [i for i in instances if i.run is not None and self._dependants_run(i.worker)]
        self._drain_all(instances, self.settings.grace_period, respawn=False, keep_open=kept)
        if not self.by_pid:
            self.finished = True

    def _dependants_run(self, worker: Worker) -> bool:
        """Whether a process of a worker that requires `worker` still runs."""
        return any(i.run is not None for d in self.dependants.get(worker, ()) for i in d.instances)

    def _close_freed(self) -> None:
        """Close the stop pipes kept open whose worker's dependants have all exited."""
        for inst in [i for i in self.kept_open if not self._dependants_run(i.worker)]:
            self.kept_open.discard(inst)
            if inst.run is not None:
                log.info("%s: the workers that require it have exited: stop pipe closed",
                         inst.label)  # fmt: skip
                self._close_stop_pipe(inst.run)

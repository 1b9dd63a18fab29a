"""Per-worker control: `stop()`, `start_workers()` and `scale()`, what an
operator does to one worker of a running pool (supervisorctl's stop, start
and numprocs).

A stopped worker stays declared and keeps its slots, in state `stopped`;
it is *held*: no crash restart (its drain cancels a pending one), no reload
and no rollout starts it again, only `ensure()` or `start_workers()`
(`Lifecycle._wake`). Its name is no longer ready, so `ensure()` starts it and
waits. `scale()` sets a worker's `num` as if it were declared so, through the
machinery `reload()` resizes a pool with (`Reloads._resize`): the highest
indexes are drained for good, new instances start at once unless the worker
is held. Drains are `grace_period` long, as a shutdown's; the caller hears
back once every process it drained has exited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import texts
from ..protocol import Message, error_reply
from ..states import State
from .instances import Instance, Worker
from .reloads import Reloads


@dataclass(eq=False)
class Stop:
    """A `stop()` or `scale()` caller, answered once the instances it drained
    have exited."""

    left: set[Instance]
    done: Callable[[Message], None]


class Control(Reloads):
    """Stopping, starting and scaling named workers on an operator's request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stops: list[Stop] = []

    def _stop_workers(self, workers: list[Worker], done: Callable[[Message], None]) -> None:
        """stop(): drain every instance of `workers` for good and hold them
        stopped; `done` once each has exited."""
        for worker in workers:
            worker.held = True
        self._after_exits(self._halt(workers), done)

    def _halt(self, workers: list[Worker]) -> list[Instance]:
        """Drain every instance of `workers` for good (a pending restart is
        cancelled, an aborted one stopped) and return them: their names are
        not ready any more, so `ensure()` starts them again and waits; a call
        that was waiting for one of them hears that it was stopped."""
        instances = [inst for worker in workers for inst in worker.instances]
        for worker in workers:
            worker.name_ready = False
            for waiter in [w for w in self.waiters if worker in w.workers]:
                self._answer(waiter, error_reply("BgpoolError", texts.stopped(worker.name)))
        for inst in instances:
            if inst.state == State.ABORTED:
                self._transition(inst, State.STOPPED, "stopped after it was given up")
        self._leave_rollouts(instances)
        self._drain_all(instances, self.settings.grace_period, respawn=False)
        for inst in instances:
            self._publish(inst)
        self._settle_all()  # what waits for them to start, or is stopped itself, is not started
        return instances

    def _scale(self, worker: Worker, num: int, done: Callable[[Message], None]) -> None:
        """scale(): `num` instances from now on (0: lazy, and stopped). New
        instances start at once unless the worker is held; `done` once those
        drained have exited."""
        worker.num = num
        draining = self._resize(worker)
        if num == 0:
            draining += self._halt([worker])
        elif not worker.held:
            self._wake([worker])
        self._after_exits(draining, done)

    def _after_exits(self, instances: list[Instance], done: Callable[[Message], None]) -> None:
        """`done` now if none of `instances` is draining, else once the last has exited."""
        left = {inst for inst in instances if inst.drain is not None}
        if left:
            self.stops.append(Stop(left, done))
        else:
            done({"ok": True})

    def _drained(self, inst: Instance, status: int) -> None:
        super()._drained(inst, status)
        for stop in list(self.stops):
            stop.left.discard(inst)
            if not stop.left:
                self.stops.remove(stop)
                stop.done({"ok": True})

    def _shutdown(self, reason: str) -> None:
        if not self.closing:
            stops, self.stops = self.stops, []
            for stop in stops:
                stop.done(error_reply("PoolClosed", texts.SHUTTING_DOWN))
        super()._shutdown(reason)

"""Requirements between workers (`WorkerSpec.requires`): a worker starts
afresh only once every worker it requires is ready.

A fresh start (`start()`, `ensure()`, `start_workers()`, a reload's new
workers) of a worker whose requirements are not all ready starts those first,
as `ensure()` of each would, and holds the worker back: its instances stay
stopped, `Worker.waiting_for` (in its diagnostics) names what it waits for,
until the last requirement is ready (then its instances spawn, in one batch
with whatever else was released) or one can no longer come (given up, or
stopped: then it is not started, and the calls waiting for it hear why from
`waiters.py`). Nothing blocks: each readiness, exit and drain looks again at
what is held back. At `start()` this spawns eager workers in layers: those
that require nothing first, each dependant once what it requires is ready.

Restarts are not held back (after a crash, a backoff, a rolling restart):
readiness is sticky, so a requirement that was ready once stays ready, and a
dependant is not restarted when its requirement is. The other half, drains in
reverse order at shutdown, is `Drains._shutdown`'s.
"""

from __future__ import annotations

import logging
from typing import Any

from ..states import State
from .instances import Instance, Worker
from .lifecycle import Lifecycle

log = logging.getLogger("bgpool")

FRESH = frozenset({State.STOPPED, State.ABORTED})
"""The states a fresh start begins from."""


class Requirements(Lifecycle):
    """Holding back fresh starts until what they require is ready."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held_back: list[Worker] = []  # in the order they were held back
        self.releasing = False  # a pass over `held_back` is running
        self.release_again = False  # ... and something changed meanwhile

    def _start_fresh(self, insts: list[Instance]) -> None:
        """Spawn the instances of workers whose requirements are all ready;
        hold back the others, and start their requirements."""
        by_worker: dict[Worker, list[Instance]] = {}
        for inst in insts:
            by_worker.setdefault(inst.worker, []).append(inst)
        now = []
        for worker, group in by_worker.items():
            worker.given_up_on = []
            missing = [r for r in self._requirements(worker) if not r.name_ready]
            if missing:
                self._hold_back(worker, missing)
            else:
                now += group
        # a requirement started above may be in the batch too: started once
        super()._start_fresh([i for i in now if i.run is None and i.state in FRESH])

    def _hold_back(self, worker: Worker, missing: list[Worker]) -> None:
        """Keep `worker` stopped until `missing` are ready; start them (the
        instances of an aborted worker tried afresh stay stopped meanwhile)."""
        names = [r.name for r in missing]
        if worker not in self.held_back:
            self.held_back.append(worker)
            log.info("%s waits for %s before it starts", worker.label, ", ".join(names))
        worker.waiting_for = names
        for inst in worker.instances:
            if inst.state == State.ABORTED:
                self._transition(inst, State.STOPPED, f"its start waits for {', '.join(names)}")
        self._wake(missing)

    def _release_held(self) -> None:
        """Start the held-back workers whose requirements are all ready now;
        give up on those a requirement of which can no longer come (and on
        those the pool no longer has, or that were stopped meanwhile)."""
        if self.releasing:  # a start below failed at once: look again after this pass
            self.release_again = True
            return
        self.releasing = True
        try:
            again = True
            while again:
                again = self.release_again = False
                for worker in list(self.held_back):
                    again |= self._look_again(worker) == "dropped"
                again |= self.release_again
        finally:
            self.releasing = False

    def _look_again(self, worker: Worker) -> str:
        """Look again at one held-back worker: `"started"`, `"dropped"` or `"held"`."""
        current = self.workers.get((worker.decl.scope_id, worker.name)) is worker
        missing = [r for r in self._requirements(worker) if not r.name_ready]
        lost = [r for r in missing if not self._on_its_way(r)]
        if current and not worker.held and missing and not lost:
            worker.waiting_for = [r.name for r in missing]
            return "held"
        self.held_back.remove(worker)
        worker.waiting_for = []
        if current and not worker.held and not missing:
            log.info("%s: what it requires is ready, starting it", worker.label)
            super()._start_fresh([i for i in worker.instances
                                  if i.state == State.STOPPED and i.drain is None])  # fmt: skip
            return "started"
        if lost:
            worker.given_up_on = [r.name for r in lost]
            log.warning("%s is not started: %s cannot start now", worker.label,
                        ", ".join(r.name for r in lost))  # fmt: skip
        if current and worker.decl.name is None:
            self._release(worker)  # a catch-all name: its slot is free again
        return "dropped"

    def _on_its_way(self, worker: Worker) -> bool:
        """Whether a worker that is not ready may become so without a new
        start: held back, or an instance running or about to run again."""
        return worker in self.held_back or any(
            i.state not in (*FRESH, State.STOPPING) or (i.drain is not None and i.drain.respawn)
            for i in worker.instances
        )

    # -- what may release a held-back worker ---------------------------------------

    def _settle_all(self) -> None:
        """After a readiness, an exit, a stop: answer the waiters (a caller
        waiting for a held-back worker hears first why it will not start),
        then look again at what is held back."""
        super()._settle_all()
        if self.held_back:
            self._release_held()

    def _drained(self, inst: Instance, status: int) -> None:
        super()._drained(inst, status)
        if self.held_back:  # a requirement stopped
            self._release_held()

    def _shutdown(self, reason: str) -> None:
        for worker in self.held_back:
            worker.waiting_for = []
        self.held_back.clear()  # nothing starts any more
        super()._shutdown(reason)

"""Recycling: a graceful restart a policy asks for, `max_memory` (the RSS of a
run's process tree) or `max_lifetime` (with `lifetime_jitter`).

A recycle drains the instance (`restart_grace_period`, as a restart) and
respawns it from the code generation it runs (nothing new is loaded: the
point is a fresh process, not new code). Recycles are rolling, one instance
of a worker at a time: the next waits until the one replaced is ready again,
and in a pool an instance is drained only while another one is ready, so a
pool never has zero ready instances because of a recycle. An instance a
rollout (restart on new code) is about to replace is left to it.

Each run's lifetime is a timer set when it becomes ready, due at its spawn
plus `max_lifetime * (1 + u)`, `u` uniform in `[0, lifetime_jitter]`.
Memory is sampled by one timer for the whole pool, running only while some
ready instance sets `max_memory`: one pass over those instances' process
trees (a few /proc reads per process), every `policy.sampling_interval()`.
"""

from __future__ import annotations

import functools
import logging
import random
from typing import Any

from .. import platform
from ..shm.table import RecycleReason
from ..states import State
from . import policy
from .instances import Instance, Run, Worker
from .policies import Policies
from .timers import Timer

log = logging.getLogger("bgpool")

OVER = frozenset({State.CRASHED, State.BACKOFF, State.ABORTED, State.STOPPED})
"""The states that end a recycle's wait for its replacement."""


class Recycling(Policies):
    """Graceful restarts for memory and lifetime, rolling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sampler: Timer | None = None  # the next memory sample, while one is due

    # -- what asks for a recycle -----------------------------------------------------

    def _on_ready(self, inst: Instance, run: Run) -> None:
        super()._on_ready(inst, run)
        worker, decl = inst.worker, inst.worker.decl
        if inst.run is run and decl.max_lifetime is not None and run.lifetime is None:
            span = policy.lifetime(decl.max_lifetime, decl.lifetime_jitter, random.random())
            run.lifetime = self.timers.call_at(
                inst.started_mono + span,
                functools.partial(self._recycle, inst, run, RecycleReason.LIFETIME),
            )
        if decl.max_memory is not None:
            self._sample_later()
        if worker.recycling is inst:  # its replacement is ready: the next one's turn
            worker.recycling = None
        self._next_recycle(worker)

    def _sample_later(self) -> None:
        """Make sure a memory sample is due (one timer for the whole pool)."""
        if self.sampler is None:
            count = len(self._sampled())
            self.sampler = self.timers.call_later(policy.sampling_interval(count), self._sample)

    def _sampled(self) -> list[tuple[Instance, Run]]:
        """The ready runs whose worker sets `max_memory`."""
        return [
            (inst, inst.run)
            for worker in self.workers.values()
            if worker.decl.max_memory is not None
            for inst in worker.instances
            if inst.run is not None and inst.run.ready and inst.drain is None
        ]

    def _sample(self) -> None:
        """Measure every sampled run's process tree; recycle those over their
        worker's `max_memory`. Sampling stops while there is nothing to sample
        (the next ready instance that sets `max_memory` starts it again)."""
        self.sampler = None
        sampled = self._sampled()
        if not sampled:
            return
        sizes = platform.tree_rss([run.pid for _, run in sampled])
        for inst, run in sampled:
            limit = inst.worker.decl.max_memory
            size = sizes.get(run.pid)
            if limit is not None and size is not None and size > limit:
                log.warning("%s uses %d bytes (RSS of its process tree), over max_memory %d",
                            inst.label, size, limit)  # fmt: skip
                self._recycle(inst, run, RecycleReason.MEMORY)
        self._sample_later()

    def _recycle(self, inst: Instance, run: Run, reason: RecycleReason) -> None:
        """Queue a recycle of `run` (once: a run waiting for its turn is not
        queued again), and start it if it is its turn."""
        if reason is RecycleReason.LIFETIME:
            run.lifetime = None
        worker = inst.worker
        if inst.run is not run or worker.recycling is inst:
            return
        if any(queued is inst for queued, _, _ in worker.recycle_queue):
            return
        worker.recycle_queue.append((inst, run, reason))
        self._next_recycle(worker)

    # -- one at a time -----------------------------------------------------------------

    def _next_recycle(self, worker: Worker) -> None:
        """Start the worker's next recycle if none is under way and its pool
        keeps a ready instance meanwhile; drop the requests whose run ended or
        that a rollout will replace anyway."""
        queue = worker.recycle_queue
        while worker.recycling is None and queue and not self.closing:
            inst, run, reason = queue[0]
            if inst.run is not run or inst.state != State.READY or self._rolling(inst):
                queue.popleft()
                continue
            others = [i for i in worker.instances if i is not inst]
            if others and not any(i.state == State.READY for i in others):
                return  # asked again when another instance is ready
            queue.popleft()
            worker.recycling = inst
            inst.recycles[reason] += 1
            inst.recycle_reason = worker.last_recycle_reason = reason
            log.info("%s recycled (%s): draining it, then respawning it", inst.label,
                     reason.label)  # fmt: skip
            self._drain(inst, self.settings.restart_grace_period, respawn=True)

    def _rolling(self, inst: Instance) -> bool:
        """Whether a rollout is replacing `inst`, now or later."""
        return any(
            chain.step is inst or inst in chain.todo
            for rollout in self.rollouts
            for chain in rollout.chains
        )

    def _transition(
        self, inst: Instance, target: State, detail: str, level: int = logging.INFO
    ) -> None:
        """A recycle is over without a ready replacement when the instance
        fails to boot again, or is drained for good: the next one may go (once
        this transition's handler is done)."""
        super()._transition(inst, target, detail, level)
        worker = inst.worker
        if worker.recycling is inst and target in OVER:
            worker.recycling = None
            self.timers.call_later(0, functools.partial(self._next_recycle, worker))

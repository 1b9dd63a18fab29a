"""Rolling restarts: new code for running workers, without a gap in service.

A restart (`restart_workers()`, SIGHUP, a reload, a watched change) first loads
a new code generation, without blocking the loop. Once it has loaded, each
worker it can boot is replaced: a single instance is drained, then respawned
from the new generation; a pool's instances one at a time, the next drained
only once its replacement is ready, so a pool is never without a ready
instance. A worker whose new code fails to load is refused: its instances keep
running, and its diagnostics say why. A replacement that fails to boot (or is
not ready within restart_grace_period + 1 s + ensure_timeout) ends that
worker's rollout; the instance goes on as after any boot failure.
"""

from __future__ import annotations

import collections
import functools
import logging
import selectors
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import platform, texts
from ..protocol import Message, error_reply
from ..states import State
from .drains import FORCE_KILL_DELAY
from .generations import Generation
from .instances import Instance, Run, Worker
from .listener import Connection
from .registry import Decl
from .requirements import Requirements
from .timers import Timer
from .waiters import failure_reply

log = logging.getLogger("bgpool")

RESTARTABLE = frozenset({State.STARTING, State.READY, State.CRASHED, State.BACKOFF})
"""The states of an instance a restart replaces: running, or about to run again."""


@dataclass(eq=False)
class Chain:
    """One worker's instances, replaced one after the other."""

    worker: Worker
    todo: collections.deque[Instance]
    step: Instance | None = None  # being replaced now
    run: Run | None = None  # its replacement, once spawned
    timer: Timer | None = None


@dataclass(eq=False)
class Rollout:
    """One restart request: its workers, the generation they move to, whom to answer."""

    workers: list[Worker]
    generation: Generation | None  # None with start_method="spawn" once checked
    done: Callable[[Message], None]
    chains: list[Chain] = field(default_factory=list)
    failed: list[Worker] = field(default_factory=list)


class Rollouts(Requirements):
    """Loading new generations and replacing instances with them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rollouts: list[Rollout] = []

    def _load(
        self,
        decls: list[Decl],
        then: Callable[[Generation], None],
        done: Callable[[Message], None],
        skipped: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Load a new generation of `decls`' code without blocking the loop
        (but for the modules `skipped` names: `Generation`); `then` gets it
        once loaded, `done` hears why if it cannot be. If its process dies
        importing a module, it is loaded again without that module, as
        `_loaded` does."""
        if self.closing:
            done(error_reply("PoolClosed", texts.SHUTTING_DOWN))
            return
        try:
            gen = self._new_generation(decls, skipped)
        except OSError as exc:
            done(error_reply("BgpoolError", texts.no_generation(platform.os_error_words(exc))))
            return
        fd = gen.fileno()  # (take_load closes it if the generation died)

        def loaded(_fd: object) -> None:
            result = gen.take_load()
            if result is None:
                return  # it still imports
            self.selector.unregister(fd)
            again = None if result else gen.without_culprit()
            if again is not None:
                self._load(decls, then, done, again)
            elif not result:
                done(error_reply("BgpoolError", texts.no_generation(gen.death)))
            elif self.closing:
                gen.close()
                done(error_reply("PoolClosed", texts.SHUTTING_DOWN))
            else:
                then(gen)
            self._release_generations()

        self.selector.register(fd, selectors.EVENT_READ, loaded)

    def _roll(self, workers: list[Worker], done: Callable[[Message], None]) -> None:
        """Restart `workers` on a new generation; `done` hears the outcome."""
        self._load(self.registry.decls, lambda gen: self._begin(Rollout(workers, gen, done)), done)

    def _begin(self, rollout: Rollout) -> None:
        """Refuse the workers the new generation cannot boot; replace the
        others. The generation becomes the newest: fresh starts fork from it."""
        gen = rollout.generation
        assert gen is not None
        self.rollouts.append(rollout)
        self.current = gen
        if self.settings.start_method == "spawn":
            rollout.generation = None  # it only checked the code: spawned workers load their own
        for worker in rollout.workers:
            instances = [i for i in worker.instances if i.state in RESTARTABLE]
            error = gen.failure(worker.decl)
            if error is not None and instances:
                text = texts.restart_refused(worker.name, error)
                log.error("%s", text)
                attempt = max(i.attempts for i in worker.instances)
                worker.last_failure = texts.Failure(attempt, None, worker.decl.target, error)
                rollout.failed.append(worker)
            elif instances:
                rollout.chains.append(Chain(worker, collections.deque(instances)))
        if rollout.generation is None:
            gen.close()
        for chain in list(rollout.chains):
            self._next(rollout, chain)
        self._finish_if_done(rollout)

    def _next(self, rollout: Rollout, chain: Chain) -> None:
        """Replace the chain's next instance that still runs, or end the chain."""
        if chain.timer is not None:
            chain.timer.cancel()
        chain.step = chain.run = chain.timer = None
        while chain.todo:
            inst = chain.todo.popleft()
            if inst.state not in RESTARTABLE or inst.drain is not None:
                continue
            chain.step = inst
            limit = self.settings.restart_grace_period + FORCE_KILL_DELAY
            chain.timer = self.timers.call_later(
                limit + self.settings.ensure_timeout, functools.partial(self._step_failed, inst)
            )
            inst.generation = rollout.generation
            self._drain(inst, self.settings.restart_grace_period, respawn=True)
            return
        rollout.chains.remove(chain)

    def _leave_rollouts(self, instances: list[Instance]) -> None:
        """Instances drained for good (removed, scaled away, stopped) are no
        rollout's to replace: each chain skips them, and one that was
        replacing one of them moves on to its next instance."""
        leaving = set(instances)
        for rollout in list(self.rollouts):
            for chain in list(rollout.chains):
                chain.todo = collections.deque(i for i in chain.todo if i not in leaving)
                if chain.step in leaving:
                    self._next(rollout, chain)
            self._finish_if_done(rollout)

    def _chain_of(self, inst: Instance) -> tuple[Rollout, Chain] | None:
        for rollout in self.rollouts:
            for chain in rollout.chains:
                if chain.step is inst:
                    return rollout, chain
        return None

    def _step_failed(self, inst: Instance) -> None:
        """The replacement of `inst` failed to boot, or did not in time: that
        worker's rollout ends (the instance carries on as after a failure)."""
        found = self._chain_of(inst)
        if found is None:
            return
        rollout, chain = found
        chain.todo.clear()
        if chain.worker not in rollout.failed:
            rollout.failed.append(chain.worker)
        self._next(rollout, chain)
        self._finish_if_done(rollout)

    def _finish_if_done(self, rollout: Rollout) -> None:
        if rollout.chains:
            return
        if not rollout.failed:
            self._end(rollout, {"ok": True})
            return
        sentences = []
        for worker in rollout.failed:
            failure = worker.last_failure
            if failure is not None and failure.status is None and failure.error is not None:
                sentences.append(texts.restart_refused(worker.name, failure.error))
            elif failure is not None:
                sentences.append(texts.boot_failed(worker.name, failure))
            else:
                sentences.append(texts.not_replaced(worker.name))
        self._end(rollout, failure_reply("WorkerBootFailed", "; ".join(sentences), rollout.failed))

    def _end(self, rollout: Rollout, reply: Message) -> None:
        self.rollouts.remove(rollout)
        for chain in rollout.chains:
            if chain.timer is not None:
                chain.timer.cancel()
        rollout.done(reply)

    # -- what the lifecycle tells a rollout --------------------------------------------

    def _started(self, inst: Instance, pid: int, fds: list[int]) -> None:
        super()._started(inst, pid, fds)
        found = self._chain_of(inst)
        if found is not None and found[1].run is None:
            found[1].run = inst.run  # the replacement

    def _on_ready(self, inst: Instance, run: Run) -> None:
        super()._on_ready(inst, run)
        found = self._chain_of(inst)
        if found is not None and found[1].run is run:
            self._next(*found)
            self._finish_if_done(found[0])

    def _after_run(
        self,
        inst: Instance,
        status: int | None,
        run_seconds: float,
        error: dict[str, Any] | None,
        *,
        give_up: bool = False,
    ) -> None:
        super()._after_run(inst, status, run_seconds, error, give_up=give_up)
        if self._chain_of(inst) is not None:  # its replacement ended before it was ready
            self._step_failed(inst)

    def _shutdown(self, reason: str) -> None:
        if not self.closing:
            for rollout in list(self.rollouts):
                self._end(rollout, error_reply("PoolClosed", texts.SHUTTING_DOWN))
        super()._shutdown(reason)

    # -- requests ----------------------------------------------------------------------

    def _answer_conn(self, conn: Connection | None) -> Callable[[Message], None]:
        """A rollout's `done` that replies on `conn` (none: a signal asked)."""

        def done(reply: Message) -> None:
            if conn is not None:
                conn.send(reply)
            elif not reply.get("ok"):
                log.error("restart: %s", reply.get("message"))

        return done

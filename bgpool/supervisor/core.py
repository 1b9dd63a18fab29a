"""What every part of the supervisor shares: its settings, its picture of the
workers, the descriptors it waits on, the pending waiters, and the one way an
instance changes state (`_transition`, checked against `states.TRANSITIONS`).

The supervisor is layered, one job per module, each layer using the ones
below it: `Core` (here), `Drains`, `Lifecycle`, `Requirements`, `Rollouts`,
`Policies`, `Recycling`, `Reloads`, `Control`, `Watches`, `Leases`, `Requests`,
`Teardown`, and `Supervisor` (the loop). Everything runs
in the supervisor's single thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import texts
from ..naming import NameLock
from ..protocol import Message
from ..shm.table import TableWriter
from ..states import State, allowed
from . import slots
from .generations import Generation
from .instances import Instance, Worker
from .listener import Connection, Listener
from .logs import Follower
from .registry import Decl, Registry
from .relay import Relay
from .timers import Timers
from .waiters import Waiter

log = logging.getLogger("bgpool")
transitions_log = logging.getLogger("bgpool.transitions")
"""Every state transition, at INFO (WARNING, ERROR for failures): a logger of
its own, so an owner that shows them itself can have them left out."""


@dataclass(frozen=True)
class Settings:
    """The pool-wide settings the supervisor acts on."""

    ensure_timeout: float
    grace_period: float
    restart_grace_period: float
    start_method: str
    max_vars_bytes: int
    root: str  # what watch patterns are relative to
    log_lines: int  # relayed lines kept per worker name, for logs()
    name: str | None = None  # PoolConfig.name: the pool's socket is its name's (naming.py)
    coordinator: str | None = None  # Redis URL holding the singletons' leases (leases.py)
    lease_ttl: float = 10.0


def guarded(handler: Callable[..., None], *args: Any) -> None:
    """Run one event handler or teardown step; a bug in it is logged, not
    fatal, because the supervisor's death would take every worker with it."""
    try:
        handler(*args)
    except Exception:
        log.critical("internal error in the supervisor", exc_info=True)


class Core:
    """The supervisor's shared state."""

    def __init__(
        self,
        decls: list[Decl],
        settings: Settings,
        address: str,
        table: str,
        seed: socket.socket | None = None,
        first: Generation | None = None,
        lock: NameLock | None = None,
    ) -> None:
        """The state of a supervisor of `decls`; `first`, if given, is the
        generation asked of `seed` at start, still loading."""
        self.settings = settings
        self.seed = seed  # what generations are forked from (None: from the supervisor)
        self.pool_label = texts.pool_label(settings.name, address)  # in process titles
        self.pid = os.getpid()
        self.registry = Registry(decls)
        self.timers = Timers()
        with contextlib.ExitStack() as undo:  # a failed start leaves nothing behind
            self.selector = selectors.DefaultSelector()
            undo.callback(self.selector.close)
            count = slots.capacity(self.registry.slots_needed)
            self.table = TableWriter(count, self.pid, table)
            undo.callback(self.table.destroy)
            self.listener = Listener(address, lock)
            undo.callback(self.listener.close)
            self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            undo.pop_all()
        self.relay = Relay(self.selector)
        self.workers: dict[tuple[int, str], Worker] = {}
        self.by_pid: dict[int, Instance] = {}  # running instances
        self.slots = slots.Slots(self.table, count)
        self.waiters: list[Waiter] = []
        self.watchers: list[Connection] = []  # subscribed to state changes
        self.followers: dict[tuple[int, str], list[Follower]] = {}  # of a name's lines
        self.generations: list[Generation] = [first] if first else []  # oldest first
        # the newest loaded (or the first, loading): fresh starts fork from it
        # (with spawn: closed, it checked the code)
        self.current: Generation | None = first
        self.generation_count = len(self.generations)
        self.closing = False  # shutting down: drains are final, requests refused
        self.finished = False  # the loop may end
        self.startup_problem: Message | None = None  # start()'s error reply, before any spawn
        self.owner_fd: int | None = None
        for decl in decls:
            if decl.name is not None:
                self._declare(decl, decl.name)

    def _declare(self, decl: Decl, name: str) -> Worker:
        """Give a named declaration, or a catch-all's name, its worker and
        slots (the caller checked that enough are free)."""
        taken, gen = self.slots.take(Worker.instance_count(decl.num))
        worker = Worker(decl, name, taken, gen, log_lines=self.settings.log_lines)
        self.workers[(decl.scope_id, name)] = worker
        for inst in worker.instances:
            self._publish(inst)
        return worker

    # -- state -----------------------------------------------------------------------

    def _transition(
        self, inst: Instance, target: State, detail: str, level: int = logging.INFO
    ) -> None:
        """Move `inst` to `target`: publish it, log it, tell the watchers. A move
        that `TRANSITIONS` does not allow is a bug: it is logged as one (and
        made all the same, so the instance is not wedged)."""
        if not allowed(inst.state, target):
            log.error(
                "internal error: %s moved from %s to %s, which is not an allowed transition",
                inst.label, inst.state.label, target.label,
            )  # fmt: skip
        inst.state = target
        if target != State.ABORTED:
            inst.exhausted = None  # max_restarts' verdict holds while it stays aborted
        if target in (State.STOPPED, State.ABORTED):
            inst.generation = None  # a later start is a fresh one, from the newest code
        self._publish(inst)
        transitions_log.log(level, "%s %s: %s", inst.label, target.label, detail)
        event = {
            "event": "state",
            "worker": inst.worker.name,
            "scope": inst.worker.decl.scope_label,
            "instance": inst.index,
            "state": target.label,
            "pid": inst.pid,
            "detail": detail,
        }
        for conn in list(self.watchers):
            conn.send(event)

    def _requirements(self, worker: Worker) -> list[Worker]:
        """The workers `worker`'s declaration requires (named workers of its
        scope: the declarations were checked to have them)."""
        scope_id = worker.decl.scope_id
        return [self.workers[(scope_id, name)] for name in worker.decl.requires
                if (scope_id, name) in self.workers]  # fmt: skip

    def _publish(self, inst: Instance) -> None:
        self.table.write(inst.slot, inst.record())

    def _respawn(self, inst: Instance) -> None:
        """Start `inst` again after an exit (`Lifecycle`'s; drains call it)."""
        raise NotImplementedError

    # -- waiters ---------------------------------------------------------------------

    def _wait(self, waiter: Waiter) -> None:
        """Answer `waiter` now if its outcome is known, else when it is or at
        its deadline."""
        waiter.follow_requirements(self._requirements)
        if self._settle(waiter):
            return
        self.waiters.append(waiter)
        waiter.timer = self.timers.call_later(waiter.timeout, lambda: self._expire(waiter))
        waiter.conn.on_close.append(lambda: self._forget(waiter))

    def _forget(self, waiter: Waiter) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
            if waiter.timer is not None:
                waiter.timer.cancel()

    def _answer(self, waiter: Waiter, message: Message) -> None:
        self._forget(waiter)
        waiter.conn.send(message)

    def _settle(self, waiter: Waiter) -> bool:
        """Answer `waiter` if its outcome is known; return whether it was."""
        reply = waiter.outcome()
        if reply is not None:
            self._answer(waiter, reply)
        return reply is not None

    def _settle_all(self) -> None:
        for waiter in list(self.waiters):
            self._settle(waiter)

    def _expire(self, waiter: Waiter) -> None:
        waiter.timer = None
        self._answer(waiter, waiter.expired())

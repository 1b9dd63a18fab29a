"""`reload(config)`: a new set of declarations for a running pool, applied as
`supervisorctl update` applies a changed config.

Each declaration is known by its scope and name (a scope's catch-all by its
scope). One that is new is added (an eager one started, and waited for, as
`start()` does); one that is gone is drained and its names answer
`WorkerNotDeclared` at once; one whose fields differ is changed: its workers
take the new declaration and their running instances are restarted (rolling,
as `restart_workers()` does); the rest are left running. The new code is
loaded before anything changes: if a new or changed declaration's module
fails to import (or its script to compile), nothing changes at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .. import texts
from ..errors import WorkerNotDeclared
from ..protocol import Message, error_reply
from .core import Settings
from .generations import Generation
from .instances import Instance, Worker
from .listener import Connection
from .recycling import Recycling
from .registry import Decl, Registry
from .rollouts import Rollout
from .waiters import Waiter

log = logging.getLogger("bgpool")


def _key(decl: Decl) -> tuple[int, str | None]:
    return decl.scope_id, decl.name


@dataclass
class Report:
    """What a reload did, by declaration label (`ReloadReport`'s fields)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


class ReloadWaiter(Waiter):
    """A reload's caller, answered as `start()` is once the eager workers it
    added are ready, with the report; `WorkerBootFailed` if one (or what it
    requires) gave up, `EnsureTimeout` at the pool's ensure_timeout."""

    error = "WorkerBootFailed"
    opening = texts.RELOAD_FAILED
    expired_error = "EnsureTimeout"

    def __init__(self, conn: Connection, workers: list[Worker], timeout: float, report: Report):
        super().__init__(conn, workers, timeout, startup=True)
        self.report = report

    def outcome(self) -> Message | None:
        """The report, or why an added eager worker did not come up."""
        reply = super().outcome()
        if reply is None or not reply.get("ok"):
            return reply
        return {"ok": True, "report": self.report.__dict__}


class Reloads(Recycling):
    """Applying a new set of declarations to the running pool."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.retiring: list[Instance] = []  # drained for good; their slots freed once stopped

    def _update(self, conn: Connection, decls: list[Decl], settings: Settings) -> None:
        """Check the new declarations fit, load their code, then apply them."""
        held = len(self.retiring) + sum(len(w.instances) for w in self.workers.values())
        registry = Registry(decls)
        needed = registry.slots_needed + held
        if needed > self.slots.count:
            conn.send(error_reply("ValueError", texts.table_too_small(needed, self.slots.count)))
            return

        def loaded(gen: Generation) -> None:
            self._apply(conn, registry, settings, gen)

        self._load(decls, loaded, conn.send)

    def _apply(
        self, conn: Connection, registry: Registry, settings: Settings, gen: Generation
    ) -> None:
        """The new code loaded: refuse the reload if a new or changed
        declaration cannot run, else apply it."""
        decls = registry.decls
        old = {_key(d): d for d in self.registry.decls}
        new = {_key(d): d for d in decls}
        report = Report()
        changed, added = [], []
        for key, decl in new.items():
            before = old.get(key)
            if before is None:
                added.append(decl)
            elif before.fields() != decl.fields():
                changed.append((before, decl))
        refused = [
            (decl, error)
            for decl in added + [d for _, d in changed]
            if (error := gen.failure(decl)) is not None
        ]
        if refused:
            gen.close()
            text = "; ".join(
                texts.reload_refused(d.label, error, missing=gen.missing(d) is not None)
                for d, error in refused
            )
            conn.send(error_reply("WorkerBootFailed", text, diagnostics=[]))
            return
        self.registry = registry
        if settings.log_lines != self.settings.log_lines:
            for worker in self.workers.values():
                worker.keep_lines(settings.log_lines)
        self.settings = settings
        self.table.declarations_changed()  # clients learn the scopes again
        for key, decl in old.items():
            if key not in new:
                report.removed.append(decl.label)
                self._remove(decl)
        restart: list[Worker] = []
        for key, decl in new.items():
            before = old.get(key)
            if before is None:
                report.added.append(decl.label)
                continue
            moved = self._move(before, decl)
            if before.fields() == decl.fields():
                report.unchanged.append(decl.label)
            else:
                report.changed.append(decl.label)
                restart.extend(moved)
        new_workers = [self._declare(d, d.name) for d in added if d.name is not None]
        eager = [w for w in new_workers + restart if w.eager and not w.held]

        def rolled(reply: Message) -> None:
            if reply.get("ok"):
                # as start(): a singleton may be held elsewhere, or wait for its lease
                waited = [w for w in eager if not w.decl.singleton]
                self._wait(ReloadWaiter(conn, waited, self.settings.ensure_timeout, report))
            else:
                conn.send(reply)

        log.info("reload: %s", report)
        self._begin(Rollout(restart, gen, rolled))  # new code first for what runs, then:
        # what is new, a pool's new instances, and what max_restarts gave up (new settings)
        self._wake(eager, revive=True)

    def _move(self, before: Decl, decl: Decl) -> list[Worker]:
        """Hand `before`'s workers to `decl` (same scope and name); return them.
        A changed declaration's `num` replaces what `scale()` set (an unchanged
        one keeps it); a pool that shrank drains the instances it no longer has."""
        decl.hosted = before.hosted
        changed = before.fields() != decl.fields()
        workers = [w for w in self.workers.values() if w.decl is before]
        for worker in workers:
            worker.decl = decl
            if changed:
                worker.num = decl.num
            self._resize(worker)
        return workers

    def _resize(self, worker: Worker) -> list[Instance]:
        """Give `worker` the instances its `num` asks for: the highest indexes
        drained for good (returned), or new ones added, stopped (the caller
        starts them)."""
        count, had = Worker.instance_count(worker.num), len(worker.instances)
        retired = worker.instances[count:]
        if retired:
            self._retire(retired)
            del worker.instances[count:]
        elif count > had:
            slots, _ = self.slots.take(count - had)
            worker.instances += [Instance(worker, had + i, slot) for i, slot in enumerate(slots)]
            worker.gen = self.slots.bump([i.slot for i in worker.instances])
        for inst in worker.instances:
            self._publish(inst)
        return retired

    def _remove(self, decl: Decl) -> None:
        """Drain every worker of a removed declaration for good; its names are
        undeclared from now on (callers waiting on them hear so)."""
        for worker in [w for w in self.workers.values() if w.decl is decl]:
            del self.workers[(decl.scope_id, worker.name)]
            worker.name_ready = False
            worker.gen = self.slots.bump([i.slot for i in worker.instances])
            for waiter in [w for w in self.waiters if worker in w.workers]:
                self._answer(waiter, error_reply(WorkerNotDeclared.__name__,
                                                 texts.not_declared(worker.name)))  # fmt: skip
            self._retire(worker.instances)

    def _retire(self, instances: list[Instance]) -> None:
        """Drain `instances` for good; their slots go back once they stopped
        (at once for those not running)."""
        self.retiring += instances
        for inst in instances:
            self._publish(inst)
        self._leave_rollouts(instances)
        self._drain_all(instances, self.settings.grace_period, respawn=False)
        self._free_retired()

    def _free_retired(self) -> None:
        for inst in [i for i in self.retiring if i.run is None and i.drain is None]:
            if inst.timer is not None:
                inst.timer.cancel()
            self.retiring.remove(inst)
            self.slots.give_back([inst.slot])

    def _drained(self, inst: Instance, status: int) -> None:
        super()._drained(inst, status)
        if inst in self.retiring:
            self._free_retired()

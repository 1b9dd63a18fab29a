"""What a pending `ensure()` or `start()` hears, and when. Pure decisions over
the supervisor's state: the supervisor asks after every event that may change
an answer, and sends the reply a waiter returns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import texts
from ..protocol import Message, error_reply
from ..states import State
from .instances import Worker
from .timers import Timer

if TYPE_CHECKING:
    from .listener import Connection


class Waiter:
    """One pending call, answered exactly once: all its workers ready, one of
    them aborted (or, with `fail_fast`, failed to boot), or its deadline. A
    worker whose start waits for its requirements (`Worker.waiting_for`), or
    was given up on one (`Worker.given_up_on`, before the call came), is
    answered for the requirement that holds it back: the deepest one not
    ready, the first in trouble."""

    error = "StartupError"  # startup: what a failure is raised as, and its opening words
    opening = "could not start the pool"
    expired_error = "StartupError"  # startup: what the deadline is raised as

    def __init__(
        self,
        conn: Connection,
        workers: list[Worker],
        timeout: float,
        *,
        fail_fast: bool = False,
        startup: bool = False,
    ) -> None:
        self.conn = conn
        self.workers = workers
        self.timeout = timeout
        self.fail_fast = fail_fast
        self.startup = startup  # start(): every eager name ready, no instance aborted
        self.seen = {id(w): w.boot_failures for w in workers}
        self.requirements: Callable[[Worker], list[Worker]] = lambda _worker: []
        self.timer: Timer | None = None

    def follow_requirements(self, requirements: Callable[[Worker], list[Worker]]) -> None:
        """How a worker's requirements are found (the supervisor's registry);
        the boot failures of each worker they reach are counted from now, for
        `fail_fast`."""
        self.requirements = requirements
        todo = list(self.workers)
        while todo:
            for required in requirements(todo.pop()):
                if id(required) not in self.seen:
                    self.seen[id(required)] = required.boot_failures
                    todo.append(required)

    def _blocker(self, worker: Worker) -> list[Worker]:
        """The requirements holding back `worker`'s start, from the one it
        requires down to the deepest not ready; [] if its start is not waiting
        (or was not given up on one of them)."""
        path: list[Worker] = []
        current = worker
        while current.waiting_for or current.given_up_on:
            unready = [r for r in self.requirements(current) if not r.name_ready]
            if not unready:
                break
            current = min(unready, key=_trouble)
            path.append(current)
        return path

    def _failure(self, worker: Worker) -> tuple[str, str] | None:
        """The error `worker` itself is answered with, if it failed as the
        call cannot wait through: aborted, or with `fail_fast` a boot failure."""
        failure = worker.last_failure
        if failure is None:
            return None
        if worker.aborted:
            return "WorkerAborted", _aborted(worker, failure)
        seen = self.seen.get(id(worker), 0)
        if self.fail_fast and (worker.boot_failures > seen or worker.failing):
            return "WorkerBootFailed", texts.boot_failed(worker.name, failure)
        return None

    def outcome(self) -> Message | None:
        """The reply, if the outcome is known now."""
        if self.startup:
            return self._startup_outcome()
        pending = [w for w in self.workers if not w.name_ready]
        if not pending:
            return {"ok": True, "resolved": [[w.name, w.instances[0].slot, w.gen]
                                             for w in self.workers]}  # fmt: skip
        for worker in pending:
            path = self._blocker(worker)
            if not path:
                found = self._failure(worker)
                if found is not None:
                    return failure_reply(*found, [worker])
                continue
            root, names = path[-1], [p.name for p in path]
            if root.held:
                text = texts.requirement_stopped(worker.name, names)
                return failure_reply("BgpoolError", text, [root, worker])
            found = self._failure(root)
            if found is not None:
                text = texts.requirement_failed(worker.name, names, found[1])
                return failure_reply(found[0], text, [root, worker])
        return None

    def _startup_outcome(self) -> Message | None:
        """start() (or a reload's added eager workers): every one ready, or
        the first aborted instance, of a worker or of what it requires."""
        failed = [w for w in self.workers if _any_aborted(w)]
        blocked = []
        for worker in self.workers:
            path = [] if worker in failed else self._blocker(worker)
            if path and _any_aborted(path[-1]):
                blocked.append((worker, path))
                if path[-1] not in failed:
                    failed.append(path[-1])
        if failed:
            return startup_error(failed, self.timeout, self.error, self.opening, blocked)
        return {"ok": True} if all(w.name_ready for w in self.workers) else None

    def expired(self) -> Message:
        """The reply once the deadline passed: each worker not ready, and why."""
        pending = [w for w in self.workers if not w.name_ready]
        paths = [(w, self._blocker(w)) for w in pending]
        if self.startup:
            return startup_error([w for w, path in paths if not path], self.timeout,
                                 self.expired_error, self.opening,
                                 [(w, path) for w, path in paths if path])  # fmt: skip
        text = "; ".join(
            _held_reason(w, path, self.timeout) if path else _reason(w, self.timeout)
            for w, path in paths
        )
        return failure_reply("EnsureTimeout", text, [path[-1] if path else w for w, path in paths])


def _trouble(worker: Worker) -> int:
    """How a requirement that is not ready fares, worst first: given up,
    stopped, failing to boot, on its way."""
    if worker.aborted:
        return 0
    if worker.held:
        return 1
    return 2 if worker.failing else 3


def _aborted(worker: Worker, failure: texts.Failure) -> str:
    """WorkerAborted's message: the restart intensity `max_restarts` exceeded,
    or the boot failures that reached the cap."""
    exhausted = next((i.exhausted for i in worker.instances if i.exhausted), None)
    if exhausted is not None:
        return exhausted
    failures = max(i.failures for i in worker.instances)
    return texts.aborted(worker.name, failures, failure)


def _any_aborted(worker: Worker) -> bool:
    return any(i.state == State.ABORTED for i in worker.instances)


MESSAGE_BUDGET = 256 * 1024
"""Characters of an error message at most (a batch's names each add a sentence)."""

DIAGNOSTICS_BUDGET = 2 * 1024 * 1024
"""Encoded bytes of the diagnostics one reply carries at most: with the message,
well inside the control protocol's frame, whatever the workers printed."""


def failure_reply(error: str, text: str, workers: list[Worker]) -> Message:
    """An error reply with the diagnostics of the workers it is about, as many
    as fit the reply's budget (the message says how many were left out)."""
    diagnostics: list[Message] = []
    size = 0
    for worker in workers:
        entry = worker.diagnostics()
        size += len(json.dumps(entry))
        if size > DIAGNOSTICS_BUDGET:
            text += f" (diagnostics of {len(workers) - len(diagnostics)} more workers left out)"
            break
        diagnostics.append(entry)
    return error_reply(error, texts.clip(text, MESSAGE_BUDGET), diagnostics=diagnostics)


def _reason(worker: Worker, timeout: float) -> str:
    """Why `worker` is not ready: given up (an instance aborted), or not
    ready within `timeout`."""
    failure = worker.last_failure
    if _any_aborted(worker) and failure is not None:
        return _aborted(worker, failure)
    return texts.not_ready(worker.name, timeout, failure, worker.missing_step)


def _held_reason(worker: Worker, path: list[Worker], timeout: float) -> str:
    """Why `worker`, held back by the requirements `path`, is not ready: the
    last one's reason."""
    return texts.requirement_failed(worker.name, [p.name for p in path], _reason(path[-1], timeout))


def startup_error(
    workers: list[Worker],
    timeout: float,
    error: str = "StartupError",
    opening: str = "could not start the pool",
    blocked: list[tuple[Worker, list[Worker]]] | None = None,
) -> Message:
    """StartupError: each eager worker (or requirement) that was aborted or
    not ready in time, then each eager worker held back by a requirement
    (`blocked`: the worker and its path of requirements) and why (`reload()`
    says the same of the eager workers it added, as `error`)."""
    reasons = [_reason(worker, timeout) for worker in workers]
    for worker, path in blocked or []:
        names = [p.name for p in path]
        if path[-1] in workers:  # its own reason is said already
            reasons.append(texts.not_started(worker.name, names))
        else:
            reasons.append(_held_reason(worker, path, timeout))
    held = [w for pair in blocked or [] for w in (pair[1][-1], pair[0])]
    about = list(dict.fromkeys(workers + held))  # requirements and dependants, once each
    return failure_reply(error, f"{opening}: " + "; ".join(reasons), about)

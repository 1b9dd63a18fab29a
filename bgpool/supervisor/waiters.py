"""What a pending `ensure()` or `start()` hears, and when. Pure decisions over
the supervisor's state: the supervisor asks after every event that may change
an answer, and sends the reply a waiter returns.
"""

from __future__ import annotations

import json
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
    them aborted (or, with `fail_fast`, failed to boot), or its deadline."""

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
        self.timer: Timer | None = None

    def outcome(self) -> Message | None:
        """The reply, if the outcome is known now."""
        if self.startup:
            failed = [w for w in self.workers if _any_aborted(w)]
            if failed:
                return startup_error(failed, self.timeout)
            return {"ok": True} if all(w.name_ready for w in self.workers) else None
        pending = [w for w in self.workers if not w.name_ready]
        if not pending:
            return {"ok": True, "resolved": [[w.name, w.instances[0].slot, w.gen]
                                             for w in self.workers]}  # fmt: skip
        for worker in pending:
            failure = worker.last_failure
            if failure is None:
                continue
            if worker.aborted:
                return failure_reply("WorkerAborted", _aborted(worker, failure), [worker])
            if self.fail_fast and (worker.boot_failures > self.seen[id(worker)] or worker.failing):
                return failure_reply(
                    "WorkerBootFailed", texts.boot_failed(worker.name, failure), [worker]
                )
        return None

    def expired(self) -> Message:
        """The reply once the deadline passed: each worker not ready, and why."""
        pending = [w for w in self.workers if not w.name_ready]
        if self.startup:
            return startup_error(pending, self.timeout)
        text = "; ".join(
            texts.not_ready(w.name, self.timeout, w.last_failure, w.missing_step) for w in pending
        )
        return failure_reply("EnsureTimeout", text, pending)


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


def startup_error(
    workers: list[Worker],
    timeout: float,
    error: str = "StartupError",
    opening: str = "could not start the pool",
) -> Message:
    """StartupError: each eager worker that was aborted or not ready in time
    (`reload()` says the same of the eager workers it added, as `error`)."""
    reasons = []
    for worker in workers:
        failure = worker.last_failure
        if _any_aborted(worker) and failure is not None:
            reasons.append(_aborted(worker, failure))
        else:
            reasons.append(texts.not_ready(worker.name, timeout, failure, worker.missing_step))
    return failure_reply(error, f"{opening}: " + "; ".join(reasons), workers)

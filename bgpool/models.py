"""What bgpool reports: pydantic models for status and diagnostics, JSON-ready."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

RecycleReasonName = Literal["memory", "lifetime"]

StateName = Literal[
    "starting", "ready", "backoff", "crashed", "aborted", "stopping", "stopped", "standby"
]


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ErrorInfo(_Report):
    """The exception that ended a worker's run, as data (never re-raised)."""

    type: str
    message: str
    filename: str | None
    lineno: int | None
    traceback: str


class WorkerStatus(_Report):
    """One worker instance, as the readiness table shows it. `eager`: it
    belongs to a worker that should run whether or not anyone ensured it
    (`num >= 1`, as declared or as `scale()` set it; a stopped one included).
    `hangs`: times it was killed for a missed heartbeat; `recycles`: graceful
    restarts `max_memory` or `max_lifetime` asked for, the latest's reason in
    `last_recycle_reason`."""

    name: str
    scope: str
    instance: int
    pid: int | None
    state: StateName
    ever_ready: bool
    attempts: int
    consecutive_failures: int
    last_exit_status: int | None
    started_at: datetime | None
    ready_at: datetime | None
    eager: bool = False
    hangs: int = 0
    recycles: int = 0
    last_recycle_reason: RecycleReasonName | None = None


class LogLine(_Report):
    """One line a worker instance wrote, as the supervisor keeps it for
    `logs()`: when it was relayed (UTC), on which stream, by which instance
    of the name, and its text (without the newline; cut past 2,000 characters,
    saying how many more there were)."""

    time: datetime
    stream: Literal["stdout", "stderr"]
    instance: int
    line: str


class ReloadReport(_Report):
    """What `Pool.reload()` did, by declaration label: `name` in the global
    scope, `label:name` in another, `*` (or `label:*`) for a catch-all."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


class LeaseHolder(_Report):
    """Who holds a singleton's lease, as its coordinator (Redis) says: the host
    name and supervisor pid of the holding pool, since when (UTC) it holds it,
    its fencing token, whether its worker is ready there, and whether it is
    this pool."""

    host: str
    pid: int
    since: datetime
    lease_token: int
    ready: bool
    here: bool


class WorkerDiagnostics(_Report):
    """Why a worker is in the state it is in: one per name, with its instances.

    `last_exit_status` is negative when the process was killed by a signal, named
    in `last_signal`; `last_error` is the exception of the last failed run and
    `last_output` the last lines it wrote (when its output is relayed);
    `waiting_for` the requirements (`WorkerSpec.requires`) not ready yet
    while its start waits for them; `last_recycle_reason` why an instance of
    it was last recycled (`"memory"` or `"lifetime"`), None if none was.
    """

    name: str
    scope: str
    target: str
    state: StateName
    ever_ready: bool
    attempts: int
    consecutive_failures: int
    last_exit_status: int | None
    last_signal: str | None
    last_error: ErrorInfo | None
    last_output: list[str] = []
    waiting_for: list[str] = []
    vars_generation: int = 0
    vars_published_at: datetime | None = None
    last_recycle_reason: RecycleReasonName | None = None
    singleton: bool = False
    holder: LeaseHolder | None = None  # a singleton's lease holder, None if nobody holds it
    instances: list[WorkerStatus]

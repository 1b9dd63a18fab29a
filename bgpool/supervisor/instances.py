"""The supervisor's picture of its workers: names, instances and what they did.

Plain state, read and changed by the supervisor alone (which owns every
transition); nothing here does I/O. A `Worker` is a name in a scope (a named
declaration's instances, or one catch-all name); an `Instance` is one of its
processes, with the history the table and diagnostics show.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import texts
from ..protocol import FrameDecoder, Message
from ..shm.table import BOOT_BUCKETS, Kind, RecycleReason, Slot
from ..states import State
from . import logs, relay
from .registry import Decl
from .timers import Timer

if TYPE_CHECKING:
    import psutil

    from .generations import Generation


@dataclass(eq=False)
class Run:
    """One process of an instance, from its fork to its exit: its pipe ends and
    what it reported. Gone with the process, so nothing of one run leaks into
    the next."""

    pid: int
    stop_w: int | None  # closed to ask for a drain
    notify_r: int | None  # closed at EOF, or when the worker misbehaved
    outputs: list[int]  # read ends of its stdout/stderr pipes
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    error: dict[str, Any] | None = None  # the exception it reported
    handle_taken: bool = False
    published: bool = False  # set_vars() called
    ready: bool = False
    # lifecycle policies (policies.py, recycling.py)
    last_beat: float = 0.0  # the latest heartbeat (or readiness), supervisor's clock
    watchdog: Timer | None = None  # the boot timeout, then the heartbeat deadline
    lifetime: Timer | None = None  # max_lifetime's recycle
    killer: Timer | None = None  # SIGKILL, a second after a policy's SIGTERM
    verdict: dict[str, Any] | None = None  # why a policy killed it (an error record)

    def cancel_timers(self) -> None:
        """Drop the policies' timers: the process is gone."""
        for timer in (self.watchdog, self.lifetime, self.killer):
            if timer is not None:
                timer.cancel()


@dataclass(eq=False)
class Drain:
    """A drain in progress: whether the instance is respawned afterwards (a
    restart) and its descendants when the drain began, stopped too after its
    exit if they outlive it; whether its tree got SIGTERM already."""

    respawn: bool
    tree: list[psutil.Process] = field(default_factory=list)
    terminated: bool = False


class Instance:
    """One worker process slot: its current run, its history, its timer."""

    def __init__(self, worker: Worker, index: int, slot: int) -> None:
        self.worker = worker
        self.index = index
        self.slot = slot
        self.state = State.STOPPED
        self.run: Run | None = None
        self.drain: Drain | None = None  # set exactly while STOPPING
        self.attempts = 0
        self.failures = 0
        self.crashes = 0
        self.restarts = 0
        self.hangs = 0
        self.recycles = {RecycleReason.MEMORY: 0, RecycleReason.LIFETIME: 0}
        self.recycle_reason = RecycleReason.NONE  # the latest recycle's
        self.crash_times: collections.deque[float] = collections.deque()  # for max_restarts
        self.exhausted: str | None = None  # WorkerAborted's text once max_restarts aborted it
        self.ever_ready = False
        self.last_exit: int | None = None
        self.started_at = 0.0  # wall clock, for display
        self.started_mono = 0.0  # when the latest run began
        self.ready_at = 0.0
        self.boot_sum = 0.0
        self.boot_buckets = [0] * len(BOOT_BUCKETS)
        self.tail: collections.deque[str] = collections.deque(maxlen=relay.TAIL_LINES)
        self.timer: Timer | None = None  # the pending restart, or the drain's next stage
        # The code generation its next restart forks from (None: the newest).
        self.generation: Generation | None = None

    @property
    def pid(self) -> int | None:
        """The running process's pid, None between runs."""
        return self.run.pid if self.run is not None else None

    @property
    def label(self) -> str:
        """`job-runner.0`, or `api:job-runner.0` in a labelled scope."""
        return f"{self.worker.label}.{self.index}"

    def record(self) -> Slot:
        """This instance as the readiness table publishes it."""
        return Slot(
            gen=self.worker.gen,
            name_ready=self.worker.name_ready,
            kind=Kind.CATCH_ALL if self.worker.decl.name is None else Kind.NAMED,
            state=self.state,
            ever_ready=self.ever_ready,
            last_exit=self.last_exit,
            scope_id=self.worker.decl.scope_id,
            decl=self.worker.decl.index,
            instance=self.index,
            pool_size=len(self.worker.instances),
            pid=self.pid or 0,
            attempts=self.attempts,
            failures=self.failures,
            crashes=self.crashes,
            restarts=self.restarts,
            hangs=self.hangs,
            recycles_memory=self.recycles[RecycleReason.MEMORY],
            recycles_lifetime=self.recycles[RecycleReason.LIFETIME],
            recycle_reason=self.recycle_reason,
            started_at=self.started_at,
            ready_at=self.ready_at,
            boot_sum=self.boot_sum,
            boot_buckets=tuple(self.boot_buckets),
            name=self.worker.name,
            scope_label=self.worker.decl.scope_label,
            eager=self.worker.eager,
        )


class Worker:
    """A name in a scope: a named declaration's instances, or one catch-all name."""

    def __init__(
        self, decl: Decl, name: str, slots: list[int], gen: int, *, log_lines: int
    ) -> None:
        self.decl = decl
        self.name = name
        self.gen = gen  # the generation of its slots in the table
        self.num = decl.num  # as declared, or as scale() set it since
        self.instances = [Instance(self, i, slot) for i, slot in enumerate(slots)]
        self.logs = logs.ring(log_lines)  # its instances' last relayed lines
        self.name_ready = False
        self.held = False  # stop()ped: nothing starts it but ensure() or start_workers()
        self.boot_failures = 0
        self.last_failure: texts.Failure | None = None
        # the requirements not ready yet, while its start waits for them
        self.waiting_for: list[str] = []
        # those its last fresh start was given up on (they could not come), so
        # that a call asking only afterwards still hears why it did not start
        self.given_up_on: list[str] = []
        self.last_recycle_reason = RecycleReason.NONE
        self.recycling: Instance | None = None  # replaced now by a recycle (recycling.py)
        self.recycle_queue: collections.deque[tuple[Instance, Run, RecycleReason]] = (
            collections.deque()
        )  # recycles waiting for their turn: each instance, the run to replace, why
        # a singleton's: who holds its lease (`Leases._lease_of` sets it)
        self.lease_report: Callable[[], dict[str, Any] | None] | None = None

    def keep_lines(self, limit: int) -> None:
        """Keep `limit` lines from now on (a reload changed `log_lines`): the
        newest of those kept so far stay."""
        self.logs = logs.ring(limit, self.logs)

    @staticmethod
    def instance_count(num: int) -> int:
        """How many instances a worker asked for `num` has: a pool's size, else
        one (a lazy worker's, a catch-all name's: their `num` is 0)."""
        return max(num, 1)

    @property
    def eager(self) -> bool:
        """Whether its instances should run whether or not anyone ensured it: a
        named worker with num >= 1 (a stopped one included)."""
        return self.decl.name is not None and self.num >= 1

    @property
    def label(self) -> str:
        """The worker's name, prefixed by its scope label if it has one."""
        label = self.decl.scope_label
        return f"{label}:{self.name}" if label else self.name

    @property
    def aborted(self) -> bool:
        """Whether every instance was given up."""
        return all(inst.state == State.ABORTED for inst in self.instances)

    @property
    def stopped(self) -> bool:
        """Whether an instance is stopped or aborted: `ensure()` starts it afresh."""
        return any(inst.state in (State.STOPPED, State.ABORTED) for inst in self.instances)

    @property
    def missing_step(self) -> str:
        """What the worker has not done yet to be ready, for timeout messages."""
        if any(inst.state == State.STANDBY for inst in self.instances):
            return "become ready on the pool that holds its lease"
        waits_for_vars = self.decl.ready_on == "vars"
        runs = [i.run for i in self.instances if i.run is not None]
        if waits_for_vars and any(r.handle_taken and not r.published for r in runs):
            return "call set_vars()"
        return "call get_worker_handle()"

    @property
    def failing(self) -> bool:
        """Whether the latest run ended in a boot failure not yet recovered."""
        return any(not i.ever_ready and i.failures > 0 for i in self.instances)

    def diagnostics(self) -> dict[str, Any]:
        """What diagnostics() reports for this name, as plain data (the client
        adds the instances' table rows and the vars' generation and time)."""
        insts = self.instances
        state = min((i.state for i in insts), key=STATE_RANK.__getitem__)
        last = max(insts, key=lambda i: i.started_mono)
        failure = self.last_failure
        return {
            "name": self.name,
            "scope": self.decl.scope_label,
            "target": self.decl.target,
            "state": state.label,
            "ever_ready": any(i.ever_ready for i in insts),
            "attempts": sum(i.attempts for i in insts),
            "consecutive_failures": max(i.failures for i in insts),
            "last_exit_status": last.last_exit,
            "last_signal": texts.signal_name(last.last_exit),
            "last_error": failure.error if failure is not None else None,
            "last_output": list(failure.output) if failure is not None else [],
            "waiting_for": list(self.waiting_for),
            "last_recycle_reason": self.last_recycle_reason.label,
            "singleton": self.decl.singleton,
            "holder": self.lease_report() if self.lease_report is not None else None,
            "slots": [i.slot for i in insts],
        }


STATE_RANK = {
    state: rank
    for rank, state in enumerate(
        [
            State.READY,
            State.STARTING,
            State.STOPPING,
            State.STANDBY,
            State.CRASHED,
            State.BACKOFF,
            State.ABORTED,
            State.STOPPED,
        ]
    )
}
"""Which instance state stands for a pool's name: the most alive one."""


def policy_error(kind: str, message: str) -> dict[str, Any]:
    """An error record the supervisor writes itself (a run it could not
    start, or stopped for a lifecycle policy): no file, no traceback."""
    return {"type": kind, "message": message, "filename": None, "lineno": None, "traceback": ""}


def error_record(message: Message) -> dict[str, Any]:
    """Keep only the expected fields of a worker's error report, as strings."""

    def text(key: str, limit: int = 8000) -> str:
        value = message.get(key)
        return value[:limit] if isinstance(value, str) else ""

    lineno = message.get("lineno")
    return {
        "type": text("type", 200) or "Exception",
        "message": text("message"),
        "filename": text("filename", 4096) or None,
        "lineno": lineno if isinstance(lineno, int) and not isinstance(lineno, bool) else None,
        "traceback": text("traceback"),
    }

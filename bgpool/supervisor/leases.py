"""Singletons across hosts: a singleton worker runs only while this pool holds
its lease on the coordinator (Redis), shared by every pool with the same
coordinator and pool name; elsewhere it waits in STANDBY.

Data flow::

    supervisor (this layer,          coordinator process (coordinator/main.py)      Redis
     its link: coordination.py)
      want / ready / lost / release ──socketpair──▶  take, renew, release  ──────▶ lease keys
      ◀── acquired / renewed / lost / holder ──┘     (blocking redis-py, timeouts)
      │ its own timers: drain at drain_at(until), SIGKILL at until
      └── sigqueue(new until) ──▶ worker: kernel timer (timer_create) SIGKILLs it at until

Why the lease work is a process of its own: the supervisor forks (its code
generations, spawned workers), so it must stay single-threaded, and it must
never block. redis-py is a blocking client; non-blocking Redis I/O in this
loop would mean a hand-written protocol client and a state machine per
command. A small coordinator process per pool keeps the supervisor free of
redis (it never imports it) and of threads, and costs one process.

Why the holder is safe without trusting that process: every lease report
carries an absolute deadline, `until` (CLOCK_BOOTTIME), before which Redis
cannot have expired the key (`bgpool/leases.py`). The supervisor arms its own
timers from it: at `drain_at(until)` a lease not renewed meanwhile is given up
and its worker drained; at `until` the worker's tree is SIGKILLed. So a
coordinator that is frozen or dead, or a Redis that is down, paused or
partitioned away, still gets the worker killed before any other pool can take
the lease. If the supervisor is frozen as well (a SIGSTOP of the pool, a long
pause), the worker's own kernel timer kills it at `until`: a POSIX timer armed
in the worker before its target runs (`platform.guard_lease`), moved on by the
supervisor with a queued signal at each renewal and re-armed inside the signal
handler in C. What no timer covers (a worker that blocks the lease signal, a
frozen kernel, Redis's clock stepped forward) is said in the README, where
fencing tokens are the documented guard.

A new holder's worker starts at once, except after Redis restarted (a new
`run_id`): then every pool waits one `lease_ttl` first, because a holder from
before the restart may still be running while its key is gone
(`coordinator/store.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import leases, platform
from ..protocol import Message
from ..states import State
from ..worker.runtime import Boot
from .coordination import Link
from .instances import Instance, Run, Worker
from .listener import Connection
from .timers import Timer
from .watches import Watches

if TYPE_CHECKING:
    import psutil

log = logging.getLogger("bgpool")

RESTART_DELAY = 1.0
"""Seconds before a coordinator process that died is started again."""


@dataclass(eq=False)
class Lease:
    """One singleton's lease, as the supervisor sees it."""

    key: str  # leases.key_of(label, name)
    worker: tuple[int, str]  # its worker's (scope id, name)
    wanted: bool = False  # the coordinator was told to contend for it
    fence: int | None = None  # held: its fencing token
    token: str = ""  # held: the lease's random value in Redis
    until: float = 0.0  # held: its safe deadline (boottime)
    start_at: float = 0.0  # held: when its worker may start (a quarantine's end)
    since: float = 0.0  # held: since when (wall clock)
    run_fence: int | None = None  # the fence the running worker was started under
    holder: dict[str, Any] | None = None  # the holder elsewhere, as the coordinator says
    acquisitions: int = 0
    losses: int = 0
    drain: Timer | None = None  # held: the drain if not renewed in time
    start: Timer | None = None  # held: the start once a quarantine is over
    kill: Timer | None = None  # SIGKILL at the deadline: kept when the lease is lost

    def cancel_timers(self, *, kill: bool = False) -> None:
        """Cancel the drain and start timers (and the kill timer, if `kill`:
        only once nothing runs under the lease)."""
        for timer in (self.drain, self.start, self.kill if kill else None):
            if timer is not None:
                timer.cancel()
        self.drain = self.start = None
        if kill:
            self.kill = None

    def holder_report(self, here: int, ready: bool) -> dict[str, Any] | None:
        """Who holds the lease, for diagnostics (`models.LeaseHolder`):
        this pool (supervisor pid `here`, its worker `ready` or not), or
        the holder the coordinator last told of."""
        if self.fence is not None:
            return {"host": socket.gethostname(), "pid": here, "since": self.since,
                    "lease_token": self.fence, "ready": ready, "here": True}  # fmt: skip
        return {**self.holder, "here": False} if self.holder is not None else None


class Leases(Watches):
    """The lease of each singleton: the coordinator process, what it reports,
    and the timers that enforce each lease's deadline."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leases: dict[str, Lease] = {}
        self.guarded: set[int] = set()  # pids of workers whose lease guard is armed
        self.link: Link | None = None
        if self.settings.coordinator is not None:
            self.link = Link(
                self.selector, self.settings, self.pid, self._on_report, self._coordinator_gone
            )
            self._start_coordinator()

    # -- the coordinator process -----------------------------------------------------

    def _start_coordinator(self) -> None:
        """Start the coordinator process, and tell it what its predecessor (if
        any) was doing: the leases held (it resumes renewing them, if still
        in time) and those wanted."""
        assert self.link is not None
        try:
            self.link.start()
        except OSError as exc:
            log.error("cannot start the coordinator process (%s): retrying", exc)
            self.timers.call_later(RESTART_DELAY, self._start_coordinator)
            return
        for lease in self.leases.values():
            if lease.fence is not None:
                self._tell({"t": "want", "key": lease.key, "fence": lease.fence,
                            "token": lease.token, "until": lease.until})  # fmt: skip
            elif lease.wanted:
                self._tell({"t": "want", "key": lease.key})

    def _tell(self, message: Message) -> None:
        if self.link is not None:
            self.link.tell(message)

    def _on_report(self, message: Message) -> None:
        HANDLERS[message["t"]](self, message)

    def _coordinator_gone(self) -> None:
        """The coordinator exited: leases it held run out on their timers; a new
        one is started, and resumes renewing them if it can in time."""
        if not self.closing:
            log.error("the coordinator process exited: starting another in %gs", RESTART_DELAY)
            self.timers.call_later(RESTART_DELAY, self._start_coordinator)

    def close_coordinator(self) -> None:
        """Teardown: the coordinator carries out the releases, then exits."""
        if self.link is not None:
            self.link.close()

    # -- what the coordinator reports ------------------------------------------------

    def _acquired(self, message: Message) -> None:
        lease = self.leases.get(message["key"])
        if lease is None or not lease.wanted:  # let go meanwhile: give it back
            self._tell({"t": "release", "key": message["key"], "fence": message["fence"]})
            return
        lease.fence, lease.token = message["fence"], message["token"]
        lease.until, lease.start_at = message["until"], message["start_at"]
        lease.since, lease.holder = time.time(), None  # the holder is this pool now
        lease.acquisitions += 1
        log.info("lease of %s acquired, fencing token %d", lease.key, lease.fence)
        self._arm(lease)
        self._start_held(lease)

    def _renewed(self, message: Message) -> None:
        lease = self.leases.get(message["key"])
        if lease is not None and lease.fence == message["fence"]:
            lease.until = message["until"]
            self._arm(lease)
            self._start_held(lease)  # if it waits on standby (its restart came before this)

    def _lost(self, message: Message) -> None:
        lease = self.leases.get(message["key"])
        if lease is not None and lease.fence == message["fence"]:
            self._lose(lease, message["why"], tell=False)

    def _holder(self, message: Message) -> None:
        """Who holds a lease elsewhere: once its worker is ready there, the
        name is ready here too (`ensure()` returns once it is ready somewhere)."""
        lease = self.leases.get(message["key"])
        if lease is None:
            return
        lease.holder = message["holder"]
        worker = self.workers.get(lease.worker)
        if lease.holder and lease.holder["ready"] and worker and not worker.name_ready:
            worker.name_ready = True
            for inst in worker.instances:
                self._publish(inst)
            self._settle_all()

    # -- holding, losing ---------------------------------------------------------------

    def _arm(self, lease: Lease) -> None:
        """The timers of a held lease, from its safe deadline: drain once it is
        near and was not renewed, SIGKILL at it; and the worker's own guard."""
        for timer in (lease.drain, lease.kill):
            if timer is not None:
                timer.cancel()
        fence, now = lease.fence, platform.boottime()
        drain = leases.drain_at(lease.until, self.settings.lease_ttl)
        lease.drain = self.timers.call_later(drain - now, lambda: self._expiring(lease))
        lease.kill = self.timers.call_later(lease.until - now, lambda: self._deadline(lease, fence))
        inst = self._instance(lease)
        if inst is not None and inst.pid in self.guarded and lease.run_fence == fence:
            platform.move_lease_guard(inst.pid, lease.until)

    def _start_held(self, lease: Lease) -> None:
        """Start the worker of a held lease if it waits on standby: now, or
        once the quarantine after a Redis restart is over."""
        inst = self._instance(lease)
        if inst is None or inst.state != State.STANDBY or lease.fence is None:
            return
        wait = lease.start_at - platform.boottime()
        if wait <= 0:
            super()._spawn_all([inst])
        elif lease.start is None:
            log.warning("%s waits %.1fs to start: Redis is new or restarted, and a holder from "
                        "before may still run", inst.label, wait)  # fmt: skip
            lease.start = self.timers.call_later(wait, lambda: self._quarantine_over(lease))

    def _quarantine_over(self, lease: Lease) -> None:
        lease.start = None
        self._start_held(lease)

    def _expiring(self, lease: Lease) -> None:
        until = lease.until
        if self.link is not None:
            self.link.receive()
        if lease.fence is None or lease.until > until:  # lost, or renewed, meanwhile
            return
        self._lose(
            lease,
            "not renewed in time (Redis, or the coordinator process, did not answer)",
            tell=True,
        )

    def _lose(self, lease: Lease, why: str, *, tell: bool) -> None:
        """The lease is lost: its worker is drained, SIGKILLed at its deadline
        (that timer stays), then waits on standby for the lease again."""
        if tell:  # never to be renewed: its worker may be alive until the deadline
            self._tell({"t": "lost", "key": lease.key, "fence": lease.fence})
        lease.fence, lease.wanted, lease.token = None, False, ""
        lease.losses += 1
        lease.cancel_timers()
        inst = self._instance(lease)
        if inst is None:
            return
        log.warning("%s lost its lease: %s", inst.label, why)
        if inst.state == State.STANDBY:
            self._standby(inst, lease)
        elif inst.state != State.STOPPED:
            grace = max(0.0, (lease.until - platform.boottime()) / 2)
            self._drain(inst, grace, respawn=True)  # the respawn waits for the lease

    def _deadline(self, lease: Lease, fence: int | None) -> None:
        """The safe deadline of the lease under `fence` passed: whatever runs
        under it is killed now."""
        inst = self._instance(lease)
        if inst is not None and inst.pid is not None and lease.run_fence == fence:
            log.error("%s: SIGKILL at its lease's deadline", inst.label)
            self._signal_tree(inst.pid, signal.SIGKILL)

    def _let_go(self, lease: Lease) -> None:
        """Stop contending for the lease, and release it if held (its worker
        is not running: released, another pool may start one at once)."""
        if lease.fence is not None or lease.wanted:
            self._tell({"t": "release", "key": lease.key, "fence": lease.fence})
        lease.fence, lease.wanted, lease.token = None, False, ""
        lease.cancel_timers(kill=True)

    def _standby(self, inst: Instance, lease: Lease) -> None:
        """Wait for the lease (STANDBY), the coordinator contending for it."""
        if inst.state != State.STANDBY:
            holder = lease.holder
            where = f"held by {holder['host']} pid {holder['pid']}" if holder else "waiting for it"
            self._transition(inst, State.STANDBY, f"singleton, lease {where}")
        if not lease.wanted:
            lease.wanted = True
            self._tell({"t": "want", "key": lease.key})

    def _lease_of(self, inst: Instance) -> Lease | None:
        """The lease of a singleton's instance (None for any other worker)."""
        worker = inst.worker
        if not worker.decl.singleton or self.settings.coordinator is None:
            return None
        key = leases.key_of(worker.decl.scope_label, worker.name)
        lease = self.leases.get(key)
        if lease is None:
            lease = self.leases[key] = Lease(key, (worker.decl.scope_id, worker.name))
        if worker.lease_report is None:
            worker.lease_report = lambda: lease.holder_report(self.pid, _ready(worker))
        return lease

    def _instance(self, lease: Lease) -> Instance | None:
        worker = self.workers.get(lease.worker)
        return worker.instances[0] if worker is not None and worker.decl.singleton else None

    # -- hooks into the lifecycle ------------------------------------------------------

    def _spawn_all(self, insts: list[Instance], announce: Callable[[], None] | None = None) -> None:
        """A singleton starts only under a lease it holds (past any quarantine);
        else it waits for one on standby (announced first)."""
        now = platform.boottime()
        spawn, standby = [], []
        for inst in insts:
            lease = self._lease_of(inst)
            if lease is None or (lease.fence is not None and lease.start_at <= now < lease.until):
                spawn.append(inst)
            else:
                standby.append((inst, lease))
        if standby and announce is not None:
            announce()
            announce = None
        for inst, lease in standby:
            self._standby(inst, lease)
        if spawn:
            super()._spawn_all(spawn, announce)

    def _boot(self, inst: Instance, fds: list[int]) -> Boot:
        boot = super()._boot(inst, fds)
        lease = self._lease_of(inst)
        if lease is None:
            return boot
        lease.run_fence = lease.fence
        return dataclasses.replace(boot, lease_token=lease.fence, lease_deadline=lease.until)

    def _lease_guarded(self, inst: Instance) -> None:
        """The worker armed its lease guard: from now on each renewal moves it
        (before, the lease signal would have killed it); once now, in case a
        renewal came since its boot."""
        lease = self._lease_of(inst)
        if lease is not None and inst.pid is not None:
            self.guarded.add(inst.pid)
            if lease.fence is not None and lease.run_fence == lease.fence:
                platform.move_lease_guard(inst.pid, lease.until)

    def _on_ready(self, inst: Instance, run: Run) -> None:
        super()._on_ready(inst, run)
        lease = self._lease_of(inst)
        if lease is not None and lease.fence is not None and lease.run_fence == lease.fence:
            self._tell({"t": "ready", "key": lease.key, "fence": lease.fence})

    def _on_exit(self, inst: Instance, status: int) -> None:
        if inst.pid is not None:
            self.guarded.discard(inst.pid)
        super()._on_exit(inst, status)

    def _drain(
        self,
        inst: Instance,
        grace: float,
        respawn: bool,
        tree: list[psutil.Process] | None = None,
        keep_open: bool = False,
    ) -> None:
        """A singleton on standby has nothing to drain: it stops contending
        (and stays on standby for a restart)."""
        if inst.state != State.STANDBY:
            super()._drain(inst, grace, respawn, tree, keep_open)
            return
        lease = self._lease_of(inst)
        if not respawn and lease is not None:
            self._let_go(lease)
            self._transition(inst, State.STOPPED, "no longer waiting for its lease")

    def _drained(self, inst: Instance, status: int) -> None:
        """A singleton drained for good (shutdown, stop(), removed) gives its
        lease back, now that its worker is gone."""
        super()._drained(inst, status)
        lease = self._lease_of(inst)
        if lease is not None and inst.state == State.STOPPED:
            self._let_go(lease)

    # -- reports -------------------------------------------------------------------------

    def _leases_request(self, conn: Connection, _message: Message) -> None:
        """Each singleton's lease, for metrics: held here or not, acquisitions,
        losses, and its holder."""
        reports = []
        for lease in self.leases.values():
            worker = self.workers.get(lease.worker)
            if worker is None:
                continue
            reports.append({
                "name": worker.name, "scope": worker.decl.scope_label,
                "held": lease.fence is not None, "acquisitions": lease.acquisitions,
                "losses": lease.losses, "holder": lease.holder_report(self.pid, _ready(worker)),
            })  # fmt: skip
        conn.send({"ok": True, "leases": reports})


def _ready(worker: Worker) -> bool:
    return any(inst.state == State.READY for inst in worker.instances)


HANDLERS: dict[str, Callable[[Leases, Message], None]] = {
    "acquired": Leases._acquired,
    "renewed": Leases._renewed,
    "lost": Leases._lost,
    "holder": Leases._holder,
}
"""What the supervisor does with each kind of coordinator message."""

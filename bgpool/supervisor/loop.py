"""The supervisor process: one thread, one event loop, every state transition.

Data flow::

    application processes            supervisor (this module)              workers
    Pool / PoolClient  ── control socket: JSON requests ──▶  run()
          ▲                                   │ fork (single thread) ──────▶ worker.run_forked()
          │                                   │ stop pipe: close = drain ──▶ handle EOF
          │                                   ◀── notify pipe: ready, error ─┘
          │                                   ◀── SIGCHLD via wake-up pipe (exits, reaped at once)
          └── reads ── readiness table (shared memory) ◀── writes (seqlock) ─┘

The loop blocks in `select()` on the listener, the client connections, every
worker's notify pipe, the signal wake-up pipe and the owner's pidfd, with a
timeout computed from the next timer (restart backoff, ensure deadlines, drain
stages), so an idle supervisor uses no CPU. Signal handlers only write a byte to
the wake-up pipe; all logic happens in the loop.

Nothing here is imported by worker-side code.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import logging
import math
import os
import selectors
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from .. import platform, texts
from ..errors import CatchAllLimitReached, PoolClosed, WorkerNotDeclared
from ..names import name_problem
from ..protocol import FrameDecoder, Message, ProtocolError
from ..shm import varstore
from ..shm.table import BOOT_BUCKETS, Slot, TableWriter
from ..states import State
from ..worker.runtime import Boot, exec_spawned, run_forked
from . import policy, relay
from .instances import Instance, Worker, error_record
from .listener import Connection, Listener
from .registry import Decl, Registry
from .timers import Timers
from .waiters import Waiter

log = logging.getLogger("bgpool")

FORCE_KILL_DELAY = 1.0
"""Seconds between SIGTERM and SIGKILL when a drain's grace period has passed."""


@dataclass(frozen=True)
class Settings:
    """The pool-wide settings the supervisor acts on."""

    ensure_timeout: float
    grace_period: float
    restart_grace_period: float
    start_method: str
    max_vars_bytes: int


class Supervisor:
    """The event loop and the state machine of every worker instance."""

    def __init__(self, decls: list[Decl], settings: Settings, owner_pid: int, address: str) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.registry = Registry(decls)
        self.timers = Timers()
        self.selector = selectors.DefaultSelector()
        self.relay = relay.Relay(self.selector)
        self.table = TableWriter(self.registry.nslots, self.pid)
        self.listener = Listener(address)
        self.workers: dict[tuple[int, str], Worker] = {}
        self.by_pid: dict[int, Instance] = {}
        self.gens = [1] * self.registry.nslots
        self.waiters: list[Waiter] = []
        self.watchers: list[Connection] = []
        self.restarts: list[tuple[set[Instance], Connection | None]] = []
        self.closing = False
        self.finished = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._owner_fd: int | None = None
        self._watch_owner(owner_pid)
        self.selector.register(self.listener.sock, selectors.EVENT_READ, self._accept)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        for decl in decls:
            if decl.name is not None:
                worker = Worker(decl, decl.name, decl.first_slot, 1)
                self.workers[(decl.scope_id, decl.name)] = worker
                for inst in worker.instances:
                    self._publish(inst)

    # -- setup ---------------------------------------------------------------------

    def _watch_owner(self, owner_pid: int) -> None:
        """Drain everything when the application process that owns the pool dies."""
        try:
            self._owner_fd = platform.pidfd_open(owner_pid)
        except OSError:
            self._owner_fd = None
        if self._owner_fd is None or os.getppid() != owner_pid:
            self.timers.call_later(0, lambda: self._shutdown("the application process is gone"))
            return
        self.selector.register(self._owner_fd, selectors.EVENT_READ, self._on_owner_exit)

    def install_signals(self) -> None:
        """Route SIGCHLD, SIGTERM, SIGINT and SIGHUP into the loop's wake-up pipe."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)

    def start_eager(self) -> None:
        """Start every instance of every eager declaration."""
        for worker in self.workers.values():
            if worker.decl.eager:
                for inst in worker.instances:
                    self._spawn(inst)

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        """Serve until shut down: wait on descriptors and timers, dispatch."""
        while not self.finished:
            for key, events in self.selector.select(self.timers.next_timeout()):
                # An earlier handler in this batch may have closed this descriptor
                # (a worker's exit closes its notify pipe): skip stale events.
                if self.selector.get_map().get(key.fd) is not key:
                    continue
                self._guarded(self._dispatch_event, key, events)
            self.timers.run_due()

    def _dispatch_event(self, key: selectors.SelectorKey, events: int) -> None:
        if isinstance(key.data, Connection):
            self._on_connection(key.data, events)
        else:
            key.data(key.fileobj)

    @staticmethod
    def _guarded(handler: Callable[..., None], *args: Any) -> None:
        """Run one event handler; a bug in it is logged, not fatal, because the
        supervisor's death would take every worker with it."""
        try:
            handler(*args)
        except Exception:
            log.critical("internal error in the supervisor", exc_info=True)

    def _on_wake(self, _fd: object) -> None:
        """Handle the signals that arrived since the last wake-up."""
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        received = set(data)
        if signal.SIGCHLD in received:
            self._reap()
        if received & {signal.SIGTERM, signal.SIGINT}:
            self._shutdown("asked to stop")
        if signal.SIGHUP in received:
            self._restart_all(None)

    def _on_owner_exit(self, _fd: object) -> None:
        self._shutdown("the application process exited")

    # -- control requests ----------------------------------------------------------

    def _accept(self, _sock: object) -> None:
        sock = self.listener.accept()
        if sock is not None:
            conn = Connection(sock, self.selector)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _on_connection(self, conn: Connection, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            conn.flush()
        if not events & selectors.EVENT_READ or conn.closed:
            return
        messages = conn.receive()
        if messages is None:
            conn.close()
            return
        for message in messages:
            try:
                self._dispatch(conn, message)
            except (KeyError, TypeError, ValueError, ArithmeticError, ProtocolError) as exc:
                log.warning("dropping a control connection after a bad request: %s", exc)
                conn.close()
                return

    def _dispatch(self, conn: Connection, message: Message) -> None:
        op = message["op"]
        if op == "hello":
            conn.send(
                {
                    "ok": True,
                    "table": self.table.name,
                    "pid": self.pid,
                    "ensure_timeout": self.settings.ensure_timeout,
                    "scopes": [[sid, label] for sid, label in self.registry.scopes.items()],
                }
            )
        elif op == "ensure":
            self._ensure(conn, message)
        elif op == "start":
            self._await_startup(conn)
        elif op == "diagnostics":
            self._diagnose(conn, message)
        elif op == "locate":
            self._locate(conn, message)
        elif op == "restart":
            self._restart_all(conn)
        elif op == "watch":
            self.watchers.append(conn)
            conn.on_close.append(lambda: self.watchers.remove(conn))
            conn.send({"ok": True})
        else:
            raise ValueError(f"unknown op {op!r}")

    def _scope_of(self, message: Message) -> int:
        scope = message.get("scope")
        if scope is None:
            return 0
        if isinstance(scope, bool) or not isinstance(scope, int | str):
            raise TypeError("scope must be an id or a label")
        if isinstance(scope, str):
            found = self.registry.scope_by_label(scope)
            return -1 if found is None else found
        return scope

    @staticmethod
    def _error(conn: Connection, error: type[Exception], message: str, **extra: Any) -> None:
        conn.send({"ok": False, "error": error.__name__, "message": message, **extra})

    def _resolve(self, conn: Connection, scope_id: int, names: list[str]) -> list[Worker] | None:
        """Every name's worker, hosting new catch-all names only once all fit.

        Replies with the error and returns None when a name is undeclared or a
        catch-all would exceed its cap: nothing is started then.
        """
        plan: list[tuple[Decl, str, Worker | None]] = []
        wanted: Counter[int] = Counter()
        for name in names:
            decl = self.registry.resolve(scope_id, name)
            if decl is None:
                self._error(conn, WorkerNotDeclared, texts.not_declared(name))
                return None
            worker = self.workers.get((decl.scope_id, name))
            if worker is None:
                wanted[decl.index] += 1
                if len(decl.hosted) + wanted[decl.index] > decl.cap:
                    self._error(conn, CatchAllLimitReached, texts.limit_reached(name, decl.cap))
                    return None
            plan.append((decl, name, worker))
        return [worker or self._host(decl, name) for decl, name, worker in plan]

    def _ensure(self, conn: Connection, message: Message) -> None:
        names = message["names"]
        if not isinstance(names, list) or not names or len(set(names)) != len(names):
            raise ValueError("names must be a non-empty list of distinct names")
        for name in names:
            if not isinstance(name, str) or name_problem(name):
                raise ValueError("bad worker name")
        timeout = message.get("timeout")
        if timeout is None:
            timeout = self.settings.ensure_timeout
        elif type(timeout) not in (int, float):  # bool, str, containers: refused
            raise TypeError("timeout must be a number or null")
        timeout = float(timeout)  # OverflowError for an integer past float range
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError("timeout must be a finite number > 0")
        fail_fast = message.get("fail_fast", False)
        if type(fail_fast) is not bool:
            raise TypeError("fail_fast must be a boolean")
        if self.closing:
            self._error(conn, PoolClosed, "pool is shutting down")
            return
        scope_id = self._scope_of(message)
        if scope_id < 0:
            raise ValueError("unknown or ambiguous scope label")
        workers = self._resolve(conn, scope_id, names)
        if workers is None:
            return
        for worker in workers:
            self._wake(worker)
        self._wait(Waiter(conn, workers, timeout, fail_fast=fail_fast))

    def _await_startup(self, conn: Connection) -> None:
        eager = [w for w in self.workers.values() if w.decl.eager]
        self._wait(Waiter(conn, eager, self.settings.ensure_timeout, startup=True))

    def _wait(self, waiter: Waiter) -> None:
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

    def _lookup(self, conn: Connection, message: Message) -> tuple[Decl, Worker | None] | None:
        """The declaration and, if running or hosted, the worker a request's
        `name` and `scope` resolve to; replies WorkerNotDeclared and returns
        None when none does. Starts nothing."""
        name = message["name"]
        if not isinstance(name, str) or name_problem(name):
            raise ValueError("bad worker name")
        scope_id = self._scope_of(message)
        decl = self.registry.resolve(scope_id, name) if scope_id >= 0 else None
        if decl is None:
            self._error(conn, WorkerNotDeclared, texts.not_declared(name))
            return None
        return decl, self.workers.get((decl.scope_id, name))

    def _locate(self, conn: Connection, message: Message) -> None:
        """Where a name's slot is (for get_vars())."""
        found = self._lookup(conn, message)
        if found is not None:
            worker = found[1]
            slot = worker.instances[0].slot if worker is not None else None
            conn.send({"ok": True, "slot": slot, "gen": worker.gen if worker is not None else 0})

    def _diagnose(self, conn: Connection, message: Message) -> None:
        found = self._lookup(conn, message)
        if found is None:
            return
        decl, worker = found
        if worker is None:  # a catch-all name not hosted now
            diagnostics = Worker(decl, message["name"], 0, 0).diagnostics()
            diagnostics["slots"] = []
        else:
            diagnostics = worker.diagnostics()
        conn.send({"ok": True, "diagnostics": diagnostics})

    # -- state transitions -------------------------------------------------------

    def _host(self, decl: Decl, name: str) -> Worker:
        """Give a catch-all name a free slot of its declaration."""
        used = {w.instances[0].slot for w in self.workers.values() if w.decl is decl}
        slot = next(s for s in range(decl.first_slot, decl.first_slot + decl.cap) if s not in used)
        self.gens[slot] += 1
        worker = Worker(decl, name, slot, self.gens[slot])
        decl.hosted.add(name)
        self.workers[(decl.scope_id, name)] = worker
        self._publish(worker.instances[0])
        return worker

    def _release(self, worker: Worker) -> None:
        """Free an aborted catch-all name's slot, so the cap counts it no more."""
        decl, slot = worker.decl, worker.instances[0].slot
        decl.hosted.discard(worker.name)
        del self.workers[(decl.scope_id, worker.name)]
        self.gens[slot] += 1
        self.table.write(slot, Slot(gen=self.gens[slot]))
        platform.unlink_shm(varstore.segment_name(self.table.name, slot))  # its vars go too

    def _wake(self, worker: Worker) -> None:
        """Start the instances of a worker that is not running (a fresh try
        after an abort)."""
        for inst in worker.instances:
            if inst.state == State.ABORTED:
                inst.failures = 0
            if inst.state in (State.STOPPED, State.ABORTED):
                self._spawn(inst)

    def _set_state(
        self, inst: Instance, state: State, detail: str, level: int = logging.INFO
    ) -> None:
        inst.state = state
        self._publish(inst)
        log.log(level, "%s %s: %s", inst.label, state.label, detail)
        event = {
            "event": "state",
            "worker": inst.worker.name,
            "scope": inst.worker.decl.scope_label,
            "instance": inst.index,
            "state": state.label,
            "pid": inst.pid,
            "detail": detail,
        }
        for conn in list(self.watchers):
            conn.send(event)

    def _spawn(self, inst: Instance) -> None:
        """Fork a new process for `inst` (from STOPPED, ABORTED, BACKOFF, CRASHED
        or the end of a restart drain)."""
        assert inst.pid is None
        worker, decl = inst.worker, inst.worker.decl
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        notify_r, notify_w = os.pipe2(os.O_CLOEXEC)
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(2 if decl.output == "prefix" else 0)]
        boot = Boot(
            name=worker.name,
            scope_id=decl.scope_id,
            scope_label=decl.scope_label,
            instance=inst.index,
            target=decl.target,
            script=decl.script,
            args=decl.args,
            env=decl.env,
            supervisor_pid=self.pid,
            stop_fd=stop_r,
            notify_fd=notify_w,
            sys_path=sys.path,
            vars_segment=varstore.segment_name(self.table.name, worker.instances[0].slot),
            max_vars_bytes=self.settings.max_vars_bytes,
            stdout_fd=pipes[0][1] if pipes else None,
            stderr_fd=pipes[1][1] if pipes else None,
        )
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (stop_r, stop_w, notify_r, notify_w, *(fd for p in pipes for fd in p)):
                os.close(fd)
            log.error("%s cannot be forked: %s", inst.label, exc)
            inst.run_error = {
                "type": "OSError",
                "message": f"cannot fork: {exc}",
                "filename": None,
                "lineno": None,
                "traceback": "",
            }
            inst.attempts += 1
            self._after_run(inst, None, 0.0)
            return
        if pid == 0:  # pragma: no cover - the child never returns
            (run_forked if self.settings.start_method == "fork" else exec_spawned)(boot)
        os.close(stop_r)
        os.close(notify_w)
        os.set_blocking(notify_r, False)
        inst.tail = collections.deque(maxlen=relay.TAIL_LINES)
        inst.outputs = []
        for stream, (read_end, write_end) in enumerate(pipes, start=1):
            os.close(write_end)
            self.relay.attach(read_end, stream, inst.label, inst.tail)
            inst.outputs.append(read_end)
        inst.pid, inst.stop_w, inst.notify_r = pid, stop_w, notify_r
        inst.decoder = FrameDecoder()
        inst.run_error = None
        inst.handle_taken = inst.published = False
        inst.attempts += 1
        inst.started_at, inst.started_mono, inst.ready_at = time.time(), time.monotonic(), 0.0
        self.by_pid[pid] = inst
        self.selector.register(
            notify_r, selectors.EVENT_READ, functools.partial(self._on_notify, inst)
        )
        self._set_state(inst, State.STARTING, f"pid {pid}, attempt {inst.attempts}")

    def _on_notify(self, inst: Instance, _fd: object = None) -> None:
        """Read what the worker reported: readiness, or its exception."""
        if inst.notify_r is None:
            return
        try:
            data = os.read(inst.notify_r, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_notify(inst)
            return
        try:
            messages = inst.decoder.feed(data)
        except ProtocolError as exc:
            log.warning("%s sent a malformed report, ignoring it from now: %s", inst.label, exc)
            self._close_notify(inst)
            return
        for message in messages:
            if message.get("t") == "ready":
                inst.handle_taken = True
                self._maybe_ready(inst)
            elif message.get("t") == "vars":
                self._on_vars(inst)
            elif message.get("t") == "error":
                inst.run_error = error_record(message)

    def _close_notify(self, inst: Instance) -> None:
        if inst.notify_r is not None:
            self.selector.unregister(inst.notify_r)
            os.close(inst.notify_r)
            inst.notify_r = None

    def _on_vars(self, inst: Instance) -> None:
        """The run published vars for the first time (perhaps the same as the
        last run's: it counts for readiness all the same)."""
        inst.published = True
        self._maybe_ready(inst)

    def _maybe_ready(self, inst: Instance) -> None:
        """Readiness: the handle taken, and with ready_on="vars" a publication
        too, both in the current run."""
        ready = inst.handle_taken and (inst.worker.decl.ready_on == "handle" or inst.published)
        if ready and not inst.ready_at:  # (reset to 0 at each spawn)
            self._on_ready(inst)

    def _on_ready(self, inst: Instance) -> None:
        """The run became ready (from STARTING; a worker already draining is
        recorded as ready but keeps STOPPING)."""
        worker = inst.worker
        inst.ever_ready = True
        inst.ready_at = time.time()
        first = not worker.name_ready
        worker.name_ready = True
        elapsed = time.monotonic() - inst.started_mono
        inst.boot_sum += elapsed
        inst.boot_buckets[bisect.bisect_left(BOOT_BUCKETS, elapsed)] += 1
        if inst.state == State.STARTING:
            self._set_state(
                inst, State.READY, f"took its handle {elapsed * 1000:.1f} ms after spawn"
            )
        if first:
            for other in worker.instances:
                self._publish(other)
        self._settle_all()

    def _reap(self) -> None:
        """Collect every exited child; dispatch the workers' exits."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            inst = self.by_pid.pop(pid, None)
            if inst is not None:
                self._on_exit(inst, os.waitstatus_to_exitcode(status))
            # else: a worker's orphaned descendant, re-parented to us as subreaper

    def _on_exit(self, inst: Instance, status: int) -> None:
        """The worker's process ended with `status` (negative: killed by a signal)."""
        if inst.notify_r is not None:
            self._on_notify(inst)  # its last words (readiness, exception) come first
            self._close_notify(inst)
        for fd in inst.outputs:
            self.relay.drain(fd)
        if inst.stop_w is not None:
            os.close(inst.stop_w)
            inst.stop_w = None
        inst.pid = None
        inst.last_exit = status
        run_seconds = time.monotonic() - inst.started_mono
        if inst.draining:
            self._drained(inst, status)
            return
        self._after_run(inst, status, run_seconds)

    def _after_run(self, inst: Instance, status: int | None, run_seconds: float) -> None:
        """Decide what follows an exit outside a drain: restart now, back off, or
        give up."""
        worker, decl = inst.worker, inst.worker.decl
        boot_failure = not inst.ever_ready
        failed = boot_failure or status != 0
        if status != 0:
            inst.crashes += 1
        inst.failures = policy.count_failures(inst.failures, failed=failed, run_seconds=run_seconds)
        words = texts.exit_words(status)
        if failed:
            worker.last_failure = texts.Failure(
                inst.attempts, status, decl.target, inst.run_error, tuple(inst.tail)
            )
            if boot_failure:
                worker.boot_failures += 1
            words += f": {texts.error_words(inst.run_error)}" if inst.run_error else ""
        if policy.should_abort(inst.failures, inst.ever_ready, decl.max_failures):
            self._set_state(
                inst,
                State.ABORTED,
                f"gave up after {inst.failures} consecutive boot failures; last: {words}",
                logging.ERROR,
            )
            if decl.name is None:
                self._release(worker)
            self._settle_all()
            return
        delay = policy.restart_delay(
            failed=failed, failures=inst.failures, since_last_start=run_seconds
        )
        if failed:
            self._set_state(inst, State.CRASHED, words, logging.WARNING)
        if not failed:
            log.info("%s exited (%s); restarting it", inst.label, words)
        if delay > 0:
            self._set_state(inst, State.BACKOFF, f"restart in {delay:g}s after {words}")
            inst.timer = self.timers.call_later(delay, lambda: self._respawn(inst))
        else:
            self._respawn(inst)
        self._settle_all()

    def _respawn(self, inst: Instance) -> None:
        """Start `inst` again after an exit (from BACKOFF, CRASHED or STOPPING)."""
        inst.timer = None
        inst.restarts += 1
        self._spawn(inst)

    # -- drains --------------------------------------------------------------------

    def _drain(self, inst: Instance, grace: float, respawn: bool) -> None:
        """Ask `inst` to stop: close its stop pipe, then after `grace` seconds
        SIGTERM its process tree, then SIGKILL one second later. A pending
        restart (backoff) is cut short instead."""
        if inst.draining:
            inst.respawn_after_drain &= respawn
            return
        if inst.pid is None:
            if inst.state in (State.BACKOFF, State.CRASHED):
                if inst.timer is not None:
                    inst.timer.cancel()
                if respawn:
                    self._respawn(inst)
                else:
                    self._set_state(inst, State.STOPPED, "pending restart cancelled by a drain")
            return
        inst.draining = True
        inst.respawn_after_drain = respawn
        if inst.stop_w is not None:
            os.close(inst.stop_w)
            inst.stop_w = None
        self._set_state(inst, State.STOPPING, f"stop pipe closed, grace period {grace:g}s")
        inst.timer = self.timers.call_later(grace, lambda: self._terminate(inst))

    def _terminate(self, inst: Instance) -> None:
        if inst.pid is None:
            return
        log.warning(
            "%s did not stop within its grace period: SIGTERM to its process tree", inst.label
        )
        self._signal_tree(inst.pid, signal.SIGTERM)
        inst.timer = self.timers.call_later(FORCE_KILL_DELAY, lambda: self._kill(inst))

    def _kill(self, inst: Instance) -> None:
        if inst.pid is None:
            return
        log.warning("%s still running 1s after SIGTERM: SIGKILL to its process tree", inst.label)
        self._signal_tree(inst.pid, signal.SIGKILL)

    @staticmethod
    def _signal_tree(pid: int, sig: signal.Signals) -> None:
        """Signal a worker, its process group and every descendant (found before
        signalling, so one that moved to another session is still hit)."""
        procs = platform.process_tree(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        platform.signal_tree(procs, sig)

    def _drain_all(self, grace: float, respawn: bool) -> set[Instance]:
        """Drain every instance; return those now stopping. One scan of the
        process table records what each has forked, so a descendant that
        outlives its worker's exit (a daemon in its own session) is stopped too."""
        instances = [inst for worker in self.workers.values() for inst in worker.instances]
        running = [inst.pid for inst in instances if inst.pid is not None and not inst.draining]
        trees = platform.descendants(running)
        stopping = set()
        for inst in instances:
            if inst.pid in trees:
                inst.tree = trees[inst.pid]
            self._drain(inst, grace, respawn)
            if inst.draining:
                stopping.add(inst)
        return stopping

    def _drained(self, inst: Instance, status: int) -> None:
        """A draining instance exited: stop here, or respawn for a restart.
        What it forked and left running gets SIGTERM, then SIGKILL."""
        if inst.timer is not None:
            inst.timer.cancel()
        inst.draining = False
        survivors = [proc for proc in inst.tree if proc.is_running()]
        inst.tree = []
        if survivors:
            log.warning("%s left %d process(es) behind: SIGTERM, SIGKILL 1s later",
                        inst.label, len(survivors))  # fmt: skip
            platform.signal_tree(survivors, signal.SIGTERM)
            self.timers.call_later(
                FORCE_KILL_DELAY, lambda: platform.signal_tree(survivors, signal.SIGKILL)
            )
        if inst.respawn_after_drain and not self.closing:
            log.info("%s drained (%s); restarting it", inst.label, texts.exit_words(status))
            self._respawn(inst)
        else:
            self._set_state(inst, State.STOPPED, texts.exit_words(status))
        self._progress_restarts(inst)
        if self.closing and not self.by_pid:
            self.finished = True

    def _restart_all(self, conn: Connection | None) -> None:
        """restart_workers(): drain every running instance and respawn it."""
        if self.closing:
            if conn is not None:
                self._error(conn, PoolClosed, "pool is shutting down")
            return
        batch = self._drain_all(self.settings.restart_grace_period, respawn=True)
        self.restarts.append((batch, conn))
        self._progress_restarts(None)

    def _progress_restarts(self, done: Instance | None) -> None:
        for batch, conn in list(self.restarts):
            if done is not None:
                batch.discard(done)
            if not batch:
                self.restarts.remove((batch, conn))
                if conn is not None:
                    conn.send({"ok": True})

    def _shutdown(self, reason: str) -> None:
        """Drain every instance for good; the loop ends once all have exited."""
        if self.closing:
            return
        self.closing = True
        log.info("shutting down: %s", reason)
        for waiter in list(self.waiters):
            self._answer(
                waiter, {"ok": False, "error": "PoolClosed", "message": "pool is shutting down"}
            )
        for _, conn in self.restarts:
            if conn is not None:
                self._error(conn, PoolClosed, "pool is shutting down")
        self.restarts.clear()
        self._drain_all(self.settings.grace_period, respawn=False)
        if not self.by_pid:
            self.finished = True

    # -- table -----------------------------------------------------------------------

    def _publish(self, inst: Instance) -> None:
        self.table.write(inst.slot, inst.record())

    # -- teardown ------------------------------------------------------------------

    def kill_everything(self) -> None:
        """Last resort when the loop failed: SIGKILL every worker tree."""
        for pid in list(self.by_pid):
            self._signal_tree(pid, signal.SIGKILL)

    def close(self) -> None:
        """Reap what is left (orphans included), close every socket and remove
        the table, the socket file and its directory. Each step runs even if an
        earlier one failed: nothing may be left behind."""
        steps: list[Callable[[], None]] = [
            self._reap_leftovers,
            self.relay.close,
            self._close_connections,
            self.selector.close,
            self.listener.close,
            self._remove_vars,
            self.table.destroy,
            *(functools.partial(os.close, fd) for fd in (self._wake_r, self._wake_w)),
        ]
        if self._owner_fd is not None:
            steps.append(functools.partial(os.close, self._owner_fd))
        for step in steps:
            self._guarded(step)

    def _remove_vars(self) -> None:
        for slot in range(self.registry.nslots):
            platform.unlink_shm(varstore.segment_name(self.table.name, slot))

    def _reap_leftovers(self) -> None:
        """SIGTERM, then SIGKILL, whatever descendants are left: orphans that
        workers left behind were re-parented to us (we are their subreaper)."""
        leftovers = platform.process_tree(self.pid)[1:]
        platform.signal_tree(leftovers, signal.SIGTERM)
        _, alive = psutil.wait_procs(leftovers, timeout=FORCE_KILL_DELAY)
        platform.signal_tree(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=FORCE_KILL_DELAY)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    def _close_connections(self) -> None:
        for key in list(self.selector.get_map().values()):
            if isinstance(key.data, Connection):
                key.data.close()

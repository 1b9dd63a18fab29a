"""Control requests: what clients ask the supervisor over the control socket.

Each operation has one handler, found by name in `HANDLERS` (as gunicorn's
arbiter finds a signal's handler by name). A request is data, checked field by
field; a malformed one drops its connection, never the supervisor. Replies
that report an error are built by `protocol.error_reply`.
"""

from __future__ import annotations

import errno
import logging
import math
import selectors
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

from .. import platform, texts
from ..errors import CatchAllLimitReached, WorkerNotDeclared
from ..names import name_problem
from ..protocol import Message, ProtocolError, error_reply
from . import logs
from .core import Settings
from .instances import Worker
from .leases import Leases
from .listener import Connection
from .registry import Decl
from .waiters import Waiter

log = logging.getLogger("bgpool")

OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""The errors of an accept() that a moment's patience may cure."""

ACCEPT_PAUSE = 0.1
"""Seconds the listener rests after such an error."""


class Requests(Leases):
    """Accepting connections and answering their requests."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner_reloads = False  # the owner is `bgpool run`: SIGHUP reloads its config
        self.config_waiters: list[Connection] = []  # `bgpool reload` calls waiting for it

    def _accept(self, _sock: object) -> None:
        try:
            sock = self.listener.accept()
        except OSError as exc:
            if exc.errno not in OUT_OF_RESOURCES:
                raise
            self._pause_accepting(exc)
            return
        if sock is not None:
            conn = Connection(sock, self.selector)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors: leave waiting connections in the backlog for a
        moment (the listener stays readable, so accepting again at once would
        spin) instead of failing."""
        log.warning("cannot accept a control connection (%s): retrying in %gs", exc, ACCEPT_PAUSE)
        self.selector.unregister(self.listener.sock)
        self.timers.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self.selector.register(self.listener.sock, selectors.EVENT_READ, self._accept)

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
            op = message.get("op")
            try:
                if not isinstance(op, str) or op not in HANDLERS:
                    raise ValueError(f"unknown op {op!r}")
                HANDLERS[op](self, conn, message)
            except (KeyError, TypeError, ValueError, ArithmeticError, ProtocolError) as exc:
                log.warning("dropping a control connection after a bad request: %s", exc)
                conn.close()
                return

    # -- the operations ----------------------------------------------------------------

    def _hello(self, conn: Connection, _message: Message) -> None:
        """What a client needs to attach: the table, the default deadline, scopes
        (and the pool's name, None if it has none)."""
        conn.send(
            {
                "ok": True,
                "table": self.table.name,
                "pid": self.pid,
                "name": self.settings.name,
                "coordinated": self.settings.coordinator is not None,
                "ensure_timeout": self.settings.ensure_timeout,
                "scopes": [[sid, label] for sid, label in self.registry.scopes.items()],
            }
        )

    def _ensure(self, conn: Connection, message: Message) -> None:
        """Start what is not running among `names`; answer once all are ready,
        one fails (as asked), or the deadline passes."""
        names = self._names_of(message)
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
        if self._refuse_closing(conn):
            return
        workers = self._resolve(conn, self._declared_scope(message), names)
        if workers is None:
            return
        self._wake(workers)
        self._wait(Waiter(conn, workers, timeout, fail_fast=fail_fast))

    def _start(self, conn: Connection, _message: Message) -> None:
        """start(): answer once every eager worker is ready, or one is aborted
        (at once if they could not even be spawned)."""
        if self.startup_problem is not None:
            conn.send(self.startup_problem)
            return
        # a singleton may be held elsewhere, or wait out a quarantine: ensure() waits for it
        eager = [w for w in self.workers.values() if w.decl.eager and not w.decl.singleton]
        self._wait(Waiter(conn, eager, self.settings.ensure_timeout, startup=True))

    def _diagnostics(self, conn: Connection, message: Message) -> None:
        """Why a name is in its state (a catch-all name not hosted now: its
        declaration, with no instances)."""
        found = self._lookup(conn, message)
        if found is None:
            return
        decl, worker = found
        if worker is None:
            diagnostics = Worker(decl, message["name"], [0], 0, log_lines=0).diagnostics()
            diagnostics["slots"] = []
        else:
            diagnostics = worker.diagnostics()
        conn.send({"ok": True, "diagnostics": diagnostics})

    def _locate(self, conn: Connection, message: Message) -> None:
        """Where a name's slot is (for get_vars())."""
        found = self._lookup(conn, message)
        if found is not None:
            worker = found[1]
            slot = worker.instances[0].slot if worker is not None else None
            conn.send({"ok": True, "slot": slot, "gen": worker.gen if worker is not None else 0})

    def _restart(self, conn: Connection, message: Message) -> None:
        """restart_workers(names, scope): new code for the running instances of
        those names (every worker, or every one of the scope, without names);
        answered once each is replaced, or failed."""
        scope_id = self._declared_scope(message)
        if message.get("names") is None:
            scoped = message.get("scope") is not None
            scope_id = self.registry.effective_scope(scope_id)
            workers = [
                w for w in self.workers.values() if not scoped or w.decl.scope_id == scope_id
            ]
        else:
            found = self._hosted(conn, scope_id, self._names_of(message))
            if found is None:
                return
            workers = found
        self._roll(workers, self._answer_conn(conn))

    def _stop(self, conn: Connection, message: Message) -> None:
        """stop(names, scope): drain every instance of those workers for good
        and hold them stopped; answered once each has exited."""
        names = self._names_of(message)
        if self._refuse_closing(conn):
            return
        workers = self._hosted(conn, self._declared_scope(message), names)
        if workers is not None:
            self._stop_workers(workers, conn.send)

    def _start_workers(self, conn: Connection, message: Message) -> None:
        """start_workers(names, scope): start what is not running among those
        workers (hosting new catch-all names); answered at once, not once ready."""
        names = self._names_of(message)
        if self._refuse_closing(conn):
            return
        workers = self._resolve(conn, self._declared_scope(message), names)
        if workers is not None:
            self._wake(workers, revive=True)
            conn.send({"ok": True})

    def _scale_request(self, conn: Connection, message: Message) -> None:
        """scale(name, num, scope): a named worker's instance count from now
        on; answered once the instances drained away have exited."""
        num = message["num"]
        if type(num) is not int or num < 0:
            raise ValueError("num must be an integer >= 0")
        if self._refuse_closing(conn):
            return
        found = self._lookup(conn, message)
        if found is None:
            return
        decl, worker = found
        if decl.name is None or worker is None:
            conn.send(error_reply("ValueError", texts.scale_catch_all(message["name"])))
            return
        if decl.singleton and num > 1:
            conn.send(error_reply("ValueError", texts.scale_singleton(worker.label, num)))
            return
        more = Worker.instance_count(num) - len(worker.instances)
        if more > self.slots.available:
            text = texts.scale_too_large(worker.label, num, more, self.slots.available)
            conn.send(error_reply("ValueError", text))
            return
        self._scale(worker, num, conn.send)

    def _reload(self, conn: Connection, message: Message) -> None:
        """reload(config): apply a new set of declarations (answered with the
        report once the new eager workers are ready)."""
        decls = [Decl.from_message(d) for d in message["workers"]]
        settings = Settings(**message["settings"])
        if settings.start_method != self.settings.start_method:
            raise ValueError("start_method cannot change while the pool runs")
        self._update(conn, decls, settings)

    def _owner_reloads(self, conn: Connection, _message: Message) -> None:
        """The owner (`bgpool run`) says SIGHUP makes it reload its config file."""
        self.owner_reloads = True
        conn.send({"ok": True})

    def _reload_config(self, conn: Connection, _message: Message) -> None:
        """`bgpool reload`: SIGHUP to the owner; answered once it says how its
        reload went (`config_reloaded`)."""
        if not self.owner_reloads or self.owner_fd is None:
            conn.send(error_reply("BgpoolError", texts.NO_CONFIG_FILE))
            return
        self.config_waiters.append(conn)
        conn.on_close.append(lambda: self.config_waiters.remove(conn))
        platform.pidfd_send_signal(self.owner_fd, signal.SIGHUP)

    def _config_reloaded(self, conn: Connection, message: Message) -> None:
        """The owner's word on a config reload, passed on to `bgpool reload` callers."""
        ok, text = message["ok"], message["message"]
        if type(ok) is not bool or not isinstance(text, str):
            raise TypeError("ok must be a boolean and message a string")
        reply = {"ok": True, "outcome": text} if ok else error_reply("BgpoolError", text)
        for waiter in list(self.config_waiters):
            waiter.send(reply)
        conn.send({"ok": True})

    def _watch(self, conn: Connection, _message: Message) -> None:
        """Subscribe the connection to state-change events until it closes."""
        self.watchers.append(conn)
        conn.on_close.append(lambda: self.watchers.remove(conn))
        conn.send({"ok": True})

    def _logs(self, conn: Connection, message: Message) -> None:
        """The last `lines` kept lines of a name, in frames (`logs.replies`);
        with `follow`, every new one after them as it comes (`logs.Follower`),
        until the connection closes."""
        lines = message["lines"]
        if type(lines) is not int or lines < 0:
            raise ValueError("lines must be an integer >= 0")
        follow = message.get("follow", False)
        if type(follow) is not bool:
            raise TypeError("follow must be a boolean")
        found = self._lookup(conn, message)
        if found is None:
            return
        decl, worker = found
        for reply in logs.replies(logs.last(worker.logs, lines) if worker is not None else []):
            conn.send(reply)
        if follow:
            key = (decl.scope_id, message["name"])
            follower = logs.Follower(conn)
            self.followers.setdefault(key, []).append(follower)
            conn.on_close.append(lambda: self._unfollow(key, follower))

    def _unfollow(self, key: tuple[int, str], follower: logs.Follower) -> None:
        followers = self.followers[key]
        followers.remove(follower)
        if not followers:
            del self.followers[key]

    # -- resolving names ---------------------------------------------------------------

    @staticmethod
    def _names_of(message: Message) -> list[str]:
        """A request's `names`: a non-empty list of distinct, valid names."""
        names = message["names"]
        if not isinstance(names, list) or not names or len(set(names)) != len(names):
            raise ValueError("names must be a non-empty list of distinct names")
        for name in names:
            if not isinstance(name, str) or name_problem(name):
                raise ValueError("bad worker name")
        return names

    def _refuse_closing(self, conn: Connection) -> bool:
        """Answer `PoolClosed` once the pool drains; return whether it did."""
        if self.closing:
            conn.send(error_reply("PoolClosed", texts.SHUTTING_DOWN))
        return self.closing

    def _declared_scope(self, message: Message) -> int:
        """The scope id a request names, which must be declared (or global)."""
        scope_id = self._scope_of(message)
        if scope_id < 0:
            raise ValueError("unknown or ambiguous scope label")
        return scope_id

    def _hosted(self, conn: Connection, scope_id: int, names: list[str]) -> list[Worker] | None:
        """The workers `names` resolve to, hosting nothing (a catch-all name
        not hosted now has no worker: nothing of it runs). Replies
        WorkerNotDeclared and returns None when a name is undeclared."""
        workers = []
        for name in names:
            found = self._declared(conn, scope_id, name)
            if found is None:
                return None
            if found[1] is not None:
                workers.append(found[1])
        return workers

    def _scope_of(self, message: Message) -> int:
        """The scope id a request names (by id or label); -1 for a label that
        names no single declared scope."""
        scope = message.get("scope")
        if scope is None:
            return 0
        if isinstance(scope, bool) or not isinstance(scope, int | str):
            raise TypeError("scope must be an id or a label")
        if isinstance(scope, str):
            found = self.registry.scope_by_label(scope)
            return -1 if found is None else found
        return scope

    def _resolve(self, conn: Connection, scope_id: int, names: list[str]) -> list[Worker] | None:
        """Every name's worker, hosting new catch-all names only once all fit.

        Replies with the error and returns None when a name is undeclared, a
        catch-all would exceed its cap, or the target of one that would start
        does not exist in the newest code: nothing is started then.
        """
        plan: list[tuple[Decl, str, Worker | None]] = []
        wanted: Counter[int] = Counter()
        for name in names:
            found = self._declared(conn, scope_id, name)
            if found is None:
                return None
            decl, worker = found
            if worker is None:
                wanted[decl.index] += 1
                if len(decl.hosted) + wanted[decl.index] > decl.cap:
                    reply = error_reply(
                        CatchAllLimitReached.__name__, texts.limit_reached(name, decl.cap)
                    )
                    conn.send(reply)
                    return None
            plan.append((decl, name, worker))
        fresh = [(name, decl) for decl, name, worker in plan if worker is None or worker.stopped]
        refusal = self._refuse_missing(fresh, "WorkerBootFailed")
        if refusal is not None:
            conn.send(refusal)
            return None
        return [worker or self._host(decl, name) for decl, name, worker in plan]

    def _lookup(self, conn: Connection, message: Message) -> tuple[Decl, Worker | None] | None:
        """The declaration and, if running or hosted, the worker a request's
        `name` and `scope` resolve to; replies WorkerNotDeclared and returns
        None when none does. Starts nothing."""
        name = message["name"]
        if not isinstance(name, str) or name_problem(name):
            raise ValueError("bad worker name")
        return self._declared(conn, self._scope_of(message), name)

    def _declared(
        self, conn: Connection, scope_id: int, name: str
    ) -> tuple[Decl, Worker | None] | None:
        """The declaration `name` resolves to in `scope_id` (-1: a label that
        named no scope) and its worker, if running or hosted; replies
        WorkerNotDeclared and returns None when none does."""
        decl = self.registry.resolve(scope_id, name) if scope_id >= 0 else None
        if decl is None:
            self._not_declared(conn, scope_id, name)
            return None
        return decl, self.workers.get((decl.scope_id, name))

    def _not_declared(self, conn: Connection, scope_id: int, name: str) -> None:
        """Reply WorkerNotDeclared for `name`, with the closest declared names."""
        close = self.registry.close_names(scope_id, name) if scope_id >= 0 else []
        conn.send(error_reply(WorkerNotDeclared.__name__, texts.not_declared(name, close)))


HANDLERS: dict[str, Callable[[Requests, Connection, Message], None]] = {
    "hello": Requests._hello,
    "ensure": Requests._ensure,
    "start": Requests._start,
    "diagnostics": Requests._diagnostics,
    "locate": Requests._locate,
    "restart": Requests._restart,
    "stop": Requests._stop,
    "start_workers": Requests._start_workers,
    "scale": Requests._scale_request,
    "reload": Requests._reload,
    "owner_reloads": Requests._owner_reloads,
    "reload_config": Requests._reload_config,
    "config_reloaded": Requests._config_reloaded,
    "watch": Requests._watch,
    "logs": Requests._logs,
    "leases": Leases._leases_request,
}
"""The handler of each control operation, by its `op`."""

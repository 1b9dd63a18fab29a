"""The application's side of a pool: `PoolClient` (any process, via `connect()`;
`Pool` extends it in the process that owns the pool).

A client validates arguments, answers `ensure()` for ready workers from the
shared-memory table (no system call), and sends everything else to the
supervisor over the control socket, one short-lived connection per request so
any number of threads can call it at once. It never forks.

Each operation that talks to the supervisor is written once, as its steps
(`Steps`: a generator that yields each request it needs answered and is sent
the reply), apart from any I/O; `PoolClient._run()` drives the steps over a
blocking socket (`ensure()`), `_arun()` over the running event loop's
non-blocking one (`aensure()`), so the two forms cannot drift apart.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import inspect
import math
import os
import socket
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self, TypeVar, cast

from .. import identity, naming, platform, protocol, texts
from ..errors import (
    ERRORS,
    BgpoolError,
    EnsureTimeout,
    PoolClosed,
    StartupError,
    VarsNotPublished,
    _WithDiagnostics,
)
from ..models import ErrorInfo, LogLine, WorkerDiagnostics, WorkerStatus
from ..names import Scope, name_problem
from ..shm.snapshot import decode
from ..shm.table import Kind, Slot, Status, TableReader
from ..shm.varstore import Reader, segment_name

_Method = TypeVar("_Method", bound=Callable[..., Any])
T = TypeVar("T")

_request_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "bgpool_request_scope", default=None
)

MAX_SOCKET_WAIT = 365 * 86400.0
"""Longest a socket wait is armed for: a far deadline (timeout=1e300) is legal,
but the OS's timeout type cannot hold it."""

HELLO_SECONDS = 10.0
"""How long a client waits for the supervisor's hello (`Pool.start()` waits
longer: the supervisor answers once it has loaded the targets' code)."""

REPLY_MARGIN = 30.0
"""Seconds a client waits beyond a request's own duration (a restart's grace
period, start()'s deadline) before it gives up on the supervisor."""

ENSURE_SLACK = 1.0
"""Seconds `ensure()` waits past its deadline for the supervisor's answer: a
stopped or overloaded supervisor must not stretch the caller's deadline."""


MAX_UNDECLARED_SCOPES = 1024
"""Undeclared scopes a client remembers as such (more are asked about each time)."""


def _check_lines(lines: object) -> int:
    """`logs()`'s line count: an int >= 0 (not a bool)."""
    if isinstance(lines, bool) or not isinstance(lines, int):
        raise TypeError(f"lines must be an int, not {type(lines).__name__}")
    if lines < 0:
        raise ValueError(f"lines must be >= 0, not {lines}")
    return lines


def _log_line(data: list[Any]) -> LogLine:
    """A kept line as the supervisor sends it (`[time, stream, instance, text]`)."""
    when, stream, instance, text = data
    return LogLine(
        time=datetime.fromtimestamp(when, UTC), stream=stream, instance=instance, line=text
    )


def _check_names(names: object) -> list[str]:
    """`ensure()`'s `names` as a list, or `TypeError`/`ValueError` (not a str or a
    sequence of str; empty; an empty name, one with NUL; a duplicate), checked
    before anything starts."""
    if isinstance(names, str):
        batch = [names]
    elif isinstance(names, Sequence) and not isinstance(names, bytes | bytearray):
        batch = list(names)
        if not batch:
            raise ValueError("names must not be empty")
    else:
        raise TypeError(f"names must be a str or a sequence of str, not {type(names).__name__}")
    for name in batch:
        if not isinstance(name, str):
            raise TypeError(f"worker names must be str, not {type(name).__name__}")
        if (problem := name_problem(name)) is not None:
            raise ValueError(f"worker name {name!r} {problem}")
    if len(set(batch)) != len(batch):
        duplicates = sorted({n for n in batch if batch.count(n) > 1})
        raise ValueError(f"duplicate worker names: {', '.join(duplicates)}")
    return batch


def _check_name(name: object) -> str:
    """One worker name, or `TypeError`/`ValueError` (not a str; empty, with
    NUL, too long)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    if (problem := name_problem(name)) is not None:
        raise ValueError(f"worker name {name!r} {problem}")
    return name


MAX_TIMEOUT = 1e18
"""The longest deadline a call keeps, in seconds (an integer such as 10**400 is
a legal, finite timeout, past what a float holds): longer than anyone waits."""


def _check_timeout(timeout: object) -> float:
    """The timeout as seconds, after the public contract's checks: a finite
    number > 0 (not a bool)."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
    if isinstance(timeout, int):
        if timeout <= 0:
            raise ValueError(f"timeout must be a finite number > 0, not {timeout!r}")
        return float(min(timeout, int(MAX_TIMEOUT)))
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a finite number > 0, not {timeout!r}")
    return min(timeout, MAX_TIMEOUT)


def _new_socket() -> socket.socket:
    """A socket for one request; out of descriptors, a `BgpoolError` saying so."""
    try:
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise BgpoolError(_cannot_connect(exc)) from None


def _cannot_connect(exc: OSError) -> str:
    """Why a request could not reach the supervisor, with the descriptor
    limit when that was the cause."""
    return f"cannot reach the pool's supervisor: {platform.os_error_words(exc)}"


@dataclass(frozen=True, slots=True)
class _Exchange:
    """One request on a fresh connection, as a step of an operation: the
    message, how long to wait for its reply (None: as long as it takes), and
    what to raise if none comes in time (else a `BgpoolError` saying so)."""

    message: protocol.Message
    timeout: float | None
    silence: Callable[[], BgpoolError] | None = None
    more: bool = False  # the reply may go on in more frames (`"more": true`): all are read

    @property
    def wait(self) -> float | None:
        """The timeout as a socket or event loop can arm it."""
        return None if self.timeout is None else min(self.timeout, MAX_SOCKET_WAIT)


Steps = Generator[_Exchange, protocol.Message, T]
"""An operation of the client apart from its I/O: it yields each request it
needs answered, is sent the reply (an error reply is raised before it gets
there), and returns its result. Driven by `PoolClient._run()` (blocking) or
`PoolClient._arun()` (asyncio)."""


def _reads_shared_memory(method: _Method) -> _Method:
    """Make a client method that reads the table or vars raise `PoolClosed`,
    not a `ValueError` of a released buffer, when another thread closes the
    client under it (an `async def` method as well as a plain one)."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def acall(self: PoolClient, *args: Any, **kwargs: Any) -> Any:
            try:
                return await method(self, *args, **kwargs)
            except ValueError as exc:
                raise self._closed_under_us(exc) from None

        return cast(_Method, acall)

    @functools.wraps(method)
    def call(self: PoolClient, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except ValueError as exc:
            raise self._closed_under_us(exc) from None

    return cast(_Method, call)


class _VarsView:
    """What one process knows of one name's vars: where they are, and the last
    snapshot it decoded (returned as is while the generation is unchanged)."""

    __slots__ = ("current", "generation", "offset", "reader", "slot_generation", "value")

    def __init__(self, reader: Reader, offset: int, slot_generation: int) -> None:
        self.reader = reader
        self.offset = offset
        self.slot_generation = slot_generation
        self.generation = 0
        self.value: Mapping[str, Any] | None = None
        # whether `value` is still the latest (TableReader.vars_check), set after it
        self.current: Callable[[], bool] | None = None


class PoolClient:
    """A connection to a running pool, from any process of the application."""

    def __init__(self, address: str) -> None:
        self._detached(address, 30.0)
        self._attach()

    def _detached(self, address: str, ensure_timeout: float) -> None:
        """The state of a client not yet attached to its supervisor (`Pool`
        starts this way and attaches in `start()`)."""
        self._address = address
        self._table: TableReader | None = None
        self._directory: dict[tuple[int, str], tuple[int, int]] = {}
        # ensure()'s hot path per directory entry (TableReader.ready_check)
        self._ready: dict[tuple[int, str], Callable[[], bool]] = {}
        self._vars: dict[tuple[int, str], _VarsView] = {}
        self._gone = False  # the supervisor died (set by the owner's watcher)
        self._table_name = ""
        self._scopes: dict[int, str] = {0: ""}
        # scopes found undeclared, at that version of the declarations
        self._undeclared: tuple[int | None, set[int]] = (None, set())
        self._own_scope = 0
        self._ensure_timeout = ensure_timeout
        self._name: str | None = None
        self._coordinated = False  # the pool has a coordinator (singleton leases)
        # whether the supervisor ever answered: if it no longer does, the pool
        # has closed; if it never did, there was no pool at the address
        self._reached = False

    # -- plumbing ------------------------------------------------------------

    def _attach(self, wait: float = HELLO_SECONDS) -> None:
        """Say hello to the supervisor (waiting `wait` seconds for its answer);
        map its table; learn the named workers."""
        hello = self._run(self._learn_scopes(wait))
        self._reached = True
        self._name = hello["name"]
        self._coordinated = bool(hello.get("coordinated"))
        self._ensure_timeout = float(hello["ensure_timeout"])
        own = identity.own_scope_id()
        self._own_scope = own if own is not None and own in self._scopes else 0
        self._table_name = str(hello["table"])
        self._table = TableReader.attach(self._table_name)
        for index, slot in enumerate(self._table.slots()):
            if slot.kind == Kind.NAMED and slot.instance == 0:
                self._remember(self._table, slot.scope_id, slot.name, index, slot.gen)

    def _remember(self, table: TableReader, scope_id: int, name: str, slot: int, gen: int) -> None:
        """Note that `name` in scope `scope_id` is hosted at slot `slot` of
        `table` (the caller's: another thread may close this client meanwhile)
        with identity generation `gen`."""
        offset = table.offset(slot)
        self._directory[(scope_id, name)] = (offset, gen)
        self._ready[(scope_id, name)] = table.ready_check(offset, gen)

    def _learn_scopes(self, wait: float = HELLO_SECONDS) -> Steps[protocol.Message]:
        """Ask the supervisor which scopes are declared (a reload may have
        added some since), waiting `wait` seconds for its answer; returns its
        whole hello."""
        hello = yield _Exchange({"op": "hello"}, wait)
        self._scopes = {0: ""} | {int(sid): str(label) for sid, label in hello["scopes"]}
        return hello

    def _known_undeclared(self, scope_id: int) -> bool:
        """Whether this client found `scope_id` undeclared at the current
        version of the declarations: a scope that declares nothing then costs
        one table read, not a round trip."""
        table = self._table
        version = table.declarations() if table is not None else None
        if version is not None and version == self._undeclared[0]:
            return scope_id in self._undeclared[1]
        self._undeclared = (version, set())
        return False

    def _closed(self) -> BgpoolError:
        table = self._table
        with contextlib.suppress(ValueError, BgpoolError):  # unmapped or damaged: closed
            if table is not None and table.status() == Status.SHUTTING_DOWN:
                return PoolClosed(texts.SHUTTING_DOWN)
        return PoolClosed(texts.CLOSED)

    def _reader(self) -> TableReader:
        """The table, while the pool serves: `PoolClosed` once it drains or its
        supervisor is gone (the table says so), or this client was closed."""
        table = self._table
        try:
            if table is None or self._gone or not table.serving():
                raise self._closed()
        except ValueError as exc:  # unmapped under us
            raise self._closed_under_us(exc) from None
        return table

    def _closed_under_us(self, exc: Exception) -> BgpoolError | Exception:
        """What to raise for `exc`, met while reading shared memory: `PoolClosed`
        if this client was closed meanwhile (another thread unmapped what this
        one was reading), else `exc` itself."""
        return self._closed() if self._table is None else exc

    # -- the drivers: the only code that does the control socket's I/O ---------

    def _run(self, steps: Steps[T]) -> T:
        """Drive an operation's steps with blocking I/O, in the calling thread."""
        try:
            exchange = next(steps)
            while True:
                exchange = steps.send(self._exchange(exchange))
        except StopIteration as done:
            return cast(T, done.value)

    async def _arun(self, steps: Steps[T]) -> T:
        """Drive an operation's steps on the running event loop, which runs on
        while each reply is awaited. Cancelling the awaiting task closes the
        connection (the supervisor forgets the request, and goes on with what
        it started) and does nothing else."""
        try:
            exchange = next(steps)
            while True:
                exchange = steps.send(await self._aexchange(exchange))
        except StopIteration as done:
            return cast(T, done.value)

    def _exchange(self, exchange: _Exchange) -> protocol.Message:
        """One request on a fresh blocking connection: its reply (with `more`,
        `{"ok": true, "frames": [...]}`, every frame of it)."""
        sock, reply = self._connect(exchange)
        with sock:
            frames = [reply]
            while exchange.more and frames[-1].get("more"):
                try:
                    frames.append(protocol.receive(sock))
                except (OSError, protocol.ProtocolError) as exc:
                    raise self._failure(exchange, exc) from None
        return {"ok": True, "frames": frames} if exchange.more else reply

    def _connect(self, exchange: _Exchange) -> tuple[socket.socket, protocol.Message]:
        """A fresh blocking connection, the request sent on it and its reply
        read, the connection left open for the caller."""
        sock = _new_socket()
        try:
            sock.settimeout(exchange.wait)
            try:
                sock.connect(self._address)
                reply = protocol.request(sock, exchange.message)
            except (OSError, protocol.ProtocolError) as exc:
                raise self._failure(exchange, exc) from None
            self._check_reply(reply)
        except BaseException:
            sock.close()
            raise
        return sock, reply

    async def _aexchange(self, exchange: _Exchange) -> protocol.Message:
        """One request on a fresh non-blocking connection, through the running
        event loop's own socket support (no thread): its reply."""
        import asyncio

        loop = asyncio.get_running_loop()
        sock = _new_socket()

        async def frame() -> protocol.Message:
            reader = protocol.FrameReader()
            while (message := reader.feed(await loop.sock_recv(sock, reader.needed))) is None:
                pass
            return message

        try:
            sock.setblocking(False)
            try:
                async with asyncio.timeout(exchange.wait):
                    await loop.sock_connect(sock, self._address)
                    await loop.sock_sendall(sock, protocol.encode(exchange.message))
                    frames = [await frame()]
                    while exchange.more and frames[0].get("ok") and frames[-1].get("more"):
                        frames.append(await frame())
            except (OSError, protocol.ProtocolError) as exc:  # TimeoutError is an OSError
                raise self._failure(exchange, exc) from None
        finally:
            sock.close()
        self._check_reply(frames[0])  # (outside: EnsureTimeout is a TimeoutError too)
        return {"ok": True, "frames": frames} if exchange.more else frames[0]

    def _failure(self, exchange: _Exchange, exc: Exception) -> BgpoolError:
        """What a request that met `exc` raises, whichever driver met it: no
        pool there (never reached), the supervisor gone (`PoolClosed`), silent
        past the deadline, or out of reach."""
        if isinstance(exc, FileNotFoundError | NotADirectoryError | ConnectionRefusedError):
            if not self._reached:  # no socket file, or one nobody listens on
                return BgpoolError(texts.no_pool_at(self._address))
            return self._closed()
        if isinstance(exc, ConnectionError | protocol.ProtocolError):
            return self._closed()
        if isinstance(exc, TimeoutError):
            if exchange.silence is not None:
                return exchange.silence()
            return BgpoolError("the supervisor did not answer in time")
        assert isinstance(exc, OSError)
        return BgpoolError(_cannot_connect(exc))

    def _check_reply(self, reply: protocol.Message) -> None:
        """Raise the error an error reply names."""
        if not reply.get("ok"):
            self._raise_reply(reply)

    def _request(
        self,
        message: protocol.Message,
        timeout: float | None,
        silence: Callable[[], BgpoolError] | None = None,
    ) -> protocol.Message:
        """One request on a fresh connection (blocking); raise the error it
        answers with, or `silence()` if no answer comes within `timeout` seconds."""
        return self._exchange(_Exchange(message, timeout, silence))

    def _open(
        self,
        message: protocol.Message,
        timeout: float | None,
        silence: Callable[[], BgpoolError] | None = None,
    ) -> tuple[socket.socket, protocol.Message]:
        """As `_request()`, but the connection left open for the caller."""
        return self._connect(_Exchange(message, timeout, silence))

    def _ping(self, timeout: float) -> None:
        """A round trip to the supervisor, answered by its loop: the proof of
        life of systemd's watchdog and of `/livez`. `BgpoolError` when no
        answer comes within `timeout` seconds (frozen, wedged) or it is gone."""
        self._request({"op": "hello"}, timeout, lambda: BgpoolError(texts.no_heartbeat(timeout)))

    def _raise_reply(self, reply: protocol.Message) -> None:
        """Raise the error an error reply names, with its diagnostics as models:
        one `WorkerDiagnostics` (the first worker the message names), or a list
        of them for `StartupError`."""
        message = str(reply.get("message", "the supervisor reported an error"))
        if reply.get("error") == "ValueError":  # an argument only the supervisor could check
            raise ValueError(message)
        kind = ERRORS.get(str(reply.get("error")), BgpoolError)
        if not issubclass(kind, _WithDiagnostics):
            raise kind(message)
        models = [self._diagnostics_model(d) for d in reply.get("diagnostics") or []]
        if issubclass(kind, StartupError):
            raise kind(message, models)
        raise kind(message, models[0] if models else None)

    @property
    def address(self) -> str:
        """The control socket's path (what `BGPOOL_ADDRESS` holds)."""
        return self._address

    @property
    def name(self) -> str | None:
        """The pool's name (`PoolConfig.name`); None for an unnamed pool, which
        only its address reaches."""
        return self._name

    # -- scopes ----------------------------------------------------------------

    def _scope_id(self, scope: Scope | str | None) -> int:
        """The scope a name is resolved in (`_resolve_scope()`), blocking."""
        found = self._known_scope(scope)
        return found if found is not None else self._run(self._resolve_scope(scope))

    def _known_scope(self, scope: Scope | str | None) -> int | None:
        """The scope a name is resolved in, if this client can tell without
        asking the supervisor (None: it must ask, see `_resolve_scope()`)."""
        if scope is None:
            scope = _request_scope.get()
            if scope is None:
                return self._own_scope
        if isinstance(scope, Scope):
            if scope.id in self._scopes:
                return scope.id
            return 0 if self._known_undeclared(scope.id) else None
        if isinstance(scope, str):
            matches = self._labelled(scope)
            return matches[0] if len(matches) == 1 else None
        raise TypeError(f"scope must be a Scope, a scope label or None, not {type(scope).__name__}")

    def _resolve_scope(self, scope: Scope | str | None) -> Steps[int]:
        """The scope a name is resolved in, first found of: the argument, the
        request scope, the calling worker's own scope, global; a scope with no
        declarations falls back to global. Asks the supervisor which scopes
        are declared when a reload may have declared it since this client
        last asked."""
        found = self._known_scope(scope)
        if found is not None:
            return found
        yield from self._learn_scopes()
        if scope is None:
            scope = _request_scope.get()
        if isinstance(scope, Scope):
            if scope.id not in self._scopes and len(self._undeclared[1]) < MAX_UNDECLARED_SCOPES:
                self._undeclared[1].add(scope.id)
            return scope.id if scope.id in self._scopes else 0
        assert isinstance(scope, str)
        matches = self._labelled(scope)
        if len(matches) != 1:
            raise ValueError(f"no single declared scope is labelled {scope!r}")
        return matches[0]

    def _labelled(self, label: str) -> list[int]:
        """The declared scopes (as this client knows them) labelled `label`."""
        return [sid for sid, known in self._scopes.items() if known == label]

    @contextlib.contextmanager
    def request_scope(self, scope: Scope) -> Iterator[None]:
        """Resolve `ensure()`/`diagnostics()` names in `scope` inside the block
        (a context variable: per thread and per asyncio task)."""
        if not isinstance(scope, Scope):
            raise TypeError(f"scope must be a Scope, not {type(scope).__name__}")
        token = _request_scope.set(scope)
        try:
            yield
        finally:
            _request_scope.reset(token)

    # -- the API ---------------------------------------------------------------

    def ensure(
        self,
        names: str | Sequence[str],
        timeout: float | None = None,
        *,
        scope: Scope | str | None = None,
        fail_fast: bool = False,
    ) -> None:
        """Start the named workers that are not running and block until each is
        ready, or raise (`EnsureTimeout`, `WorkerAborted`, `WorkerBootFailed`,
        `WorkerNotDeclared`, `CatchAllLimitReached`, `PoolClosed`)."""
        steps = self._ensure(names, timeout, scope, fail_fast)
        if steps is not None:
            self._run(steps)

    async def aensure(
        self,
        names: str | Sequence[str],
        timeout: float | None = None,
        *,
        scope: Scope | str | None = None,
        fail_fast: bool = False,
    ) -> None:
        """`ensure()` for asyncio: the same arguments, errors and semantics,
        without blocking the event loop. A ready worker returns at once (a
        table read: no I/O, nothing awaited); a cold start awaits the
        supervisor's answer on a non-blocking socket. Cancelling the awaiting
        task abandons the wait and nothing else: the worker still starts."""
        steps = self._ensure(names, timeout, scope, fail_fast)
        if steps is not None:
            await self._arun(steps)

    def _ensure(
        self,
        names: str | Sequence[str],
        timeout: float | None,
        scope: Scope | str | None,
        fail_fast: bool,
    ) -> Steps[None] | None:
        """What `ensure()` and `aensure()` do before any I/O: the timeout's
        check and the hot path (one name, already resolved and ready, in a
        pool that serves: a table read). None when that is all, else the
        steps of the rest."""
        deadline = self._ensure_timeout if timeout is None else _check_timeout(timeout)
        if scope is None and _request_scope.get() is None:
            scope_id: int | None = self._own_scope
        else:
            scope_id = self._known_scope(scope)
        if type(names) is str and scope_id is not None and not self._gone:
            ready = self._ready.get((scope_id, names))  # it reads the table's status too
            try:
                if ready is not None and ready():
                    return None
            except ValueError:  # closed or truncated under us: the slow path says which
                pass
        return self._ensure_steps(names, deadline, scope, scope_id, fail_fast)

    def _ensure_steps(
        self,
        names: str | Sequence[str],
        deadline: float,
        scope: Scope | str | None,
        scope_id: int | None,
        fail_fast: bool,
    ) -> Steps[None]:
        """`ensure()` past its hot path: resolve the scope, check the names,
        return if every one is ready, else ask the supervisor and wait."""
        if scope_id is None:
            scope_id = yield from self._resolve_scope(scope)
        table = self._reader()
        batch = _check_names(names)
        directory = self._directory
        try:
            if all(
                (entry := directory.get((scope_id, name))) is not None and table.name_ready(*entry)
                for name in batch
            ):
                return
        except ValueError as exc:
            raise self._closed_under_us(exc) from None
        request = {
            "op": "ensure",
            "names": batch,
            "scope": scope_id,
            "timeout": deadline,
            "fail_fast": bool(fail_fast),
        }
        reply = yield _Exchange(
            request,
            deadline + ENSURE_SLACK,
            lambda: EnsureTimeout(texts.no_answer(batch, deadline)),
        )
        for name, slot, gen in reply["resolved"]:
            self._remember(table, scope_id, name, slot, gen)

    @_reads_shared_memory
    def status(self) -> list[WorkerStatus]:
        """Every worker instance (declared named instances, hosted catch-all
        names), read from the table without a round trip."""
        return [status_of(s) for s in self._reader().slots() if s.kind != Kind.FREE]

    async def astatus(self) -> list[WorkerStatus]:
        """`status()` for asyncio: a table read, nothing awaited."""
        return self.status()

    @_reads_shared_memory
    def diagnostics(self, name: str, *, scope: Scope | str | None = None) -> WorkerDiagnostics:
        """Why worker `name` is in its state: last exit, exception, instances."""
        return self._run(self._diagnostics(name, scope))

    @_reads_shared_memory
    async def adiagnostics(
        self, name: str, *, scope: Scope | str | None = None
    ) -> WorkerDiagnostics:
        """`diagnostics()` for asyncio: the supervisor's answer is awaited on a
        non-blocking socket."""
        return await self._arun(self._diagnostics(name, scope))

    def _diagnostics(self, name: str, scope: Scope | str | None) -> Steps[WorkerDiagnostics]:
        _check_name(name)
        scope_id = yield from self._resolve_scope(scope)
        return (yield from self._diagnostics_in(scope_id, name, 10.0))

    def _diagnostics_in(self, scope_id: int, name: str, timeout: float) -> Steps[WorkerDiagnostics]:
        """The supervisor's diagnostics of `name` in the resolved scope
        `scope_id`, asked with `timeout` (the status page asks with a short
        one, so a frozen supervisor cannot hold it up)."""
        reply = yield _Exchange({"op": "diagnostics", "name": name, "scope": scope_id}, timeout)
        return self._diagnostics_model(reply["diagnostics"])

    def _diagnostics_model(self, data: dict[str, Any]) -> WorkerDiagnostics:
        reader = self._reader()
        fields = {k: v for k, v in data.items() if k != "slots"}
        instances = [status_of(reader.read(i)) for i in data["slots"]]
        error = fields.pop("last_error")
        generation, published = self._vars_header(data["slots"])
        return WorkerDiagnostics(
            **fields,
            last_error=ErrorInfo(**error) if error else None,
            vars_generation=generation,
            vars_published_at=datetime.fromtimestamp(published, UTC) if published else None,
            instances=instances,
        )

    def _vars_header(self, slots: list[int]) -> tuple[int, float]:
        """The generation and publish time of the vars of the name hosted at
        `slots` ((0, 0.0) if none). Workers write the header: an implausible
        time is left out rather than breaking diagnostics."""
        if not slots:
            return 0, 0.0
        reader = Reader(segment_name(self._table_name, slots[0]))
        try:
            found = reader.read()
        except (TimeoutError, ValueError):  # stuck mid-flip, or a header gone wrong
            found = None
        finally:
            reader.close()
        if found is None:
            return 0, 0.0
        generation, when, _ = found
        return generation, when if 0.0 < when < 1e11 else 0.0

    def get_vars(self, name: str, *, scope: Scope | str | None = None) -> Mapping[str, Any]:
        """The latest vars snapshot worker `name` published: a deeply read-only
        mapping, the same object while it is unchanged. A pure read: it never
        starts a worker. `WorkerNotDeclared` for an undeclared name,
        `VarsNotPublished` before its first `set_vars()`."""
        if scope is None and _request_scope.get() is None:
            scope_id = self._own_scope
        else:
            scope_id = self._scope_id(scope)
        view = self._vars.get((scope_id, name))
        if view is not None and view.current is not None and not self._gone:
            try:
                if view.current():
                    return view.value  # type: ignore[return-value]  # set before `current`
            except ValueError:  # closed or truncated under us: the reads below say which
                pass
        return self._read_vars(scope_id, name, view)

    def _read_vars(self, scope_id: int, name: str, view: _VarsView | None) -> Mapping[str, Any]:
        """`get_vars()` past its hot path: find the name's vars (again, if its
        slot changed hands), and decode a snapshot newer than the one held."""
        table = self._reader()
        try:
            if view is None or table.generation(view.offset) != view.slot_generation:
                view = self._locate_vars(scope_id, name)
            if view.value is not None and view.reader.generation() == view.generation:
                return view.value
        except ValueError as exc:  # unmapped under us (a bad name: raised as is)
            raise self._closed_under_us(exc) from None
        try:
            found = view.reader.read()
            if found is None:
                self._reader()  # a pool that stopped meanwhile removed it: PoolClosed
                raise VarsNotPublished(texts.vars_not_published(name))
            view.value, view.generation = decode(found[2]), found[0]
            mapped = view.reader.mapping()  # None if closed meanwhile: no hot path then
            if mapped is not None:
                view.current = table.vars_check(
                    view.offset, view.slot_generation, mapped, view.generation
                )
        except (ValueError, TimeoutError) as exc:  # SnapshotError is a ValueError
            if self._table is None:
                raise self._closed() from None
            raise BgpoolError(
                f'the vars of background worker "{name}" are unreadable: {exc}'
            ) from None
        return view.value

    def _locate_vars(self, scope_id: int, name: str) -> _VarsView:
        """Find (and remember) where `name`'s vars live: from the directory of
        named workers, else by asking the supervisor (catch-all names)."""
        _check_name(name)
        table = self._reader()
        entry = self._directory.get((scope_id, name))
        if entry is not None and table.generation(entry[0]) != entry[1]:
            entry = None  # the name moved, or is gone (a reload)
        if entry is None:
            reply = self._request({"op": "locate", "name": name, "scope": scope_id}, timeout=10.0)
            if reply["slot"] is None:  # a catch-all name not hosted now
                raise VarsNotPublished(texts.vars_not_published(name))
            entry = (table.offset(reply["slot"]), reply["gen"])
        # An old view is dropped, not closed: another thread may be reading
        # through it; its mapping goes with the last reference.
        offset, generation = entry
        reader = Reader(segment_name(self._table_name, table.index(offset)))
        view = self._vars[(scope_id, name)] = _VarsView(reader, offset, generation)
        return view

    def restart_workers(
        self, names: str | Sequence[str] | None = None, *, scope: Scope | str | None = None
    ) -> None:
        """Run new code: load a new code generation (the targets' modules and
        scripts as they are on disk now), then replace every running instance
        of `names` (all workers, or all of `scope`, when None) with one forked
        from it. Rolling: a pool's instances one at a time, the next drained
        once its replacement is ready. Returns once every replacement is ready;
        `WorkerBootFailed` names those whose new code failed to load (their
        instances were left running) or to boot. Lazy workers never ensured
        stay unstarted; readiness stays. `PoolClosed` if the pool is shutting
        down or gone."""
        message: dict[str, Any] = {"op": "restart"}
        if names is not None:
            message["names"] = _check_names(names)
        if names is not None or scope is not None:
            message["scope"] = self._scope_id(scope)
        self._reader()
        # No deadline of ours: a rollout takes as long as its drains and boots;
        # the supervisor always answers, and its death closes the connection.
        self._request(message, timeout=None)

    def stop(self, names: str | Sequence[str], *, scope: Scope | str | None = None) -> None:
        """Stop every instance of the named workers: each is drained (stop
        pipe closed, `grace_period`, then SIGTERM and SIGKILL to its process
        tree, a pending restart cancelled), and this returns once all have
        exited. They stay declared, in state `stopped`, and nothing starts
        them again (no crash restart, restart or reload) until `ensure()` or
        `start_workers()` asks; their names are not ready meanwhile.
        `WorkerNotDeclared` (nothing stopped) for an undeclared name."""
        self._control({"op": "stop", "names": _check_names(names)}, scope, timeout=None)

    def start_workers(
        self, names: str | Sequence[str], *, scope: Scope | str | None = None
    ) -> None:
        """Start whatever is not running of the named workers (stopped,
        lazy, aborted: every instance; a catch-all name is hosted) and return
        without waiting for readiness: `ensure()` is the waiting form.
        `WorkerNotDeclared`, `CatchAllLimitReached`: nothing started."""
        self._control({"op": "start_workers", "names": _check_names(names)}, scope, timeout=10.0)

    def scale(self, name: str, num: int, *, scope: Scope | str | None = None) -> None:
        """Give named worker `name` `num` instances from now on, as if it were
        declared with `num`: `0` stops every instance (the worker is then
        lazy: `ensure()` starts one); growing starts the new instances at once
        (unless the worker was stopped: then with it); shrinking drains the
        highest indexes, and this returns once they have exited. The count
        holds until a `reload()` changes the worker's declaration.
        `TypeError`/`ValueError` for a bad `num`, `ValueError` for a name a
        catch-all serves, `WorkerNotDeclared` for an undeclared one."""
        _check_name(name)
        if isinstance(num, bool) or not isinstance(num, int):
            raise TypeError(f"num must be an int, not {type(num).__name__}")
        if num < 0:
            raise ValueError(f"num must be >= 0, not {num}")
        self._control({"op": "scale", "name": name, "num": num}, scope, timeout=None)

    def _control(
        self, message: dict[str, Any], scope: Scope | str | None, timeout: float | None
    ) -> None:
        """Send a per-worker control request in the scope names resolve in.
        With no deadline of ours for a drain: the supervisor always answers
        (after the grace period and the kill at worst), and its death closes
        the connection."""
        message["scope"] = self._scope_id(scope)
        self._reader()
        self._request(message, timeout=timeout)

    def reload_config(self) -> str:
        """Have the `bgpool run` that owns the pool load its config file again,
        apply it and restart its workers on new code (what SIGHUP does); return
        its account of what changed. `BgpoolError` saying why if the config
        could not be applied (the pool then runs as it was), or if the pool's
        owner is not `bgpool run`."""
        self._reader()
        reply = self._request({"op": "reload_config"}, timeout=None)
        return str(reply["outcome"])

    def watch(self) -> Watch:
        """Subscribe to the supervisor's state-change events: a `Watch` to wait
        on (its `fileno()`) and read (`events()`) without blocking, and to
        `close()` when done. Every instance's change of state from now on is
        sent, as it happens; what came before is in `status()`. `PoolClosed` if
        the pool is gone."""
        self._reader()
        sock, _ = self._open({"op": "watch"}, timeout=10.0)
        return Watch(sock)

    def logs(
        self, name: str, lines: int = 100, *, scope: Scope | str | None = None
    ) -> list[LogLine]:
        """The last `lines` lines the instances of worker `name` wrote (stdout
        and stderr, relayed), oldest first, each with its time, stream and
        instance: the supervisor keeps the last `PoolConfig.log_lines` of every
        name. `[]` for a name that wrote nothing or whose output is not relayed
        (`output="inherit"`); `WorkerNotDeclared` for an undeclared name (one
        that a reload removed included); `PoolClosed` if the pool is gone."""
        return self._run(self._logs(name, lines, scope))

    async def alogs(
        self, name: str, lines: int = 100, *, scope: Scope | str | None = None
    ) -> list[LogLine]:
        """`logs()` for asyncio: the supervisor's answer is awaited on a
        non-blocking socket."""
        return await self._arun(self._logs(name, lines, scope))

    def _logs(self, name: str, lines: int, scope: Scope | str | None) -> Steps[list[LogLine]]:
        message = yield from self._logs_message(name, lines, scope, follow=False)
        reply = yield _Exchange(message, 10.0, more=True)
        return [_log_line(data) for frame in reply["frames"] for data in frame["lines"]]

    def follow_logs(
        self, name: str, lines: int = 0, *, scope: Scope | str | None = None
    ) -> LogFollow:
        """Follow worker `name`'s lines as `bgpool logs -f` does: a `LogFollow`
        that gives its last `lines` kept lines, then every new one as the
        supervisor relays it, until it is closed or the pool is. Errors as
        `logs()`."""
        message = self._run(self._logs_message(name, lines, scope, follow=True))
        sock, reply = self._open(message, timeout=10.0)
        return LogFollow(sock, reply)

    def _logs_message(
        self, name: str, lines: int, scope: Scope | str | None, *, follow: bool
    ) -> Steps[protocol.Message]:
        """A checked `logs` request."""
        _check_name(name)
        count = _check_lines(lines)
        scope_id = yield from self._resolve_scope(scope)
        self._reader()
        return {"op": "logs", "name": name, "scope": scope_id, "lines": count, "follow": follow}

    def close(self) -> None:
        """Unmap the table and vars: every later call raises `PoolClosed`, and
        so does a call that was reading them in another thread. A mapping that
        a thread is reading at this very moment cannot be unmapped: it goes
        with its last reference instead."""
        table, self._table = self._table, None
        views, self._vars = self._vars, {}
        for reader in [view.reader for view in views.values()] + ([table] if table else []):
            with contextlib.suppress(BufferError):
                reader.close()

    def __enter__(self) -> PoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Subscription:
    """One connection to the supervisor that streams frames, held until
    closed, read without blocking: what `Watch` and `LogFollow` share."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._decoder = protocol.FrameDecoder()

    def fileno(self) -> int:
        """The file descriptor that is readable when something (or the
        supervisor's end) has arrived."""
        return self._sock.fileno()

    def close(self) -> None:
        """End the subscription. Idempotent."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Watch(_Subscription):
    """A subscription to a pool's state-change events (`PoolClient.watch()`).

    Non-blocking: wait until `fileno()` is readable (`select`, `selectors`,
    asyncio's `add_reader`), then call `events()`. Usable as a context manager
    (`close()` on exit). One connection to the supervisor, held until closed.
    """

    def events(self) -> list[dict[str, Any]] | None:
        """The events that have arrived since the last call, oldest first (up
        to 64 KiB of them: call again while `fileno()` stays readable); `[]` if
        none has. Each is a dict: `worker` (its name), `scope` (label, `""` for
        global), `instance` (index), `state` (the new one), `pid` (None when not
        running), `detail` (what happened, in words) and `event` (`"state"`).
        None once the supervisor is gone: nothing more will come."""
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return []
        except OSError:
            return None
        return self._decoder.feed(data) if data else None


class LogFollow(_Subscription):
    """A worker name's lines as they come (`PoolClient.follow_logs()`).

    Non-blocking, as `Watch` is: wait until `fileno()` is readable, then call
    `lines()` until it returns `[]`; the first call returns the kept lines at
    once (already read: `fileno()` does not signal them). A reader too slow
    for the flow of lines does not hold the supervisor up: lines it cannot
    take are dropped (for it alone) and counted in `dropped`. Usable as a context manager. One
    connection to the supervisor, held until closed.
    """

    def __init__(self, sock: socket.socket, first: protocol.Message) -> None:
        super().__init__(sock)
        self._pending: collections.deque[protocol.Message] = collections.deque([first])
        self._ended = False
        self.dropped = 0
        """Lines the supervisor dropped for this reader so far."""

    def lines(self) -> list[LogLine] | None:
        """The lines that arrived since the last call, oldest first (`[]` if
        none has; call again while it returns some); None once the pool is
        gone and every line was returned. A call stops at a gap of dropped
        lines, and the next begins with it: `dropped` grows just before the
        lines that came after the gap are returned."""
        if not self._pending and not self._ended:
            self._receive()
        found: list[LogLine] = []
        while self._pending:
            message = self._pending[0]
            if message.get("event") == "dropped":
                if found:
                    break  # the gap begins the next call
                self.dropped += int(message["count"])
            elif "lines" in message:  # the kept lines, first
                found += [_log_line(data) for data in message["lines"]]
            else:
                found.append(_log_line(message["line"]))
            self._pending.popleft()
        if not found and self._ended and not self._pending:
            return None
        return found

    def _receive(self) -> None:
        """Read what has arrived, without blocking; note the end."""
        data = protocol.available(self._sock)
        if data is None:
            return
        try:
            self._pending.extend(self._decoder.feed(data))
        except protocol.ProtocolError:
            data = b""
        if not data:
            self._ended = True


def _when(timestamp: float) -> datetime | None:
    return datetime.fromtimestamp(timestamp, UTC) if timestamp else None


def status_of(slot: Slot) -> WorkerStatus:
    """A table slot as a `WorkerStatus`."""
    return WorkerStatus(
        name=slot.name,
        scope=slot.scope_label,
        instance=slot.instance,
        pid=slot.pid or None,
        state=slot.state.label,  # type: ignore[arg-type]
        ever_ready=slot.ever_ready,
        attempts=slot.attempts,
        consecutive_failures=slot.failures,
        last_exit_status=slot.last_exit,
        started_at=_when(slot.started_at),
        ready_at=_when(slot.ready_at),
        eager=slot.eager,
        hangs=slot.hangs,
        recycles=slot.recycles_memory + slot.recycles_lifetime,
        last_recycle_reason=slot.recycle_reason.label,  # type: ignore[arg-type]
    )


_default_client: tuple[int, PoolClient] | None = None
_default_lock = threading.Lock()


def get_vars(name: str, *, scope: Scope | str | None = None) -> Mapping[str, Any]:
    """`get_vars()` through this process's default client (`connect()` to
    `$BGPOOL_ADDRESS`, made on first use): what a worker calls to read another
    worker's vars."""
    global _default_client
    with _default_lock:
        if _default_client is None or _default_client[0] != os.getpid():
            _default_client = (os.getpid(), connect())
        client = _default_client[1]
    return client.get_vars(name, scope=scope)


def _given_address(address: str | None, pool: str | None) -> str | None:
    """The control socket of `address`, else of the pool named `pool`, else of
    `$BGPOOL_ADDRESS`; None when none is given."""
    if address is not None:
        return address
    if pool is not None:
        return naming.address(pool)
    return os.environ.get("BGPOOL_ADDRESS") or None


def connect(address: str | None = None, *, pool: str | None = None) -> PoolClient:
    """A client of the running pool at `address`, else of this user's pool
    named `pool` (`PoolConfig.name`), else at `$BGPOOL_ADDRESS`.
    `BgpoolError` if none is given, or `no pool is listening at ADDRESS`."""
    found = _given_address(address, pool)
    if found is None:
        raise BgpoolError(
            "no pool address: pass connect(address) or connect(pool=NAME), or set "
            "BGPOOL_ADDRESS (Pool.start() sets it for the processes the application starts)"
        )
    return PoolClient(found)


def locate(address: str | None = None, pool: str | None = None) -> str:
    """The control socket a command line means, first found of: `address`,
    the socket of the pool named `pool`, `$BGPOOL_ADDRESS`, and the only named
    pool of this user that is running. `BgpoolError` saying how to give one
    when none is found, or naming them when several run."""
    found = _given_address(address, pool)
    if found is not None:
        return found
    names = naming.running()
    if len(names) == 1:
        return naming.address(names[0])
    raise BgpoolError(texts.several_pools(names) if names else texts.NO_POOL_GIVEN)

"""The worker's runtime: what runs in a new worker process, between the fork and
the target, and after the target returns or raises.

Runs in the child only. With `start_method="fork"` the child was forked from
its code generation (`zygote.py`), which imported its module or compiled its
script already, so the target runs at once; with `"spawn"` it replaces itself
with a fresh interpreter first. Either
way, before any user code runs, the child: leaves the supervisor's process
group, asks for SIGKILL when the supervisor dies, resets signal handling to a
new interpreter's, and closes every descriptor but stdio and its own two pipe
ends (so it holds no sibling's stop pipe). A target that returns an awaitable
(an `async def` function) is run to completion with `asyncio.run()`.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half, which has no stub
import atexit
import contextlib
import gc
import importlib
import inspect
import io
import json
import marshal
import os
import signal
import sys
import traceback
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from types import CodeType, ModuleType, TracebackType
from typing import Any, ClassVar, NoReturn, TypeVar

from .. import identity, platform, protocol, texts
from ..launch import python_command
from . import handle

T = TypeVar("T")

TRACEBACK_TAIL_LINES = 40
TRACEBACK_TAIL_CHARS = 8000


@dataclass(frozen=True)
class Boot:
    """Everything a new worker needs to know, as plain data."""

    name: str
    scope_id: int
    scope_label: str
    instance: int
    target: str
    script: str | None
    args: list[str]
    env: dict[str, str]
    supervisor_pid: int
    stop_fd: int
    notify_fd: int
    sys_path: list[str]
    vars_segment: str
    max_vars_bytes: int
    pool: str  # the pool's label in process titles
    stdout_fd: int | None = None  # pipes to the supervisor's relay, or inherit stdio
    stderr_fd: int | None = None
    heartbeat_interval: float | None = None  # heartbeat_timeout's pace (None: off)
    lease_token: int | None = None  # a singleton's fencing token
    lease_deadline: float = 0.0  # and when its lease guard kills it (boottime seconds)

    FDS: ClassVar[tuple[str, ...]] = ("stop_fd", "notify_fd", "stdout_fd", "stderr_fd")
    """The fields that hold descriptors, passed along as such to a generation."""

    def request(self) -> tuple[bytes, list[int]]:
        """This Boot as a spawn request to a generation or a spare: the packet
        (`from_request()` reads it) and the descriptors to pass with it as
        SCM_RIGHTS. In marshal's format, not JSON: the worker decodes it, and
        on 3.11, where reading an object writes its reference count, json's
        decoder made each worker keep about 80 KiB more of its own than
        marshal's; both ends run the same interpreter (a generation is
        forked from its supervisor)."""
        names = tuple(name for name in self.FDS if getattr(self, name) is not None)
        return marshal.dumps((tuple(vars(self).values()), names)), [getattr(self, n) for n in names]

    @classmethod
    def from_request(cls, data: bytes, fds: list[int]) -> Boot:
        """The Boot a spawn request describes, with `fds` (this process's
        numbers for the descriptors it came with) as its descriptors."""
        values, names = marshal.loads(data)
        fields = list(values)
        for name, fd in zip(names, fds, strict=True):
            fields[_FIELD_INDEX[name]] = fd
        return cls(*fields)


_FIELD_INDEX = {field: index for index, field in enumerate(Boot.__dataclass_fields__)}


COMPILED: dict[str, CodeType] = {}
"""Script targets' code, compiled once by the generation workers fork from."""


def compile_script(path: str) -> CodeType:
    """A script target's code, compiled as `python path` would."""
    with open(path, "rb") as source:
        return compile(source.read(), path, "exec", dont_inherit=True)


def reset_signals() -> None:
    """Give the child the signal handling of a new Python process, not the
    supervisor's (its wake-up fd and handlers mean nothing here)."""
    signal.set_wakeup_fd(-1)
    wanted: dict[int, Any] = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGPIPE: signal.SIG_IGN,
        signal.SIGXFSZ: signal.SIG_IGN,
    }
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        handler = wanted.get(sig, signal.SIG_DFL)
        # Only what differs: one system call per signal would cost a third of
        # a millisecond of every start.
        with contextlib.suppress(OSError, ValueError):
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _leave_the_group() -> None:
    """Leave the supervisor's process group, and ask for SIGKILL when the
    supervisor (this process's parent) dies."""
    os.setpgid(0, 0)
    platform.set_parent_death_signal(signal.SIGKILL)


def _detach(boot: Boot) -> None:
    """Cut the child loose from the supervisor's process state (its signal
    handling and process group: by the caller)."""
    if os.getppid() != boot.supervisor_pid:
        os._exit(1)  # the supervisor died before the prctl took effect
    for fd, target in ((boot.stdout_fd, 1), (boot.stderr_fd, 2)):
        if fd is not None:
            os.dup2(fd, target)
    platform.close_fds_except({boot.stop_fd, boot.notify_fd})
    if boot.env:  # even an empty update() costs a worker pages of its own
        os.environ.update(boot.env)


def prepare_forked() -> None:
    """What a child forked from a code generation does before it knows which
    worker it will be: a spare (`zygote.py`) does it before it is asked for.
    (Its output is line-buffered already: the generation made it so.)"""
    gc.freeze()  # never collect the generation's objects
    atexit._clear()  # the generation's exit handlers are not this process's
    # The generation reset every other signal (`zygote.serve`); a full
    # reset here would cost each worker pages of memory of its own. The C
    # function, not `signal.signal()`, whose enum conversion of the old
    # handler alone made each worker keep 70 KiB more on 3.11.
    _signal.signal(signal.SIGINT, signal.default_int_handler)
    _leave_the_group()


def warm_up() -> None:
    """Take, on made-up values, the first steps `_run` takes in every worker
    (its identity and handle records), as a generation and a spare rehearse
    them (`zygote._rehearse`)."""
    identity.WorkerInfo("", "", 0)
    handle.Context(stop_fd=-1, notify_fd=-1, vars_segment="", max_vars_bytes=0,
                   heartbeat_interval=None)  # fmt: skip


def line_buffered_output() -> None:
    """Line-buffer stdout and stderr: a line reaches the relay when printed.
    A generation does it once for the workers it forks (each doing it itself
    kept 60-70 KiB more of its own on 3.11); a spawned worker does it itself."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)


def run_forked(boot: Boot) -> NoReturn:
    """Entry point in the child of a fork, for `start_method="fork"`, once
    `prepare_forked()` has run."""
    code = 1
    try:
        _set_title(boot)  # its title and comm: the generation's or the spare's are not ours
        _detach(boot)
        code = _run(boot)
    finally:
        os._exit(code)


def exec_spawned(boot: Boot) -> NoReturn:
    """Entry point in the child of a fork, for `start_method="spawn"`: replace
    the process with a fresh interpreter that runs `spawned_main()`."""
    try:
        reset_signals()
        _leave_the_group()
        _detach(boot)
        os.set_inheritable(boot.stop_fd, True)
        os.set_inheritable(boot.notify_fd, True)
        command = python_command("bgpool.worker.runtime", "spawned_main", json.dumps(asdict(boot)))
        os.execve(sys.executable, command, dict(os.environ))
    finally:
        os._exit(1)


def spawned_main() -> NoReturn:
    """Entry point of a spawned worker's fresh interpreter."""
    boot = Boot(**json.loads(sys.argv[1]))
    _set_title(boot)
    sys.path[:] = boot.sys_path
    os.set_inheritable(boot.stop_fd, False)
    os.set_inheritable(boot.notify_fd, False)
    line_buffered_output()
    os._exit(_run(boot))


def _guard_lease(boot: Boot) -> None:
    """Arm the singleton's lease guard (the kernel kills this process at the
    lease's safe deadline, whatever its supervisor does: supervisor/leases.py),
    tell the supervisor it may move it from now on, and publish the fencing
    token as `BGPOOL_LEASE_TOKEN`."""
    platform.guard_lease(boot.lease_deadline)
    os.write(boot.notify_fd, protocol.encode({"t": "guarded"}))
    os.environ["BGPOOL_LEASE_TOKEN"] = str(boot.lease_token)


def _set_title(boot: Boot) -> None:
    """Show the worker in ps as `bgpool: worker NAME.INSTANCE POOL`."""
    label = f"{boot.scope_label}:{boot.name}" if boot.scope_label else boot.name
    platform.set_process_title(texts.process_title(f"worker {label}.{boot.instance}", boot.pool))


def _run(boot: Boot) -> int:
    """Run the target; return the exit status the process should end with."""
    if boot.lease_token is not None:  # first: a singleton must not outlive its lease
        _guard_lease(boot)
    info = identity.WorkerInfo(boot.name, boot.scope_label, boot.instance, boot.lease_token)
    identity.assume(info, boot.scope_id)
    handle.install(
        handle.Context(
            stop_fd=boot.stop_fd,
            notify_fd=boot.notify_fd,
            vars_segment=boot.vars_segment,
            max_vars_bytes=boot.max_vars_bytes,
            heartbeat_interval=boot.heartbeat_interval,
        )
    )
    os.environ["BGPOOL_WORKER"] = boot.name
    sys.argv = [boot.script or boot.target, *boot.args]
    try:
        if boot.script is not None:
            _run_script(boot.script)
        else:
            module, _, attribute = boot.target.partition(":")
            target: object = importlib.import_module(module)
            for part in attribute.split("."):
                target = getattr(target, part)
            if not callable(target):
                raise TypeError(texts.not_callable(boot.target, target))
            result = target()
            if inspect.isawaitable(result):  # an async def target, or one returning a task
                import asyncio  # here: a generation does not pay for it unless used

                asyncio.run(_awaited(result))
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except BaseException as exc:
        handle.notify({"t": "error", **describe(exc)})
        traceback.print_exception(type(exc), exc, _user_traceback(exc.__traceback__))
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    return code


async def _awaited(awaitable: Awaitable[T]) -> T:
    """`asyncio.run()` takes a coroutine: any awaitable, awaited in one."""
    return await awaitable


def _run_script(path: str) -> None:
    """Run a script target as `__main__`, as runpy.run_path() would, from the
    code its generation compiled (compiled here when there is none: spawn)."""
    code = COMPILED.get(path) or compile_script(path)
    main = ModuleType("__main__")
    main.__dict__.update(__file__=path, __cached__=None, __loader__=None, __package__="",
                         __spec__=None)  # fmt: skip
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def _exit_status(code: object) -> int:
    """The status `sys.exit(code)` gives, as the interpreter would compute it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


_OWN_FILES = {__file__, os.path.join(os.path.dirname(__file__), "zygote.py")}
_ASYNCIO = os.path.join(os.path.dirname(os.__file__), "asyncio", "")  # not imported for this


def _user_traceback(tb: TracebackType | None) -> TracebackType | None:
    """Skip the frames at the top of a traceback that are not the user's: the
    runtime's, a generation's, and asyncio's (`asyncio.run()` and its loop,
    between the runtime and an async target)."""
    while tb is not None and (
        (filename := tb.tb_frame.f_code.co_filename) in _OWN_FILES or filename.startswith(_ASYNCIO)
    ):
        tb = tb.tb_next
    return tb


def describe(exc: BaseException) -> dict[str, object]:
    """A crash as data for diagnostics: type, message, where it was raised (the
    innermost frame, or a syntax error's place), traceback tail."""
    kind = type(exc)
    qualified = (
        kind.__qualname__
        if kind.__module__ in ("builtins", "__main__")
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    tb = _user_traceback(exc.__traceback__)
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith("<frozen")]
    filename: str | None = None
    lineno: int | None = None
    if isinstance(exc, SyntaxError) and exc.filename:
        filename, lineno = exc.filename, exc.lineno
    elif frames:
        filename, lineno = frames[-1].filename, frames[-1].lineno
    lines = "".join(traceback.format_exception(kind, exc, tb)).splitlines()
    tail = "\n".join(lines[-TRACEBACK_TAIL_LINES:])[-TRACEBACK_TAIL_CHARS:]
    return {
        "type": qualified,
        "message": str(exc)[:TRACEBACK_TAIL_CHARS],
        "filename": filename,
        "lineno": lineno,
        "traceback": tail,
    }

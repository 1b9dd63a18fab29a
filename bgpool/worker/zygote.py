"""A code generation's process: the targets' code, loaded once, forked from.

A generation is forked, as a child of the supervisor, from the **seed**: a
process the supervisor forks first thing, before it imports its own modules,
so that generations and workers carry only what workers need (see
`supervisor/generations.py` for why generations are processes). A generation
makes itself a clean parent for workers (signals as a new interpreter has
them, no descriptor but its socket, SIGKILL when the supervisor dies), imports
every module target afresh from disk and compiles every script target, says
what failed (a module target's function that does not exist too: a
declaration error, with the closest name there is), then forks one worker per
request it receives on its socket. Its module search path is the one the
request gives: the pool's root first, then the application's `sys.path`.

Workers are forked by `platform.fork_server()`, so each is the supervisor's
child, not this process's: the supervisor waits for, signals and reaps its
workers as if it had forked them itself, and this process never has to. While
no request waits, a generation keeps two **spares** forked ahead (`_fork_on_request`,
`bgpool-spare` in ps), and offers each to the supervisor, which hands the
next requests to them itself: a cold start or a crash restart then waits for
no fork, and for no hop through this process.

The socket is SOCK_SEQPACKET, one message per packet, JSON but for the spawn
requests. This process sends
``{"t": "importing", "module": name}`` before it imports each module (if
that import ends the process, with `os._exit()`, a crash in an extension
module or the OOM killer, the supervisor knows which module it was, and loads
a generation without it) and
``{"t": "loaded", "failures": {target: error}, "threads": n}`` once all are; then
``{"t": "spare", "pid": n}`` for each spare, with the supervisor's end of the
spare's own socket as SCM_RIGHTS (the supervisor sends a spawn request there,
as it would here); and it answers each spawn request (a `Boot`, in the
format `Boot.request()` makes, with its pipe ends as SCM_RIGHTS) with
``{"t": "spawned", "pid": n}`` or ``{"t": "failed", "errno": n}``. It exits
when the supervisor closes its end.
"""

from __future__ import annotations

import _thread
import dataclasses
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import CodeType, ModuleType
from typing import Any, NoReturn

from .. import _heap, platform, texts
from . import runtime

MAX_PACKET = 1 << 20
"""The largest request: a Boot with its environment and sys.path."""

SPARES = 2
"""The spares a generation keeps: two, so that a crash right after a start
(or two starts in a row) still finds one."""

SPARE_AFTER = 0.001
"""Seconds without a request before a generation forks its next spare: about
what a worker handed a spare takes to be ready (they would share the CPUs
before), and never in the middle of a batch. At 10 ms, crash restarts right
after a start found no spare in 80 of 83 hand-offs (the benchmark's
crash_to_ready), and forked in the slow way."""

WARM_UPS = 10
"""How often a generation rehearses the first steps of every worker before it
forks any (`_rehearse`): CPython rewrites a function's code as it specialises
it, over its first calls (8 on 3.11, 2 on 3.12 and later), so code run only in
workers was specialised in each worker's own copy of it, one page at a time."""


class _FreshSourceLoader(importlib.machinery.SourceFileLoader):
    """Python's source loader, but a cached .pyc written before its source last
    changed is not trusted: the .pyc check compares whole seconds and the size,
    so an edit of the same size within the second it was compiled would
    otherwise run the old code."""

    def get_code(self, fullname: str) -> CodeType | None:
        source = self.get_filename(fullname)
        try:
            cached = importlib.util.cache_from_source(source)
            stale = os.stat(cached).st_mtime_ns <= os.stat(source).st_mtime_ns
        except (OSError, NotImplementedError, ValueError):
            stale = False
        if stale:
            return self.source_to_code(self.get_data(source), source)
        return super().get_code(fullname)


def _fresh_imports(installed: list[str]) -> None:
    """Look for modules on disk as a new interpreter would, with `_FreshSourceLoader`,
    in every directory but the interpreter's own, `installed` (the standard
    library and installed packages, which nobody edits in place)."""
    loaders = [
        (_FreshSourceLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    ]
    sys.path_hooks.insert(0, importlib.machinery.FileFinder.path_hook(*loaders))
    for directory in list(sys.path_importer_cache):
        if not (directory + os.sep).startswith(tuple(installed)) and not directory.endswith(".zip"):
            del sys.path_importer_cache[directory]


def _load(
    sock: socket.socket, modules: list[str], scripts: list[str], targets: list[str]
) -> dict[str, object]:
    """Import `modules` (saying so on `sock` before each), compile `scripts`
    (into `runtime.COMPILED`) and look up each module target's function;
    return what failed, by module name, script path or target, as
    diagnostics data."""
    failures: dict[str, object] = {}
    loaded: dict[str, ModuleType] = {}
    for module in modules:
        sock.send(json.dumps({"t": "importing", "module": module}).encode())
        try:
            loaded[module] = importlib.import_module(module)
        except BaseException as exc:  # the workers that need it report it as a boot failure
            failures[module] = runtime.describe(exc)
    for path in scripts:
        try:
            runtime.COMPILED[path] = runtime.compile_script(path)
        except BaseException as exc:
            failures[path] = runtime.describe(exc)
    for target in targets:
        module = target.partition(":")[0]
        if module in loaded and (problem := _no_function(loaded[module], target)) is not None:
            failures[target] = problem
    return failures


def _no_function(module: ModuleType, target: str) -> dict[str, Any] | None:
    """Why `target`'s function cannot be called, its module imported: an
    attribute on its path does not exist (with the closest name there is) or
    it is not callable; None if it can be."""
    found: object = module
    owner = f"module {module.__name__}"
    for part in target.partition(":")[2].split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            message = texts.no_attribute(target, owner, part, _closest(found, part))
            return _problem("AttributeError", message, module)
        except BaseException as exc:  # a module __getattr__ or a descriptor that raised
            return runtime.describe(exc)
        owner = f"{owner.removeprefix('module ')}.{part}"
    if not callable(found):
        return _problem("TypeError", texts.not_callable(target, found), module)
    return None


def _problem(kind: str, message: str, module: ModuleType) -> dict[str, Any]:
    """A target's problem as diagnostics data, placed in its module's file."""
    return {"type": kind, "message": message, "filename": getattr(module, "__file__", None),
            "lineno": None, "traceback": ""}  # fmt: skip


def _closest(owner: object, name: str) -> list[str]:
    """The name on `owner` closest to `name` (its modules and dunders left
    out), for a did-you-mean."""
    import inspect  # only when a target is misspelt

    names = [
        n
        for n in dir(owner)
        if not n.startswith("__")
        and not isinstance(inspect.getattr_static(owner, n, None), ModuleType)
    ]
    return texts.closest(name, names)


def _set_apart(sock: socket.socket, name: str, title: str) -> None:
    """Make this new process a clean parent for what it forks, named `name` in
    its comm (what tools that tell generations from workers read) and `title`
    in ps: signals as a new interpreter has them, no descriptor of its
    parent's but `sock`, SIGKILL when the supervisor dies."""
    parent = os.getppid()
    runtime.reset_signals()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we end
    platform.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)  # the supervisor died before the prctl took effect
    platform.close_fds_except({sock.fileno()})
    platform.set_process_title(title)
    platform.set_process_name(name.encode())  # after the title, which set the comm too


def _keep_shared() -> None:
    """Keep what this process has loaded shared with the processes it forks:
    never collected (`gc.freeze()`), and on 3.12 and later immortal, so that
    no reference to it writes its page (`bgpool/_heap.c` says why and what it
    costs). The seed does it first: a generation then writes only to what it
    loaded itself, not to the pages it shares with the seed. Called with the
    collector disabled: between unfreeze() and freeze() a collection would
    walk everything, writing to every page."""
    if _heap.IMMORTAL_OBJECTS:
        gc.unfreeze()  # get_objects() lists only what is not frozen
        _heap.immortalize(gc.get_objects())
    gc.freeze()


def seed(sock: socket.socket, pool: str) -> NoReturn:
    """Entry point of the seed of pool `pool` (its label in process titles),
    forked by the supervisor before it imports its own modules: each
    generation is forked from here (as a child of the supervisor), so a
    generation, and every worker, holds what workers need and not what the
    supervisor does. Never returns.

    Nor does it hold `threading` or `logging` unless a target's module
    imports them (the supervisor forks it before it imports logging, and
    nothing of bgpool's that workers need imports either): each registers a
    hook that every process forked from one that imported it runs, and on
    3.11 the two made each worker keep about 290 KiB more of its own
    (threading alone 210), on 3.13 about 210."""
    code = 1
    try:
        gc.disable()  # it only forks; and a collection must not catch what _keep_shared unfroze
        _set_apart(sock, "bgpool-seed", texts.process_title("seed", pool))
        _keep_shared()
        _fork_on_request(sock, 1, _generation)
        code = 0
    finally:
        os._exit(code)


def _generation(data: bytes, fds: list[int]) -> NoReturn:
    """In the seed's child: become the generation a request asks for."""
    serve(socket.socket(fileno=fds[0]), json.loads(data))


def serve(sock: socket.socket, request: dict[str, Any]) -> NoReturn:
    """Entry point of the generation `request` describes (its number, module
    search path, modules, scripts and module targets, the pool's label in
    process titles, and the interpreter's own module directories), a child
    of the supervisor (forked from the seed, or from the supervisor itself);
    never returns."""
    code = 1
    try:
        gc.disable()  # nothing of the supervisor's may be collected: its objects hold its fds
        number = request["number"]
        title = texts.process_title(f"generation {number}", request["pool"])
        _set_apart(sock, f"bgpool-gen{number}", title)
        runtime.line_buffered_output()  # for every worker it forks
        sys.path[:] = request["path"]
        _fresh_imports(request["installed"])
        failures = _load(sock, request["modules"], request["scripts"], request["targets"])
        for _ in range(WARM_UPS):
            _rehearse()
        _keep_shared()
        gc.enable()
        # _thread's count of the threads started (threading's are too):
        # nothing of bgpool's imports threading here (`seed` says why)
        loaded = {"t": "loaded", "failures": failures, "threads": _thread._count() + 1}
        sock.send(json.dumps(loaded).encode())
        spare_title = texts.process_title(f"spare {number}", request["pool"])
        _fork_on_request(sock, len(runtime.Boot.FDS), _worker, spare_title)
        code = 0
    finally:
        os._exit(code)


def _worker(data: bytes, fds: list[int]) -> NoReturn:
    """In the generation's child: become the worker a spawn request describes."""
    runtime.prepare_forked()
    _become(data, fds)


def _become(data: bytes, fds: list[int]) -> NoReturn:
    """Run the worker a spawn request describes, in a prepared child."""
    runtime.run_forked(runtime.Boot.from_request(data, fds))


def _made_up_request() -> bytes:
    """A spawn request with made-up values, to rehearse with (`_rehearse`)."""
    values: dict[str, Any] = {"str": "", "int": 0, "str | None": None, "int | None": None,
              "float | None": None, "list[str]": [],
              "dict[str, str]": {}, "float": 0.0}  # fmt: skip
    boot = {field.name: values[str(field.type)] for field in dataclasses.fields(runtime.Boot)}
    descriptors = dict.fromkeys(runtime.Boot.FDS, -1)  # as relayed output has them all
    return runtime.Boot(**{**boot, **descriptors}).request()[0]


MADE_UP_REQUEST = _made_up_request()


def _rehearse() -> None:
    """Take the first steps of every worker on made-up values: decode a spawn
    request, then `runtime.warm_up()`."""
    runtime.Boot.from_request(MADE_UP_REQUEST, [-1] * len(runtime.Boot.FDS))
    runtime.warm_up()


def _wait_for_request(sock: socket.socket, max_fds: int, title: str) -> NoReturn:
    """In a spare: take the spare's name (ps tells it from workers), prepare,
    rehearse the first steps of every worker once (so that what they cost the
    first time in a new process, the copy-on-write faults of what they write,
    is paid before the request; their code was specialised by the generation
    already), then become the worker its request describes."""
    platform.set_process_title(title)
    platform.set_process_name(b"bgpool-spare")  # after the title, which set the comm too
    runtime.prepare_forked()
    _rehearse()
    data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, max_fds)
    if not data:
        os._exit(0)
    sock.close()  # which tells the generation this spare is taken
    _become(data, fds)


def _fork_on_request(
    sock: socket.socket,
    max_fds: int,
    child: Callable[[bytes, list[int]], NoReturn],
    spare_title: str | None = None,
) -> None:
    """Fork one child per request (which runs `child` with the request and its
    descriptors), answering each with its pid, until the socket closes. With
    `spare_title` (their title in ps), keep up to `SPARES` **spares**: worker
    processes forked before they are asked for, as Android's zygote keeps
    unspecialised app processes, each prepared as far as it can be without
    its request (`runtime.prepare_forked`) and waiting on a socket of its own,
    whose other end is offered to the supervisor, which hands requests to it
    itself: a cold start or a crash restart then waits for no fork and no
    generation. A spare exits if that socket closes first (its generation was
    released). The loop is `platform.fork_server`, in C: whatever this process
    writes between forks stops being shared with the processes it forked."""
    spares = SPARES if spare_title is not None else 0
    forked = platform.fork_server(sock, max_fds, spares, SPARE_AFTER, MAX_PACKET)
    if forked is None:
        return  # the supervisor closed its end
    try:  # a child: never back into the caller, whose loop is the parent's
        sock.close()
        if isinstance(forked, int):
            _wait_for_request(socket.socket(fileno=forked), max_fds, spare_title or "")
        child(*forked)
    finally:
        os._exit(1)

"""A code generation's process: the targets' code, loaded once, forked from.

A generation is forked, as a child of the supervisor, from the **seed**: a
process the supervisor forks first thing, before it imports its own modules,
so that generations and workers carry only what workers need (see
`supervisor/generations.py` for why generations are processes). A generation
makes itself a clean parent for workers (signals as a new interpreter has
them, no descriptor but its socket, SIGKILL when the supervisor dies), imports
every module target afresh from disk and compiles every script target, says
what failed, then forks one worker per request it receives on its socket.

Workers are forked with `platform.fork_sibling()`, so each is the supervisor's
child, not this process's: the supervisor waits for, signals and reaps its
workers as if it had forked them itself, and this process never has to.

The socket is SOCK_SEQPACKET, one JSON message per packet. This process sends
``{"t": "loaded", "failures": {target: error}, "threads": n}`` once, then
answers each ``{"t": "spawn", "boot": {...}}`` (its pipe ends passed along as
SCM_RIGHTS, in the order of `Boot.FDS`) with ``{"t": "spawned", "pid": n}`` or
``{"t": "failed", "errno": n}``. It exits when the supervisor closes its end.
"""

from __future__ import annotations

import functools
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import sys
import sysconfig
import threading
from collections.abc import Callable
from dataclasses import replace
from types import CodeType
from typing import NoReturn

from .. import platform, texts
from . import runtime

MAX_PACKET = 1 << 20
"""The largest request: a Boot with its environment and sys.path."""


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


def _fresh_imports() -> None:
    """Look for modules on disk as a new interpreter would, with `_FreshSourceLoader`,
    in every directory but the interpreter's own (the standard library and
    installed packages, which nobody edits in place)."""
    loaders = [
        (_FreshSourceLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    ]
    sys.path_hooks.insert(0, importlib.machinery.FileFinder.path_hook(*loaders))
    paths = sysconfig.get_paths()
    installed = tuple({paths[k] + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    for directory in list(sys.path_importer_cache):
        if not (directory + os.sep).startswith(installed) and not directory.endswith(".zip"):
            del sys.path_importer_cache[directory]


def _load(modules: list[str], scripts: list[str]) -> dict[str, object]:
    """Import `modules` and compile `scripts` (into `runtime.COMPILED`); return
    what failed, by module name or script path, as diagnostics data."""
    failures: dict[str, object] = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # the workers that need it report it as a boot failure
            failures[module] = runtime.describe(exc)
    for path in scripts:
        try:
            runtime.COMPILED[path] = runtime.compile_script(path)
        except BaseException as exc:
            failures[path] = runtime.describe(exc)
    return failures


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


def seed(sock: socket.socket, pool: str) -> NoReturn:
    """Entry point of the seed of pool `pool` (its label in process titles),
    forked by the supervisor before it imports its own modules: each
    generation is forked from here (as a child of the supervisor), so a
    generation, and every worker, holds what workers need and not what the
    supervisor does. Never returns."""
    code = 1
    try:
        _set_apart(sock, "bgpool-seed", texts.process_title("seed", pool))
        gc.freeze()
        _fork_on_request(sock, 1, functools.partial(_generation, pool))
        code = 0
    finally:
        os._exit(code)


def _generation(pool: str, data: bytes, fds: list[int]) -> NoReturn:
    """In the seed's child: become the generation a request asks for."""
    request = json.loads(data)
    sock = socket.socket(fileno=fds[0])
    serve(sock, request["number"], request["modules"], request["scripts"], pool)


def serve(
    sock: socket.socket, number: int, modules: list[str], scripts: list[str], pool: str
) -> NoReturn:
    """Entry point of generation `number` of pool `pool`, a child of the
    supervisor (forked from the seed, or from the supervisor itself); never
    returns."""
    code = 1
    try:
        gc.disable()  # nothing of the supervisor's may be collected: its objects hold its fds
        _set_apart(sock, f"bgpool-gen{number}", texts.process_title(f"generation {number}", pool))
        _fresh_imports()
        failures = _load(modules, scripts)
        gc.freeze()  # what is loaded now is shared with every worker, untouched
        gc.enable()
        loaded = {"t": "loaded", "failures": failures, "threads": threading.active_count()}
        sock.send(json.dumps(loaded).encode())
        _fork_on_request(sock, len(runtime.Boot.FDS), _worker)
        code = 0
    finally:
        os._exit(code)


def _worker(data: bytes, fds: list[int]) -> NoReturn:
    """In the generation's child: become the worker a spawn request describes."""
    request = json.loads(data)
    given = dict(zip(request["fds"], fds, strict=True))
    runtime.run_forked(replace(runtime.Boot(**request["boot"]), **given))


def _fork_on_request(
    sock: socket.socket, max_fds: int, child: Callable[[bytes, list[int]], NoReturn]
) -> None:
    """Fork one child per request (which runs `child` with the request and its
    descriptors), answering each with its pid, until the socket closes."""
    while True:
        data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, max_fds)
        if not data:
            return
        # Fork first, decode in the child: whatever this process writes to
        # memory between forks stops being shared with the processes it forked.
        try:
            pid = platform.fork_sibling()
        except OSError as exc:
            reply = b'{"t": "failed", "errno": %d}' % (exc.errno or 0)
        else:
            if pid == 0:  # pragma: no cover - the child never returns
                try:
                    sock.close()
                    child(data, fds)
                finally:
                    os._exit(1)  # never back into this loop: it is the parent's
            reply = b'{"t": "spawned", "pid": %d}' % pid
        for fd in fds:
            os.close(fd)
        sock.send(reply)

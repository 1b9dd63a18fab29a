"""Code generations: the processes workers are forked from.

A worker must start as a fork of a process that has its code loaded (a cold
start then costs a fork, not an import), yet an edited module must run after a
restart. The supervisor itself therefore imports no user code. Each generation
is a child of the supervisor (`worker/zygote.py`) that imports every module
target afresh and compiles every script target once, then forks workers on
request; a new generation is loaded for `restart_workers()`, `reload()`, SIGHUP
or a watched change, while crash restarts keep forking from the generation an
instance was started with. A generation is closed once no instance uses it.

Why a process per generation, as multiprocessing's forkserver does, and not a
supervisor that re-executes itself: re-executing would have to hand over every
descriptor, timer, waiter and connection of a running supervisor and could not
keep the old code around for crash restarts of instances not yet replaced;
with one process per generation the supervisor keeps its state and old and new
code can serve side by side during a rolling restart. The generation forks its
workers with CLONE_PARENT, so they are the supervisor's children: waiting,
signalling, reaping and the parent-death signal work exactly as if the
supervisor had forked them, and no generation is ever between a worker and the
supervisor. The supervisor stays single-threaded; a generation too.

Generations are forked, with CLONE_PARENT too, from the **seed**: a process the
supervisor forks first thing, before it imports its own modules (psutil, its
loop, the table writer), so a generation and each worker it forks carry what
workers need and no more: their forks copy fewer page tables, and they share
more of their memory. The supervisor asks the seed for its first generation
at once, too, so the targets load while it imports its own modules.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import sysconfig
import time
from typing import Any

from .. import texts
from ..worker import zygote
from ..worker.runtime import Boot
from .registry import Decl

log = logging.getLogger("bgpool")

SPAWN_REPLY_SECONDS = 5.0
"""How long a generation may take to answer a spawn request (it forks at once)."""

SPAWN_WINDOW = 16
"""Spawn requests sent to a generation before the first answer is read."""

SLOW_IMPORT_SECONDS = 10.0
"""How long one import in a generation the supervisor waits for may take
before the supervisor says so in its log, and again each time as long
passes (it waits on: slow is not stuck)."""

EXIT_SECONDS = 1.0
"""How long a generation that hung up before it loaded is waited for, for its
exit status (it hangs up by exiting: a moment)."""


def module_path(root: str) -> list[str]:
    """The module search path of generations and spawned workers: the pool's
    `root` first, then the application's `sys.path` (the supervisor's), so a
    module target resolves the same from any current directory."""
    return [root, *(entry for entry in sys.path if entry != root)]


def _installed() -> list[str]:
    """The interpreter's own module directories (the standard library and
    installed packages, which nobody edits in place), for a generation to
    trust the bytecode cached there (`zygote._fresh_imports`; there, sysconfig
    would import threading, which a generation does not hold: `zygote.seed`)."""
    paths = sysconfig.get_paths()
    return sorted({paths[k] + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _readable(sock: socket.socket, timeout: float | None) -> bool:
    """Whether `sock` has something to read (or hung up) within `timeout`
    seconds (None: no limit); poll, not select, as a supervisor of many
    workers holds descriptors past select's 1,024."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def _pid(reply: dict[str, Any]) -> int:
    """The pid a fork request's answer gives (`zygote._fork_on_request`), or
    the OSError it reports."""
    if reply["t"] != "spawned":
        code = int(reply["errno"])
        raise OSError(code, os.strerror(code))
    return int(reply["pid"])


def _from_seed(seed: socket.socket, request: dict[str, Any], child: socket.socket) -> int:
    """Have the seed fork a generation that serves on `child`; its pid."""
    try:
        socket.send_fds(seed, [json.dumps(request).encode()], [child.fileno()])
        data = seed.recv(zygote.MAX_PACKET) if _readable(seed, SPAWN_REPLY_SECONDS) else b""
    except OSError as exc:
        raise OSError(exc.errno, f"the seed of code generations is gone: {exc}") from None
    if not data:
        raise OSError("the seed of code generations did not answer")
    return _pid(json.loads(data))


def _exit_status(pid: int) -> int | None:
    """The exit status of child `pid`, which is exiting (negative: killed by a
    signal); None if it was reaped already (the supervisor's reaper then says
    so: `Generation.reaped`) or is still there after `EXIT_SECONDS`."""
    deadline = time.monotonic() + EXIT_SECONDS
    while True:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if reaped:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)


class Generation:
    """One generation process, seen from the supervisor."""

    def __init__(
        self,
        number: int,
        decls: list[Decl],
        seed: socket.socket | None,
        path: list[str],
        pool: str,
        skipped: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Fork generation `number` (from `seed`, else from this process), which
        loads the code of `decls` with `path` as its module search path (`pool`:
        the pool's label in process titles), but for the modules in `skipped`,
        whose import ended the process of an earlier attempt (why, as
        diagnostics data: each becomes one of its `failures`)."""
        self.skipped = skipped or {}
        targets = sorted({d.target for d in decls if d.script is None})
        request = {
            "number": number,
            "path": path,
            "pool": pool,
            "modules": sorted({t.partition(":")[0] for t in targets} - self.skipped.keys()),
            "scripts": sorted({d.script for d in decls if d.script is not None}),
            "targets": targets,
            "installed": _installed(),
        }
        self.number = number
        self.started = time.monotonic()
        self.loaded = False
        self.importing: str | None = None  # the module it said it imports now
        self.death = ""  # why it exited before it loaded, once it has
        self.status: int | None = None  # its exit status, if the reaper took it (`reaped`)
        self.failures: dict[str, dict[str, Any]] = {}
        self.spares: collections.deque[tuple[int, socket.socket]] = collections.deque()
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = _from_seed(seed, request, child) if seed is not None else os.fork()
        except OSError:
            self.sock.close()
            child.close()
            raise
        if self.pid == 0:  # pragma: no cover - the child never returns
            self.sock.close()
            zygote.serve(child, request)
        child.close()

    def fileno(self) -> int:
        """The socket to the generation: readable as it loads (`take_load`)."""
        return self.sock.fileno()

    @property
    def alive(self) -> bool:
        """Whether it can still fork workers (not closed, not dead)."""
        return self.sock.fileno() >= 0

    def reaped(self, status: int) -> None:
        """The supervisor's reaper, which collects every exited child, took
        this process's exit `status` (negative: killed by a signal): kept for
        `take_load`, which would otherwise find none to say why it died."""
        self.status = status

    def take_load(self) -> bool | None:
        """Read what the loading generation said, once its socket is readable:
        True once it has loaded, False if it died first (it is closed then;
        `death` says why, and `importing` names the module whose import it
        died in, if it did), None while it imports."""
        while True:
            try:
                data = self.sock.recv(zygote.MAX_PACKET)
            except OSError:
                data = b""
            if not data:
                status = self.status if self.status is not None else _exit_status(self.pid)
                self.death = texts.generation_died(status, self.importing)
                log.error("code generation %d: %s", self.number, self.death)
                self.close()
                return False
            report = json.loads(data)
            if report["t"] != "importing":
                break
            self.importing = report["module"]
            if not _readable(self.sock, 0):
                return None
        self.importing = None
        self.failures = {**self.skipped, **report["failures"]}
        self.loaded = True
        took = (time.monotonic() - self.started) * 1000
        log.info("code generation %d loaded in %.1f ms (pid %d)", self.number, took, self.pid)
        if self.skipped:
            log.warning(
                "code generation %d loaded without %s, whose import ended an earlier one's "
                "process: the workers that need it import it themselves",
                self.number,
                ", ".join(sorted(self.skipped)),
            )
        if report["threads"] > 1:
            log.warning(
                "importing the targets started %d thread(s) in code generation %d: "
                "forking workers from it may deadlock",
                report["threads"] - 1,
                self.number,
            )
        return True

    def wait_loaded(self) -> bool:
        """Block until the generation has loaded (True) or died (False). An
        import that takes longer than `SLOW_IMPORT_SECONDS` is logged with its
        module's name: one that never returns would otherwise hold up the
        supervisor without a word."""
        while True:
            since = time.monotonic()
            while not _readable(self.sock, SLOW_IMPORT_SECONDS):
                doing = f"importing {self.importing}" if self.importing else "starting"
                log.warning(
                    "code generation %d has been %s for %.0f s (the supervisor waits for it; "
                    "a module whose import does not return holds up the pool)",
                    self.number,
                    doing,
                    time.monotonic() - since,
                )
            if (loaded := self.take_load()) is not None:
                return loaded

    def without_culprit(self) -> dict[str, dict[str, Any]] | None:
        """For a generation that died importing a module: the `skipped` of the
        next attempt at its code (its own, and that module, with why); None
        if it died in no import, where a next attempt would die as well."""
        from .instances import policy_error  # here: this module is loaded before the seed forks

        if self.importing is None:
            return None
        why = policy_error("ImportError", f"code generation {self.number}: {self.death}")
        return {**self.skipped, self.importing: why}

    def failure(self, decl: Decl) -> dict[str, Any] | None:
        """Why this generation cannot run `decl`'s target (its module failed to
        import, its script to compile, or `missing()`), as diagnostics data;
        None if it can."""
        if decl.script is not None:
            return self.failures.get(decl.script)
        return self.failures.get(decl.target.partition(":")[0]) or self.missing(decl)

    def missing(self, decl: Decl) -> dict[str, Any] | None:
        """Why `decl`'s module target cannot run although its module imported:
        its function does not exist (with a did-you-mean) or is not callable.
        A declaration error, which no retry can mend. (A module that failed
        to import is not one: what it failed on, a file or a service, may be
        there at the next attempt, so it is left to the boot failures.)"""
        return self.failures.get(decl.target) if decl.script is None else None

    def spawn_many(self, boots: list[Boot]) -> list[int | OSError]:
        """Start the workers `boots` describe: each one's pid (a child of the
        supervisor), or why it could not be made. Each request goes straight
        to a spare the generation offered, if one is left (its pid is known at
        once, and the generation is not in the way); the others have the
        generation fork, up to `SPAWN_WINDOW` requests in flight at once, so
        it forks the next worker while the supervisor reads the answer for
        the last."""
        if not self.alive:  # it died before it loaded (`take_load`)
            return [OSError(f"code generation {self.number}: {self.death}")] * len(boots)
        results: list[int | OSError | None] = [None] * len(boots)
        asked: collections.deque[int] = collections.deque()  # waiting for the generation's answer
        try:
            if self._receive(0) is not None:
                raise OSError(errno.EPROTO, "it answered a request it was not sent")
            for index, boot in enumerate(boots):
                data, fds = boot.request()
                results[index] = self._to_spare(data, fds)
                if results[index] is None:
                    socket.send_fds(self.sock, [data], fds)
                    asked.append(index)
                if len(asked) >= SPAWN_WINDOW:
                    results[asked.popleft()] = self._answer()
            while asked:
                results[asked.popleft()] = self._answer()
        except OSError as exc:
            self.close()
            gone = OSError(exc.errno, f"code generation {self.number} is gone: {exc.strerror}")
            results = [gone if result is None else result for result in results]
        return [result for result in results if result is not None]

    def _to_spare(self, data: bytes, fds: list[int]) -> int | None:
        """Hand a spawn request to the oldest spare on offer: its pid, or None
        if none is left (one killed by someone is passed over)."""
        while self.spares:
            pid, sock = self.spares.popleft()
            with sock:
                try:
                    socket.send_fds(sock, [data], fds)
                except OSError:
                    continue
            return pid
        return None

    def _answer(self) -> int | OSError:
        """The next spawn request's answer: a pid, or the error the generation
        met (OSError raised if it is gone or silent)."""
        reply = self._receive(SPAWN_REPLY_SECONDS)
        if reply is None:
            raise OSError(errno.EPIPE, "it did not answer a spawn request")
        try:
            return _pid(reply)
        except OSError as exc:
            return exc

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        """The generation's next answer, if one comes within `timeout` seconds;
        the spares it offers meanwhile are kept for the next requests.
        OSError if it is gone."""
        while _readable(self.sock, timeout):
            data, fds, _, _ = socket.recv_fds(self.sock, zygote.MAX_PACKET, 1)
            if not data:
                raise OSError(errno.EPIPE, "it exited")
            reply = json.loads(data)
            if reply["t"] != "spare":
                return dict(reply)
            pid = int(reply["pid"])
            if fds:
                self.spares.append((pid, socket.socket(fileno=fds[0])))
            else:  # its socket was not passed: this process is out of descriptors
                log.warning("spare %d of code generation %d dropped: out of descriptors for "
                            "its socket", pid, self.number)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):  # (our child: not reaped yet)
                    os.kill(pid, signal.SIGKILL)
        return None

    def close(self) -> None:
        """Let the generation go: it exits once its socket closes (the
        supervisor reaps it with its other children)."""
        if self.alive:
            log.info("code generation %d released", self.number)
            self.sock.close()
            for _, sock in self.spares:  # each spare exits once it sees its socket close
                sock.close()
            self.spares.clear()

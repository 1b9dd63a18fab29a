"""The one support module of bgpool's test suite (tests/ is on ``sys.path``: import it as
``helpers``). conftest.py holds only fixtures, built from what is here.

Tests observe bgpool from outside: its public API, the control protocol as it is on
the wire (a 4-byte big-endian length, then a UTF-8 JSON object; its ``hello`` answer
names the pool's table and supervisor), psutil and /proc. Nothing here reads a private
attribute of bgpool.

Sections: waiting and timing; declarations and what a pool reports; the files the
fixture workers write; processes and descriptors; subprocesses (Python, ``bgpool
run``); HTTP; the control protocol; what a pool owns on the machine; threads; closed pools;
the leak check.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import functools
import inspect
import itertools
import json
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pyte
import pytest

import bgpool

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SHM = Path("/dev/shm")
SEGMENT_RE = re.compile(r"^bgp_[0-9a-f]{16}(_v\d+)?$")
"""A pool's segments: its table ``bgp_<16 hex>`` and its vars ``<table>_v<slot>``."""
TENANT = "fixtures.workers:tenant"
"""The target that knows which name, scope and instance it hosts."""
TOKEN_VAR = "BGPOOL_TEST_TOKEN"
"""Set to a fresh value for each test (conftest's ``no_leaks``); every process the
test starts inherits it, wherever it is reparented to."""

T = TypeVar("T")

# ------------------------------------------------------------------ waiting, timing


def wait_for(predicate: Callable[[], T | None], timeout: float = 5.0, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail at
    the deadline.

    A test-side observation loop with a deadline, not a synchronisation sleep: it
    returns as soon as the condition holds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate.__name__}"
            )
        time.sleep(0.01)


def since(t0: float) -> float:
    """Seconds elapsed since the ``time.monotonic()`` reading ``t0``."""
    return time.monotonic() - t0


# -------------------------------------------------- declarations, what a pool reports


def spec(name: str | None, worker: str, **kwargs: Any) -> bgpool.WorkerSpec:
    """A declaration whose target is ``fixtures.workers:<worker>``."""
    return bgpool.WorkerSpec(name=name, target=f"fixtures.workers:{worker}", **kwargs)


PAGE_WORKERS = FIXTURES / "page_workers.py"


def page_pool_workers(fail_flag: Path) -> list[bgpool.WorkerSpec]:
    """The status page's pool (``fixtures/page_workers.py``): ``mailer`` (two
    instances), ``thumbnailer`` (SIGUSR1 crashes it), ``feeds`` (publishes vars
    three times), ``importer`` (lazy; fails at boot while ``fail_flag``
    exists), ``reports``, and ``search-index`` in the scope labelled ``api``."""

    def page_spec(name: str, target: str, **kwargs: Any) -> bgpool.WorkerSpec:
        return bgpool.WorkerSpec(name=name, target=f"fixtures.page_workers:{target}", **kwargs)

    return [
        page_spec("mailer", "mailer", num=2),
        page_spec("thumbnailer", "thumbnailer", num=1),
        page_spec("feeds", "feeds", num=1),
        page_spec("importer", "importer", max_consecutive_failures=-1,
                  env={"FAIL_FLAG": str(fail_flag)}),
        page_spec("reports", "mailer", num=1),
        page_spec("search-index", "mailer", num=1, scope=bgpool.next_scope("api")),
    ]  # fmt: skip


def state(value: Any) -> str:
    """The state name, whether the model stores a ``str`` or a ``str``-valued Enum."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def statuses(pool: Any, name: str) -> list[Any]:
    return [s for s in pool.status() if s.name == name]


def the_status(pool: Any, name: str) -> Any:
    found = statuses(pool, name)
    assert len(found) == 1, f"expected one instance of {name!r}, got {found!r}"
    return found[0]


def vars_or_none(pool: Any, name: str, **kwargs: Any) -> Any:
    """``pool.get_vars(name)``, or None while nothing is published."""
    try:
        return pool.get_vars(name, **kwargs)
    except bgpool.VarsNotPublished:
        return None


def published(pool: Any, name: str, timeout: float = 10.0, **kwargs: Any) -> Any:
    """The vars ``name`` publishes, once it has published any."""
    return wait_for(
        functools.partial(vars_or_none, pool, name, **kwargs), timeout, f"{name} to publish"
    )


def source_line(func: Callable[..., Any], marker: str) -> int:
    """Line number (in its file) of the line of ``func`` containing ``marker``."""
    lines, first = inspect.getsourcelines(func)
    for offset, line in enumerate(lines):
        if marker in line:
            return first + offset
    raise AssertionError(f"{marker!r} not found in {func.__name__}")


def file_line(path: Path, marker: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if marker in line:
            return number
    raise AssertionError(f"{marker!r} not found in {path}")


# ------------------------------------------------- files the fixture workers write


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def read_json(path: Path) -> Any:
    text = read_text(path)
    return None if text is None else json.loads(text)


def starts(path: Path) -> list[tuple[int, float]]:
    """The ``"<pid> <monotonic>"`` lines written by the fixtures' ``$STARTS``."""
    out = []
    for line in (read_text(path) or "").splitlines():
        if line.strip():
            pid, ts = line.split()
            out.append((int(pid), float(ts)))
    return out


def tenant_log(path: Path) -> list[tuple[int, str, str, int, float]]:
    """The ``(pid, name, scope_label, instance, monotonic)`` lines written by the
    ``tenant`` fixture's ``$LOG`` and ``$EOF_LOG``."""
    out = []
    for line in (read_text(path) or "").splitlines():
        if line.strip():
            pid, name, scope, instance, ts = line.split("\t")
            out.append((int(pid), name, scope, int(instance), float(ts)))
    return out


def names_in_log(log: Path) -> list[str]:
    """The names of the ``tenant`` attempts logged in ``log``, in order."""
    return [name for _, name, _, _, _ in tenant_log(log)]


def tenant_report(report_dir: Path, name: str, scope: str = "", instance: int = 0) -> Any:
    """The JSON report the ``tenant`` fixture writes under ``$REPORT_DIR``, or None."""
    return read_json(report_dir / f"{scope}~{name}~{instance}.json")


def failing(sentinel_dir: Path, *names: str) -> Path:
    """A ``$FAIL_DIR`` for ``tenant``: each of ``names`` crashes at boot while its
    flag file is there (remove ``<dir>/<name>`` to let it boot)."""
    directory = sentinel_dir / "fail"
    directory.mkdir(exist_ok=True)
    for name in names:
        (directory / name).touch()
    return directory


def notes(directory: Path, prefix: str) -> list[int]:
    """Pids noted by fixtures.hostile (``<prefix>.<pid>`` files in ``$NOTES``)."""
    return sorted(int(p.name.rsplit(".", 1)[1]) for p in directory.glob(f"{prefix}.*"))


# -------------------------------------------------------- processes, descriptors


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie awaiting its reaper)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def alive(pid: int) -> bool:
    return not gone(pid)


def live(pids: Iterable[int]) -> list[int]:
    return [p for p in pids if not gone(p)]


def describe(procs: Iterable[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} (ppid {p.ppid()}, {p.status()}): {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return "; ".join(out) or "none"


def stuck(pid: int) -> str:
    """Why process ``pid`` may not have ended, for a failure message: its state,
    signal masks (SigBlk/SigIgn/SigCgt/SigPnd/ShdPnd, hex, bit N-1 for signal N),
    what each of its threads waits in, and its children."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return f"{pid}: gone"
    keep = ("State", "Sig", "ShdPnd", "Threads")
    out = [" ".join(line.split()) for line in status if line.startswith(keep)]
    for task in sorted(os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(OSError):
            wchan = Path(f"/proc/{pid}/task/{task}/wchan").read_text()
            syscall = Path(f"/proc/{pid}/task/{task}/syscall").read_text().split()[:1]
            out.append(f"task {task}: {wchan or '-'} (syscall {' '.join(syscall)})")
    with contextlib.suppress(psutil.Error):
        out.append(f"children: {describe(psutil.Process(pid).children(recursive=True))}")
    return f"{pid}: " + "; ".join(out)


def wait_all_gone(pids: Iterable[int], timeout: float, what: str) -> float:
    """Wait until every pid is gone (absent or a zombie); return the time it took."""
    pids = list(pids)
    t0 = time.monotonic()
    try:
        wait_for(lambda: not live(pids), timeout=timeout, what=what)
    except AssertionError:
        left = [psutil.Process(p) for p in live(pids)]
        raise AssertionError(f"{what}: still running after {timeout}s: {describe(left)}") from None
    return since(t0)


def kill_all(procs: Iterable[psutil.Process]) -> None:
    """Failure-path cleanup: SIGKILL each process, and reap those that are ours."""
    procs = list(procs)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    for proc in procs:
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if proc.ppid() == os.getpid():
                os.waitpid(proc.pid, 0)


def processes_with_env(var: str, value: str) -> list[psutil.Process]:
    """Live (non-zombie) processes other than this one whose ``/proc/<pid>/environ``
    holds ``var=value``, wherever they were reparented to."""
    marker = f"\0{var}={value}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in b"\0" + f.read() + b"\0":
                    continue
            proc = psutil.Process(int(entry))
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def procs_with_address(address: str) -> list[psutil.Process]:
    """Every live process that inherited ``BGPOOL_ADDRESS=<address>``: the pool's
    supervisor, workers and what they started (and the application's own
    subprocesses started after ``start()``)."""
    return processes_with_env("BGPOOL_ADDRESS", address)


def supervisor_of(worker_pid: int) -> psutil.Process:
    """The supervisor: the worker's parent, itself a child of the test process."""
    sup = psutil.Process(worker_pid).parent()
    assert sup is not None
    assert sup.ppid() == os.getpid(), "the supervisor must be a child of the application"
    return sup


def supervisor_pid(pool: Any) -> int:
    """The running pool's supervisor pid (from its ``hello`` answer)."""
    return int(raw_request(pool.address, {"op": "hello"})["pid"])


def tree_pids() -> list[int]:
    """This process and all its descendants."""
    me = psutil.Process()
    return [me.pid] + [p.pid for p in me.children(recursive=True)]


NOT_WORKERS = ("bgpool-gen", "bgpool-seed", "bgpool-spare",
               "bgpool: generat", "bgpool: seed", "bgpool: spare")  # fmt: skip
"""The comms of a pool's processes that are not workers: a code generation
(a child of the supervisor that workers are forked from, bgpool-gen<N>), the
seed generations are forked from (bgpool-seed), a generation's spare not yet a
worker (bgpool-spare), and each of them for the moment between its title,
which sets the comm to the title's first 15 bytes, and its name."""


def is_generation(proc: psutil.Process) -> bool:
    """Whether `proc` is a code generation, the seed or a spare (`NOT_WORKERS`)."""
    with contextlib.suppress(psutil.Error):
        return proc.name().startswith(NOT_WORKERS)
    return False


def worker_children(pid: int) -> list[psutil.Process]:
    """The supervisor `pid`'s children that are workers (not its generations).
    A child just forked still has the supervisor's name until it names itself
    (a seed, a generation or a spare on its way up): waited out, so it is not
    taken for a worker."""
    supervisor = psutil.Process(pid)
    own = supervisor.name()

    def named(child: psutil.Process) -> Callable[[], bool]:
        def check() -> bool:
            with contextlib.suppress(psutil.Error):
                return child.name() != own
            return True  # gone: nothing to wait for

        return check

    children = supervisor.children()
    for child in children:
        wait_for(named(child), timeout=5, what=f"{child.pid} to name itself")
    return [c for c in children if not is_generation(c)]


def worker_pids() -> set[int]:
    """Pids of every worker: the children of the supervisor(s) this process
    started, but their code generations."""
    return {w.pid for sup in psutil.Process().children() for w in worker_children(sup.pid)}


def zombie_children(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children() if c.status() == psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def live_children(pid: int) -> set[int]:
    out = set()
    with contextlib.suppress(psutil.Error):
        for c in worker_children(pid):
            with contextlib.suppress(psutil.Error):
                if c.status() != psutil.STATUS_ZOMBIE:
                    out.add(c.pid)
    return out


def fd_links(pid: int | str = "self") -> dict[int, str]:
    """``fd -> what it points to`` for the open descriptors of ``pid``."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listdir's own fd)
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    """This process's OS threads (tasks), not only the ones ``threading`` knows."""
    return len(os.listdir("/proc/self/task"))


def pipe_holders(inode: int, pids: list[int]) -> list[int]:
    """Which of ``pids`` hold an fd on the pipe ``inode``."""
    link = f"pipe:[{inode}]"
    holders = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            if link in fd_links(pid).values():
                holders.append(pid)
    return holders


def unix_socket_inodes(path: str) -> set[int]:
    """Inodes of the AF_UNIX sockets bound to ``path`` (from /proc/net/unix)."""
    inodes = set()
    with open("/proc/net/unix", encoding="ascii", errors="replace") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == path:
                inodes.add(int(parts[6]))
    return inodes


# ------------------------------------------------------------------- subprocesses


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test
    starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment plus PYTHONPATH so a child can import bgpool/fixtures."""
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) if not pp else f"{ROOT}{os.pathsep}{pp}"
    env.update(extra)
    return env


def run_python(
    code: str,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    flags: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (``python FLAGS -c CODE``, cwd = project
    root), its output captured."""
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=ROOT,
        env=subprocess_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def last_json_line(stdout: str) -> Any:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


class BgpoolRun:
    """``python -m bgpool run CONFIG ARGS...`` in a subprocess (cwd = ``cwd``, the
    project root unless given, ``$BGPOOL_TEST_DIR`` = ``directory``, no inherited
    ``BGPOOL_ADDRESS``), its stdout
    collected as it comes through a pipe, or a pty with ``tty=True``, its stderr in a
    file. ``unbuffered`` sets (True) or removes (False) ``PYTHONUNBUFFERED``; None
    leaves it as inherited. With ``tty=True``: ``size`` is the terminal's
    ``(columns, rows)`` (``COLUMNS`` and ``LINES`` are removed from the environment,
    and ``TERM`` is ``xterm``), and ``stderr_tty=True`` sends stderr to the terminal
    too. ``env`` adds variables. ``close()`` (always call it) kills what is left."""

    _serial = itertools.count()

    def __init__(
        self,
        config: str,
        directory: Path,
        *args: str,
        tty: bool = False,
        unbuffered: bool | None = None,
        cwd: Path = ROOT,
        size: tuple[int, int] = (80, 24),
        stderr_tty: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        extra = env or {}
        env = subprocess_env(BGPOOL_TEST_DIR=str(directory))
        env.pop("BGPOOL_ADDRESS", None)
        if unbuffered is not None:
            env.pop("PYTHONUNBUFFERED", None)
            if unbuffered:
                env["PYTHONUNBUFFERED"] = "1"
        if tty:
            for name in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR"):
                env.pop(name, None)
            env["TERM"] = "xterm"
        env.update(extra)
        self.size = size
        self.stderr_path = directory / f"bgpool-run-{next(self._serial)}.stderr"
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._master: int | None = None
        stdout: int = subprocess.PIPE
        if tty:
            self._master, stdout = pty.openpty()
            columns, rows = size
            fcntl.ioctl(stdout, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        try:
            with open(self.stderr_path, "wb") as stderr:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "bgpool", "run", config, *args],
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stdout if stderr_tty else stderr,
                )
        finally:
            if tty:
                os.close(stdout)
        if self._master is not None:
            fd = self._master
        else:
            assert self.proc.stdout is not None
            fd = self.proc.stdout.fileno()
        self._reader = threading.Thread(target=self._read, args=(fd,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the pty's other side is closed
                chunk = b""
            if not chunk:
                return
            with self._lock:
                self._buf.extend(chunk)

    def raw(self) -> bytes:
        """Everything written to stdout so far, as it was written."""
        with self._lock:
            return bytes(self._buf)

    def screen(self) -> list[str]:
        """What a person sees on the terminal (``tty=True``) now: ``raw()`` played
        on a terminal emulator of ``size``, a string per row, right-stripped."""
        columns, rows = self.size
        emulator = pyte.Screen(columns, rows)
        pyte.ByteStream(emulator).feed(self.raw())
        return [row.rstrip() for row in emulator.display]

    def text(self) -> str:
        """Everything written to stdout so far (a pty's CR LF as LF)."""
        with self._lock:
            return self._buf.decode(errors="replace").replace("\r\n", "\n")

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def wait_line(self, *words: str, after: int = 0, timeout: float = 15.0) -> str:
        """The first stdout line from line ``after`` on that has all ``words``."""

        def find() -> str | None:
            return next((x for x in self.lines()[after:] if all(w in x for w in words)), None)

        try:
            return wait_for(find, timeout=timeout, what=f"a line with {words}")
        except AssertionError:
            raise AssertionError(
                f"no line with {words} in {self.text()!r}; stderr {self.stderr()!r}"
            ) from None

    def address(self) -> str:
        """The pool's address, from the line that shows ``BGPOOL_ADDRESS=...``."""
        line = self.wait_line("BGPOOL_ADDRESS=")
        match = re.search(r"BGPOOL_ADDRESS=(\S+?)(?:,|\s|$)", line)
        assert match, line
        return match.group(1)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = 15.0) -> int:
        """Its exit status, once it has exited and its output is all read."""
        status = self.proc.wait(timeout)
        self._reader.join(timeout)
        return status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:  # failure path: the whole tree goes
            with contextlib.suppress(psutil.Error):
                kill_all([*psutil.Process(self.proc.pid).children(recursive=True)])
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        if self._master is not None:
            os.close(self._master)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


StartRun = Callable[..., BgpoolRun]
"""Starts a ``bgpool run CONFIG ARGS...`` (conftest's ``bgpool_run`` fixture)."""


# ------------------------------------------------------- HTTP (the metrics port)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


def http_fetch(
    port: int, path: str, headers: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> tuple[int, Message, bytes]:
    """``(status, response headers, raw body)`` of a GET over real HTTP, sent with
    ``headers`` (urllib itself asks for ``Accept-Encoding: identity``)."""
    request = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers or {})
    try:
        with _OPENER.open(request, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.headers, exc.read()
        finally:
            exc.close()


def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str, str]:
    """``(status, content type, body)`` of a GET over real HTTP."""
    status, headers, body = http_fetch(port, path, host=host)
    return status, headers.get("Content-Type", ""), body.decode()


# ------------------------------------------------------------- control protocol


def frame(message: Any) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def raw_connect(address: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def read_until_closed(
    sock: socket.socket, timeout: float, stop_on_reply: bool = False
) -> tuple[bytes, bool]:
    """Read until the peer closes or ``timeout`` passes (or, with ``stop_on_reply``,
    a whole reply frame arrived): (bytes read, closed?)."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(data), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return bytes(data), False
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk
        if stop_on_reply and len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
            return bytes(data), False


def _recv_exactly(sock: socket.socket, n: int, what: str) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, what
        data += chunk
    return data


def raw_request(address: str, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One well-formed request on a fresh connection; the decoded reply."""
    with raw_connect(address, timeout) as sock:
        sock.sendall(frame(message))
        header = _recv_exactly(sock, 4, "the supervisor closed the connection without a reply")
        body = _recv_exactly(sock, struct.unpack(">I", header)[0], "truncated reply")
    reply: dict[str, Any] = json.loads(body)
    return reply


class Evil:
    """Unpickling this creates the file ``path``: proof that bytes were unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


# -------------------------------------------------------- what a pool owns


def segment_root(name: str) -> str | None:
    """The table a segment belongs to (itself for a table), or None for a name that
    is not a pool segment's."""
    match = SEGMENT_RE.match(name)
    return name[: len("bgp_") + 16] if match else None


def pool_segments(table: str) -> set[str]:
    """The segments in /dev/shm of the pool whose table is ``table``."""
    return {n for n in os.listdir(SHM) if segment_root(n) == table}


def segments_held_by(pids: Iterable[int]) -> set[str]:
    """The ``bgp_*`` segments that the processes ``pids`` have mapped or open."""
    names: set[str] = set()
    for pid in pids:
        with (
            contextlib.suppress(OSError),
            open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f,
        ):
            for line in f:
                if "/dev/shm/bgp_" in line:
                    names.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        with contextlib.suppress(OSError):
            for link in fd_links(pid).values():
                if link.startswith("/dev/shm/bgp_"):
                    names.add(link[len("/dev/shm/") :].split()[0])
    return names


@dataclass
class Resources:
    """What a running pool owns on the machine: socket, directory, segments."""

    address: str
    directory: Path
    table: str
    supervisor: int
    segments: set[str] = field(default_factory=set)

    def refresh_segments(self) -> set[str]:
        self.segments |= pool_segments(self.table)
        return self.segments

    def left_behind(self) -> list[str]:
        """What still exists of the pool's resources (empty when all is clean)."""
        self.refresh_segments()
        out = [f"/dev/shm/{s}" for s in sorted(self.segments) if (SHM / s).exists()]
        if os.path.exists(self.address):
            out.append(self.address)
        if self.directory.exists():
            out.append(str(self.directory))
        return out


def resources(pool: Any) -> Resources:
    """The running pool's resources (table name and supervisor from ``hello``);
    ``pool`` is a Pool or client, or the address of a pool another process owns."""
    address = pool if isinstance(pool, str) else pool.address
    hello = raw_request(address, {"op": "hello"})
    assert hello["ok"] is True, hello
    res = Resources(
        address=address,
        directory=Path(address).parent,
        table=str(hello["table"]),
        supervisor=int(hello["pid"]),
    )
    res.refresh_segments()
    assert res.table in res.segments, f"table {res.table} not in /dev/shm"
    return res


def assert_clean(res: Resources) -> None:
    left = res.left_behind()
    assert not left, f"resources left behind: {left}"
    procs = procs_with_address(res.address)
    assert not procs, f"processes of the pool still running: {describe(procs)}"


@contextlib.contextmanager
def reaping(address_of: Callable[[], str | None]) -> Iterator[None]:
    """On failure, SIGKILL whatever still carries the pool's address before the
    error propagates, so one failing case does not spill into the next."""
    try:
        yield
    except BaseException:
        address = address_of()
        if address:
            kill_all(procs_with_address(address))
        raise


# ------------------------------------------------------------------- threads


class Background:
    """Run ``fn`` in a thread; ``error`` is what it raised, ``value`` what it returned."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started_at = time.monotonic()
        self.ended_at = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.value = self._fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.done.set()

    @property
    def took(self) -> float:
        return self.ended_at - self.started_at

    def wait(self, timeout: float, what: str) -> None:
        assert self.done.wait(timeout), f"{what} still blocked after {timeout}s"
        self.thread.join()


def run_together(calls: Sequence[Callable[[], object]], timeout: float) -> list[BaseException]:
    """Run each call in its own thread, all released at once by a barrier; wait up
    to ``timeout`` for them all. Returns what they raised (empty when none did)."""
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.0))
    assert not any(t.is_alive() for t in threads), f"calls still running after {timeout}s"
    return errors


def time_while_stopped(
    call: Callable[[], object], supervisor: int, sigcont_on_exit: list[int]
) -> float:
    """SIGSTOP the supervisor, run ``call`` in a thread, SIGCONT once it returned (or
    after 5 s), and return how long it took: a call that needed an answer from the
    supervisor would have waited for its deadline. Re-raises what ``call`` raised."""
    sigcont_on_exit.append(supervisor)
    os.kill(supervisor, signal.SIGSTOP)
    sup = psutil.Process(supervisor)
    wait_for(lambda: sup.status() == psutil.STATUS_STOPPED, what="supervisor stopped")
    call_ = Background(call)
    call_.done.wait(5)
    os.kill(supervisor, signal.SIGCONT)
    call_.wait(5, "the call")
    if call_.error is not None:
        raise call_.error
    return call_.took


# ---------------------------------------------------------------- closed pools


def closed_calls(pool: Any, ready_name: str, lazy_name: str) -> dict[str, Callable[[], Any]]:
    """Every public call of a Pool that must raise ``PoolClosed`` once it is closed."""
    return {
        "ensure(ready)": lambda: pool.ensure(ready_name),
        "ensure(lazy)": lambda: pool.ensure(lazy_name, timeout=1),
        "ensure(batch)": lambda: pool.ensure([ready_name, lazy_name], timeout=1),
        "status()": pool.status,
        "diagnostics()": lambda: pool.diagnostics(ready_name),
        "restart_workers()": pool.restart_workers,
        "get_vars()": lambda: pool.get_vars(ready_name),
        "stop()": lambda: pool.stop(ready_name),
        "start_workers()": lambda: pool.start_workers(lazy_name),
        "scale()": lambda: pool.scale(ready_name, 2),
    }


def assert_pool_closed(pool: Any, ready_name: str, lazy_name: str, text: str) -> None:
    for what, call in closed_calls(pool, ready_name, lazy_name).items():
        with pytest.raises(bgpool.PoolClosed) as info:
            call()
        assert str(info.value) == text, f"{what}: {info.value!r}"


def raises_closed(pool: Any) -> bool:
    try:
        pool.status()
    except bgpool.PoolClosed:
        return True
    return False


# ------------------------------------------------------------------- leak check

REAP_DEADLINE = 3.0
"""Seconds a test's processes get to exit after it, before they count as leaked."""
UNLINK_DEADLINE = 1.0
"""Seconds a test's segments get to be unlinked after it (a supervisor on its way out)."""


def socket_dirs() -> set[str]:
    """The ``bgpool-*`` socket directories in the temp dir (private to the session)."""
    tmp = Path(tempfile.gettempdir())
    return {p.name for p in tmp.iterdir() if p.name.startswith("bgpool-")}


@dataclass
class Leaks:
    """What a test left behind (see ``LeakCheck``)."""

    children: list[psutil.Process] = field(default_factory=list)
    orphans: list[psutil.Process] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    fds: dict[int, str] = field(default_factory=dict)
    fd_counts: tuple[int, int] = (0, 0)

    def report(self) -> list[str]:
        """One line per kind of leak (empty when nothing leaked)."""
        out = []
        if self.children:
            out.append(f"child processes left behind: {describe(self.children)}")
        if self.orphans:
            out.append(
                "processes started by the test still running elsewhere (orphans): "
                + describe(self.orphans)
            )
        if self.segments:
            out.append(f"shared-memory segments left behind: {self.segments}")
        if self.dirs:
            out.append(f"socket directories left behind: {self.dirs}")
        if self.fds:
            before, after = self.fd_counts
            out.append(
                f"file descriptors left open: {before} before, {after} after; "
                f"new or changed: {self.fds}"
            )
        return out

    def clean_up(self) -> None:
        """Remove what leaked (all of it the test's own), so the next test starts clean."""
        kill_all(self.children + self.orphans)
        for name in self.segments:
            with contextlib.suppress(FileNotFoundError):
                (SHM / name).unlink()
        for name in self.dirs:
            shutil.rmtree(Path(tempfile.gettempdir()) / name, ignore_errors=True)


class LeakCheck:
    """What one test leaves behind, counting only what the test itself created, so
    that another run on the same machine (a second copy of the suite, a demo) is
    never blamed, nor its segments removed:

    - processes: this process's children, and anywhere else the processes that
      inherited this test's ``$BGPOOL_TEST_TOKEN`` (``token``);
    - shared memory: the segments of the pools this test started (``track()``:
      the table ``hello`` names and its vars segments ``<table>_v<N>``), and those
      that a process of this test which outlived it still maps or holds open;
      ``/dev/shm`` as a whole is shared with the machine, so no listing of it counts;
    - socket directories: new ``bgpool-*`` directories in the temp dir, which the
      session makes private (``$TMPDIR``) for itself and every process it starts;
    - descriptors: this process's own, more than before.

    Make it before the test; ``find()`` after it.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.tables: set[str] = set()
        self._dirs = socket_dirs()
        self._fds = fd_links()

    def track(self, pool: Any) -> Resources:
        """Count the running ``pool``'s segments as the test's own; its resources."""
        res = resources(pool)
        self.tables.add(res.table)
        return res

    def _processes(self, deadline: float) -> tuple[list[psutil.Process], list[psutil.Process]]:
        me = psutil.Process()

        def gather() -> tuple[list[psutil.Process], list[psutil.Process]]:
            kids = me.children(recursive=True)
            pids = {k.pid for k in kids}
            orphans = [p for p in processes_with_env(TOKEN_VAR, self.token) if p.pid not in pids]
            return kids, orphans

        kids, orphans = gather()
        while (kids or orphans) and time.monotonic() < deadline:
            time.sleep(0.02)
            kids, orphans = gather()
        return kids, orphans

    def find(self, reap: float = REAP_DEADLINE, unlink: float = UNLINK_DEADLINE) -> Leaks:
        """What is left now, after waiting up to ``reap`` seconds for the test's
        processes to exit and ``unlink`` more for its segments to go."""
        kids, orphans = self._processes(time.monotonic() + reap)
        roots = set(self.tables)
        roots |= {segment_root(s) or s for s in segments_held_by(p.pid for p in kids + orphans)}

        def segments() -> list[str]:
            return sorted(n for n in os.listdir(SHM) if segment_root(n) in roots)

        left = segments()
        deadline = time.monotonic() + unlink
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = segments()
        fds = fd_links()
        return Leaks(
            children=kids,
            orphans=orphans,
            segments=left,
            dirs=sorted(socket_dirs() - self._dirs),
            fds={fd: to for fd, to in fds.items() if self._fds.get(fd) != to}
            if len(fds) > len(self._fds)
            else {},
            fd_counts=(len(self._fds), len(fds)),
        )


class TrackedPool(bgpool.Pool):
    """A ``bgpool.Pool`` that, once started, tells a ``LeakCheck`` what it created."""

    def __init__(self, config: bgpool.PoolConfig, check: LeakCheck) -> None:
        super().__init__(config)
        self._leak_check = check

    def start(self) -> None:
        super().start()
        self._leak_check.track(self)


ATTEMPT = """
def attempt(what, call):
    '''Print "<what>: ok <result>", or "<what>: <exception type> <message>".'''
    try:
        result = call()
    except Exception as exc:
        print(f"{what}: {type(exc).__name__} {exc}", flush=True)
    else:
        print(f"{what}: ok {result!r}", flush=True)
"""
"""For code run in a fresh interpreter: `attempt(what, call)` prints the outcome
of `call()` as one line, so a test reads what happened from its stdout."""

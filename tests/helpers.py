"""Helpers shared by bgpool's tests (imported as ``helpers``; tests/ is on sys.path).

Only the public API of bgpool is used, plus psutil and /proc to observe processes.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import psutil

import bgpool

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
WORKERS_PY = FIXTURES / "workers.py"

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 5.0, what: str | None = None) -> T:
    """Poll ``predicate`` until it returns something truthy, or fail at the deadline.

    This is a test-side observation loop with a deadline, not a synchronisation
    sleep: it returns as soon as the condition holds.
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


def spec(name: str | None, worker: str, **kwargs: Any) -> bgpool.WorkerSpec:
    """A declaration whose target is ``fixtures.workers:<worker>``."""
    return bgpool.WorkerSpec(name=name, target=f"fixtures.workers:{worker}", **kwargs)


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


def pid_of(pool: Any, name: str) -> int | None:
    return the_status(pool, name).pid


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
    text = read_text(path) or ""
    out = []
    for line in text.splitlines():
        if line.strip():
            pid, ts = line.split()
            out.append((int(pid), float(ts)))
    return out


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie awaiting its reaper)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def alive(pid: int) -> bool:
    return not gone(pid)


def supervisor_of(worker_pid: int) -> psutil.Process:
    """The supervisor: the worker's parent, itself a child of the test process."""
    sup = psutil.Process(worker_pid).parent()
    assert sup is not None
    assert sup.ppid() == os.getpid(), "the supervisor must be a child of the application"
    return sup


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


def pipe_holders(inode: int, pids: list[int]) -> list[int]:
    """Which of ``pids`` hold an fd on the pipe ``inode``."""
    link = f"pipe:[{inode}]"
    holders = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    holders.append(pid)
                    break
            except OSError:
                continue
    return holders


def fd_links(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


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


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment plus PYTHONPATH so a child can import bgpool/fixtures."""
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) if not pp else f"{ROOT}{os.pathsep}{pp}"
    env.update(extra)
    return env


def run_python(
    code: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (cwd = project root)."""
    return subprocess.run(
        [sys.executable, "-c", code],
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


def tenant_log(path: Path) -> list[tuple[int, str, str, int, float]]:
    """The ``(pid, name, scope_label, instance, monotonic)`` lines written by the
    ``tenant`` fixture's ``$LOG`` and ``$EOF_LOG``."""
    text = read_text(path) or ""
    out = []
    for line in text.splitlines():
        if line.strip():
            pid, name, scope, instance, ts = line.split("\t")
            out.append((int(pid), name, scope, int(instance), float(ts)))
    return out


def tenant_report(report_dir: Path, name: str, scope: str = "", instance: int = 0) -> Any:
    """The JSON report the ``tenant`` fixture writes under ``$REPORT_DIR``, or None."""
    return read_json(report_dir / f"{scope}~{name}~{instance}.json")


def shm_in_use_by_others(ours: Iterable[int] = ()) -> set[str]:
    """``bgp_*`` segments mapped or open by live processes other than us and
    ``ours`` (another test run on the same machine): not ours to account for."""
    skip = {os.getpid(), *ours}
    names: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        with (
            contextlib.suppress(OSError),
            open(f"/proc/{entry}/maps", encoding="utf-8", errors="replace") as f,
        ):
            for line in f:
                if "/dev/shm/bgp_" in line:
                    names.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{entry}/fd/{fd}")
                    if link.startswith("/dev/shm/bgp_"):
                        names.add(link[len("/dev/shm/") :].split()[0])
    return names

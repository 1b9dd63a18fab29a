"""What the supervisor loads, and when: a start waits for every module the
supervisor imports before its first worker, so it imports only what serving
needs; psutil, which only a drain needs, is loaded the first time its loop has
nothing to do, so a drain does not wait for it either."""

from __future__ import annotations

from typing import Any

from helpers import spec, supervisor_pid, wait_for


def _mapped(pid: int, library: str) -> bool:
    """Whether process `pid` has a shared object named `library`* mapped."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        return any(f"/{library}." in line for line in f)


def test_supervisor_serves_without_multiprocessing_or_hashlib(make_pool: Any) -> None:
    pool = make_pool([spec("eager", "idle", num=1)])
    pool.ensure(["eager"])
    pid = supervisor_pid(pool)
    # multiprocessing.shared_memory's C part, and OpenSSL's (which `secrets` loads)
    assert not _mapped(pid, "_posixshmem")
    assert not _mapped(pid, "_hashlib")


def test_supervisor_loads_psutil_once_idle(make_pool: Any) -> None:
    pool = make_pool([spec("eager", "idle", num=1)])
    pid = supervisor_pid(pool)
    wait_for(lambda: _mapped(pid, "_psutil_linux"), 10.0, "psutil loaded by the idle supervisor")

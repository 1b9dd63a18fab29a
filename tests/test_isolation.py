"""Isolation between processes: stop pipes held by nobody but their worker and the
supervisor, no orphans when the supervisor dies, private socket and segment modes,
what a worker sees of itself (environment, current_worker(), its handle), and the
stop pipes of the ``spawn`` start method (tests/test_lifecycle.py runs the lifecycle
under both start methods).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import signal
import socket
import stat
import struct
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Evil,
    alive,
    fd_links,
    gone,
    pipe_holders,
    read_json,
    resources,
    run_python,
    spec,
    starts,
    state,
    supervisor_of,
    the_status,
    tree_pids,
    unix_socket_inodes,
    wait_for,
)

import bgpool
from bgpool import _heap


def _reports(
    make_pool: Any, sentinel_dir: Path, names: list[str], **config: Any
) -> tuple[Any, dict[str, Any]]:
    """A pool of eager ``report`` workers; returns (pool, name -> report)."""
    pool = make_pool(
        [
            spec(
                n,
                "report",
                num=1,
                env={"REPORT": str(sentinel_dir / f"{n}.json"), "REPORT_KEYS": "INHERITED,OWN"},
            )
            for n in names
        ],
        **config,
    )
    reports = {
        n: wait_for(functools.partial(read_json, sentinel_dir / f"{n}.json"), what=f"{n} report")
        for n in names
    }
    return pool, reports


# ------------------------------------------------------------------ stop pipes


def test_each_stop_pipe_is_held_only_by_its_worker_and_the_supervisor(
    make_pool: Any, sentinel_dir: Path
) -> None:
    names = ["w0", "w1", "w2"]
    _pool, reports = _reports(make_pool, sentinel_dir, names)
    sup = supervisor_of(reports["w0"]["pid"])
    tree = tree_pids()
    for n in names:
        r = reports[n]
        assert r["stop_pipe_link"] == f"pipe:[{r['stop_pipe_inode']}]", r["stop_pipe_link"]
        holders = pipe_holders(r["stop_pipe_inode"], tree)
        assert sorted(holders) == sorted([r["pid"], sup.pid]), (
            f"stop pipe of {n} (worker {r['pid']}, supervisor {sup.pid}) held by {holders}"
        )


def test_drain_delivers_eof_to_every_worker_at_once(make_pool: Any, sentinel_dir: Path) -> None:
    # Each worker lingers 1 s after its EOF. Had a worker inherited a sibling's write
    # end, that sibling would only see EOF once the holder exits, a second later.
    eof_log = sentinel_dir / "eof.log"
    logs = [sentinel_dir / f"w{i}.starts" for i in range(3)]
    pool = make_pool(
        [
            spec(
                f"w{i}",
                "eof_recorder",
                num=1,
                env={"EOF_LOG": str(eof_log), "LINGER": "1.0", "STARTS": str(logs[i])},
            )
            for i in range(3)
        ]
    )
    pids = {starts(log)[0][0] for log in logs}
    t0 = time.monotonic()
    pool.shutdown()
    eofs = starts(eof_log)
    assert {pid for pid, _ in eofs} == pids
    latest = max(ts for _, ts in eofs)
    assert latest - t0 < 0.5, [ts - t0 for _, ts in eofs]


def test_restarting_drains_each_worker_independently(make_pool: Any, sentinel_dir: Path) -> None:
    eof_log = sentinel_dir / "eof.log"
    pool = make_pool(
        [
            spec(f"w{i}", "eof_recorder", num=1, env={"EOF_LOG": str(eof_log), "LINGER": "1.0"})
            for i in range(3)
        ],
        restart_grace_period=5.0,
    )
    old = {the_status(pool, f"w{i}").pid for i in range(3)}
    t0 = time.monotonic()
    pool.restart_workers()
    eofs = [(pid, ts) for pid, ts in starts(eof_log) if pid in old]
    assert {pid for pid, _ in eofs} == old
    assert max(ts for _, ts in eofs) - t0 < 0.5, [ts - t0 for _, ts in eofs]


# ------------------------------------------------------------- supervisor death


def test_supervisor_sigkill_leaves_no_worker_alive(make_pool: Any, sentinel_dir: Path) -> None:
    pool = make_pool(
        [
            spec("watcher", "idle", num=1, env={"SENTINEL": str(sentinel_dir / "w.pid")}),
            spec("deaf", "stuck", num=1, env={"SENTINEL": str(sentinel_dir / "d.pid")}),
        ]
    )
    pids = [the_status(pool, n).pid for n in ("watcher", "deaf")]
    sup = supervisor_of(pids[0])
    assert supervisor_of(pids[1]).pid == sup.pid
    os.kill(sup.pid, signal.SIGKILL)
    try:
        wait_for(lambda: all(gone(p) for p in pids), timeout=2.0, what="workers gone")
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    pool.shutdown()  # cleans up what the supervisor could not (the leak check verifies)


# ------------------------------------------------------------ private resources


def test_control_socket_and_segment_are_private(make_pool: Any) -> None:
    pool = make_pool([spec("eager", "idle", num=1)])
    address = pool.address
    assert os.environ["BGPOOL_ADDRESS"] == address

    sock = os.stat(address)
    assert stat.S_ISSOCK(sock.st_mode)
    assert stat.S_IMODE(sock.st_mode) == 0o600
    directory = Path(address).parent
    assert directory.parent == Path(tempfile.gettempdir())
    assert directory.name.startswith("bgpool-")
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700

    segments = resources(pool).segments  # the pool's own (another run's are not ours)
    assert segments, "no /dev/shm/bgp_* segment"
    for name in segments:
        assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600, name

    pool.shutdown()
    assert not os.path.exists(address)
    assert not directory.exists()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in segments)


def test_no_worker_holds_the_control_socket(make_pool: Any, sentinel_dir: Path) -> None:
    pool, reports = _reports(make_pool, sentinel_dir, ["a", "b"])
    inodes = unix_socket_inodes(pool.address)
    assert inodes, "control socket not found in /proc/net/unix"
    sup = supervisor_of(reports["a"]["pid"])
    assert {f"socket:[{i}]" for i in inodes} & set(fd_links(sup.pid).values()), (
        "supervisor must listen"
    )
    for name, r in reports.items():
        held = {f"socket:[{i}]" for i in inodes} & set(r["fds"].values())
        assert not held, f"worker {name} holds the control socket"


# ------------------------------------------------------------- worker's view


def test_workers_get_address_name_and_environment(
    make_pool: Any, sentinel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INHERITED", "from-the-application")
    monkeypatch.setenv("OWN", "overridden")
    pool = make_pool(
        [
            spec(
                "reporter",
                "report",
                num=1,
                env={
                    "REPORT": str(sentinel_dir / "r.json"),
                    "REPORT_KEYS": "INHERITED,OWN",
                    "OWN": "from-the-spec",
                },
            )
        ]
    )
    r = wait_for(lambda: read_json(sentinel_dir / "r.json"), what="report")
    assert r["BGPOOL_ADDRESS"] == pool.address
    assert os.environ["BGPOOL_ADDRESS"] == pool.address
    assert r["BGPOOL_WORKER"] == "reporter"
    assert r["env"] == {"INHERITED": "from-the-application", "OWN": "from-the-spec"}
    assert r["pid"] == the_status(pool, "reporter").pid


def test_current_worker_describes_the_instance(make_pool: Any, sentinel_dir: Path) -> None:
    _pool, reports = _reports(make_pool, sentinel_dir, ["me"])
    r = reports["me"]
    assert r["worker"] == {"name": "me", "scope": "", "instance": 0}
    assert r["worker_before_handle"] == r["worker"]


def test_worker_api_outside_a_worker() -> None:
    assert bgpool.current_worker() is None
    with pytest.raises(RuntimeError):
        bgpool.get_worker_handle()


def test_handle_api_select_wait_and_stop_requested(make_pool: Any, sentinel_dir: Path) -> None:
    ready_file, result_file = sentinel_dir / "ready.json", sentinel_dir / "result.json"
    pool = make_pool(
        [
            spec(
                "h",
                "select_waiter",
                num=1,
                env={"READY_FILE": str(ready_file), "RESULT": str(result_file)},
            )
        ]
    )
    before = wait_for(lambda: read_json(ready_file), what="handle checked before the drain")
    assert before == {"stop_requested_at_start": False, "wait_short_timeout": False}
    pool.shutdown()
    result = read_json(result_file)
    assert result is not None, "the worker did not see the drain through select()"
    assert result["select_readable"] is True
    assert result["read_after_select"] is True  # EOF
    assert result["stop_requested_after"] is True
    assert result["wait_after"] is True
    assert result["wait_none_after"] is True
    assert result["same_handle"] is True


def test_handle_is_the_same_object_on_every_call(make_pool: Any, sentinel_dir: Path) -> None:
    _pool, reports = _reports(make_pool, sentinel_dir, ["me"])
    assert reports["me"]["same_handle"] is True
    assert reports["me"]["stop_requested"] is False


def test_each_worker_has_its_own_process_group(make_pool: Any, sentinel_dir: Path) -> None:
    _pool, reports = _reports(make_pool, sentinel_dir, ["a", "b"])
    sup = supervisor_of(reports["a"]["pid"])
    for r in reports.values():
        assert r["ppid"] == sup.pid  # workers are children of the supervisor
        assert r["pgid"] == r["pid"]
    assert os.getpgid(sup.pid) not in {r["pgid"] for r in reports.values()}


def test_worker_starts_with_default_signal_dispositions(make_pool: Any, sentinel_dir: Path) -> None:
    _pool, reports = _reports(make_pool, sentinel_dir, ["me"])
    r = reports["me"]
    assert r["blocked_signals"] == []
    assert r["handlers"]["SIGTERM"] == "SIG_DFL"
    assert r["handlers"]["SIGHUP"] == "SIG_DFL"
    assert r["handlers"]["SIGCHLD"] == "SIG_DFL"
    assert r["handlers"]["SIGUSR1"] == "SIG_DFL"


def test_worker_inherits_the_application_cwd(make_pool: Any, sentinel_dir: Path) -> None:
    _pool, reports = _reports(make_pool, sentinel_dir, ["me"])
    assert reports["me"]["cwd"] == os.getcwd()


# ----------------------------------------------------------------- spawn


def test_spawn_start_method(make_pool: Any, sentinel_dir: Path) -> None:
    pool, reports = _reports(make_pool, sentinel_dir, ["s"], start_method="spawn")
    r = reports["s"]
    assert r["worker"] == {"name": "s", "scope": "", "instance": 0}
    assert r["BGPOOL_WORKER"] == "s"
    assert r["BGPOOL_ADDRESS"] == pool.address
    sup = supervisor_of(r["pid"])
    assert sorted(pipe_holders(r["stop_pipe_inode"], tree_pids())) == sorted([r["pid"], sup.pid])
    assert state(the_status(pool, "s").state) == "ready"


@pytest.mark.skipif(not _heap.IMMORTAL_OBJECTS, reason="immortal objects: Python 3.12 and later")
def test_what_generations_load_is_immortal_in_forked_workers(
    make_pool: Any, sentinel_dir: Path
) -> None:
    """A forked worker writes no reference count of what its seed (bgpool's
    runtime) and generation (its target's module) loaded, so their pages stay
    shared; a spawned worker imported them itself, as any interpreter does."""
    _pool, forked = _reports(make_pool, sentinel_dir, ["f"], start_method="fork")
    assert forked["f"]["immortal"] == [True, True]
    _pool, spawned = _reports(make_pool, sentinel_dir, ["s"], start_method="spawn")
    assert spawned["s"]["immortal"] == [False, False]


def test_a_forked_worker_holds_no_module_with_an_after_fork_hook_its_code_did_not_import(
    make_pool: Any, sentinel_dir: Path
) -> None:
    """threading and logging register hooks that every process forked from
    one that imported them runs (they made each 3.11 worker keep about 290
    KiB more of its own): the supervisor imports both, but what a worker is forked
    from (the seed, then a generation) holds neither unless the target's
    module imports them."""
    report = sentinel_dir / "plain.json"
    target = "fixtures.plain_worker:report"
    make_pool([bgpool.WorkerSpec(name="p", target=target, num=1, env={"REPORT": str(report)})],
              start_method="fork")  # fmt: skip
    assert wait_for(functools.partial(read_json, report), what="report")["loaded"] == []


# ------------------------------------------------------------- control socket


def _raw_send(address: str, payload: bytes) -> None:
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(address)
            except OSError:
                continue
            s.settimeout(1.0)
            with contextlib.suppress(OSError):
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.recv(65536)
            return
    raise AssertionError(f"could not connect to {address}")


def test_supervisor_survives_garbage_and_never_unpickles(
    make_pool: Any, sentinel_dir: Path
) -> None:
    pool = make_pool([spec("eager", "idle", num=1), spec("lazy", "idle")])
    marker = sentinel_dir / "unpickled"
    evil = pickle.dumps(Evil(str(marker)))
    payloads = [
        b"\x00\xff garbage \n",
        b"{not json}\n",
        evil,
        struct.pack(">I", len(evil)) + evil,
        struct.pack("<I", len(evil)) + evil,
        struct.pack(">Q", len(evil)) + evil,
        evil + b"\n",
        b"\xff" * 70000,
    ]
    for payload in payloads:
        _raw_send(pool.address, payload)
    pool.ensure("lazy", timeout=5)  # the supervisor still serves requests
    assert {s.name for s in pool.status()} == {"eager", "lazy"}
    assert not marker.exists(), "the supervisor unpickled bytes sent by a client"


def test_application_exits_cleanly_without_warnings(sentinel_dir: Path) -> None:
    code = textwrap.dedent(
        """
        import bgpool
        from bgpool import Pool, PoolConfig, WorkerSpec
        config = PoolConfig(grace_period=5, workers=[
            WorkerSpec(name="eager", target="fixtures.workers:idle", num=1),
            WorkerSpec(name="lazy", target="fixtures.workers:idle"),
        ])
        with Pool(config) as pool:
            pool.ensure("lazy", timeout=10)
            pool.status()
            pool.diagnostics("eager")
        print("DONE")
        """
    )
    proc = run_python(code, timeout=60, flags=["-X", "dev", "-W", "error"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "DONE"
    for bad in ("ResourceWarning", "resource_tracker", "leaked", "Traceback"):
        assert bad not in proc.stderr, proc.stderr

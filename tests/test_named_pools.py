"""Finding a pool (README, "Finding a pool"; SPEC, "Operating a pool"): named pools at
a fixed place, one pool per name, the CLI's ``--pool`` and its search for the only
running pool, errors that tell "nothing there" from "it stopped", and the titles a
pool's processes show in ``ps``.

Each test gets a private, empty ``$XDG_RUNTIME_DIR`` (``runtime_dir``), so "the pools
of this user" are the test's own even when another suite runs beside it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    ROOT,
    BgpoolRun,
    is_generation,
    pool_segments,
    raises_closed,
    raw_request,
    run_python,
    spec,
    state,
    statuses,
    subprocess_env,
    supervisor_pid,
    the_status,
    wait_all_gone,
    wait_for,
)
from test_cli_commands import cli

import bgpool

NO_POOL_GIVEN = (
    "bgpool: BgpoolError: no pool given, and no named pool of this user is running: give its "
    "address (--address PATH), its name (--pool NAME), or set BGPOOL_ADDRESS\n"
)


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh ``$XDG_RUNTIME_DIR`` (short: AF_UNIX paths are limited), for this process
    and every process it starts."""
    directory = Path(tempfile.mkdtemp(prefix="rt-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(directory))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def without_address() -> dict[str, str]:
    """The test's environment (its private runtime directory) without ``BGPOOL_ADDRESS``."""
    env = subprocess_env()
    env.pop("BGPOOL_ADDRESS", None)
    return env


def idle(name: str = "w", num: int = 1) -> bgpool.WorkerSpec:
    return spec(name, "idle", num=num)


def pids_in(output: str) -> set[int]:
    """The numbers in a status table's PID column (every all-digit cell, loosely)."""
    cells = [cell for line in output.splitlines()[1:] for cell in line.split()]
    return {int(cell) for cell in cells if cell.isdigit()}


def cmdline(pid: int) -> str:
    """``/proc/PID/cmdline`` as ps shows it: arguments joined by spaces, NUL padding gone."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return " ".join(part.decode() for part in f.read().split(b"\0") if part)


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
        return f.read().rstrip("\n")


# ------------------------------------------------------------ found by name


def test_named_pool_is_found_by_name_and_as_the_only_one_running(
    make_pool: Any, runtime_dir: Path
) -> None:
    pool = make_pool([idle()], name="alpha")
    base = runtime_dir / "bgpool"
    assert pool.address == str(base / "alpha" / "control.sock")
    assert pool.name == "alpha"
    for directory in (base, base / "alpha"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    worker = the_status(pool, "w").pid

    by_name = cli("status", "--pool", "alpha", env=without_address())
    assert by_name.returncode == 0, by_name.stderr
    assert worker in pids_in(by_name.stdout)
    assert "unnamed" not in by_name.stdout

    alone = cli("status", env=without_address())  # no address, no name
    assert alone.returncode == 0, alone.stderr
    assert worker in pids_in(alone.stdout)

    with bgpool.connect(pool="alpha") as client:
        assert client.address == pool.address
        assert client.name == "alpha"
        assert [s.pid for s in client.status()] == [worker]


def test_with_several_pools_running_the_cli_lists_them(make_pool: Any, runtime_dir: Path) -> None:
    make_pool([idle()], name="beta")
    make_pool([idle()], name="alpha")
    proc = cli("status", env=without_address())
    assert proc.returncode == 1
    assert proc.stderr == (
        'bgpool: BgpoolError: 2 pools of this user are running ("alpha", "beta"): '
        "choose one with --pool NAME\n"
    )
    assert proc.stdout == ""


def test_address_precedence(make_pool: Any, runtime_dir: Path) -> None:
    """--address, then --pool, then $BGPOOL_ADDRESS, then the only named pool running."""
    unnamed = make_pool([idle("in-unnamed")])
    named = make_pool([idle("in-named")], name="alpha")
    unnamed_pid = the_status(unnamed, "in-unnamed").pid
    named_pid = the_status(named, "in-named").pid

    def shown(*args: str, env_address: str | None) -> set[int]:
        env = without_address()
        if env_address is not None:
            env["BGPOOL_ADDRESS"] = env_address
        proc = cli("status", *args, env=env)
        assert proc.returncode == 0, proc.stderr
        return pids_in(proc.stdout) & {unnamed_pid, named_pid}

    assert shown("--address", unnamed.address, "--pool", "alpha", env_address=None) == {unnamed_pid}
    assert shown("--pool", "alpha", env_address=unnamed.address) == {named_pid}
    assert shown(env_address=unnamed.address) == {unnamed_pid}
    assert shown(env_address=None) == {named_pid}


def test_unnamed_pool_status_says_it_is_unnamed(make_pool: Any, runtime_dir: Path) -> None:
    pool = make_pool([idle()])
    assert pool.name is None
    proc = cli("status")  # through the BGPOOL_ADDRESS its start() set
    assert proc.returncode == 0, proc.stderr
    table, note = proc.stdout.split("\n\n")
    assert the_status(pool, "w").pid in pids_in(table)
    assert note == (
        f"unnamed pool at {pool.address} (a PoolConfig.name would let bgpool find it by "
        "name, and refuse a second pool of that name)\n"
    )
    # an unnamed pool keeps a private random address, outside the named pools' place
    assert not pool.address.startswith(str(runtime_dir))


def test_pool_names_are_validated(runtime_dir: Path) -> None:
    for bad, problem in [
        ("a/b", "must not contain '/' (it names a directory)"),
        ("..", "must not be '.' or '..' (it names a directory)"),
        ("", "must not be empty"),
        ("a\nb", "must not contain control characters or line separators"),
    ]:
        with pytest.raises(ValueError) as info:
            bgpool.PoolConfig(workers=[], name=bad)
        assert f"name {problem}" in str(info.value)
        with pytest.raises(ValueError) as info:
            bgpool.connect(pool=bad)
        assert str(info.value) == f"pool name {bad!r} {problem}"
    proc = cli("status", "--pool", "a/b", env=without_address())
    assert proc.returncode == 2
    assert proc.stderr == "bgpool: pool name 'a/b' must not contain '/' (it names a directory)\n"


def test_reload_cannot_rename_a_pool(make_pool: Any, runtime_dir: Path) -> None:
    pool = make_pool([idle()], name="alpha")
    with pytest.raises(ValueError) as info:
        pool.reload(pool.config.model_copy(update={"name": "beta"}))
    assert str(info.value) == (
        "name cannot change while the pool runs ('alpha' -> 'beta'); nothing was changed"
    )
    assert os.path.exists(pool.address)


# ------------------------------------------------------------ one pool per name


def test_second_pool_of_a_name_is_refused_naming_the_running_ones_pid(
    make_pool: Any, runtime_dir: Path, tmp_path: Path
) -> None:
    first = make_pool([idle()], name="alpha")
    holder = f"(pid {os.getpid()}, supervisor pid {supervisor_pid(first)})"
    children = {p.pid for p in psutil.Process().children()}

    second = bgpool.Pool(bgpool.PoolConfig(workers=[idle("other")], name="alpha"))
    with pytest.raises(bgpool.StartupError) as info:
        second.start()
    assert str(info.value) == (
        f'could not start the pool: a pool named "alpha" is already running {holder}'
    )
    assert isinstance(info.value, bgpool.BgpoolError)
    assert {p.pid for p in psutil.Process().children()} == children  # nothing started
    assert [s.name for s in first.status()] == ["w"]  # the first one untouched
    assert raw_request(first.address, {"op": "hello"})["ok"] is True

    config = tmp_path / "alpha.py"
    config.write_text(
        "from bgpool import PoolConfig, WorkerSpec\n"
        "config = PoolConfig(name='alpha', workers=[WorkerSpec(name='x', "
        "target='fixtures.workers:idle', num=1)])\n"
    )
    run = BgpoolRun(str(config), tmp_path)
    try:
        assert run.wait() == 1
        assert (
            f'bgpool: StartupError: could not start the pool: a pool named "alpha" is '
            f"already running {holder}\n"
        ) in run.stderr()
    finally:
        run.close()
    assert [s.name for s in first.status()] == ["w"]


OWNER = textwrap.dedent(
    """
    import json, sys
    import bgpool

    pool = bgpool.Pool(bgpool.PoolConfig(name="alpha", workers=[
        bgpool.WorkerSpec(name="w", target="fixtures.workers:idle", num=1)]))
    pool.start()
    print(json.dumps({"address": pool.address}), flush=True)
    sys.stdin.read()
    """
)


def test_stale_socket_of_a_killed_pool_is_taken_over(make_pool: Any, runtime_dir: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER],
        cwd=ROOT,
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None and owner.stdin is not None
    try:
        started = owner.stdout.readline()
        assert started, "the owner exited before its pool started"
        address = json.loads(started)["address"]
        hello = raw_request(address, {"op": "hello"})
        supervisor = psutil.Process(int(hello["pid"]))
        pool_processes = [supervisor, *supervisor.children(recursive=True)]
        # Killed so that nothing can clean up: the owner frozen first (its
        # watcher removes a dead supervisor's files at once, and would race
        # this test), then the supervisor killed (the owner would clean up at
        # its shutdown), then the owner (which would not drain).
        owner.send_signal(signal.SIGSTOP)
        supervisor.kill()
        wait_all_gone([p.pid for p in pool_processes], 10, "the killed pool's processes")
        owner.kill()
        owner.wait(10)
    finally:
        if owner.poll() is None:  # failed before the kill: the leak check kills the rest
            owner.kill()
        owner.stdin.close()
        owner.stdout.close()
        owner.wait(10)
    for segment in pool_segments(str(hello["table"])):  # nobody was left to remove them
        os.unlink(f"/dev/shm/{segment}")
    directory = runtime_dir / "bgpool" / "alpha"
    assert sorted(os.listdir(directory)) == ["control.sock", "pid"]  # stale

    proc = cli("status", "--pool", "alpha", env=without_address())
    assert proc.returncode == 1
    assert proc.stderr == f"bgpool: BgpoolError: no pool is listening at {address}\n"
    assert cli("status", env=without_address()).stderr == NO_POOL_GIVEN  # not running

    pool = make_pool([idle()], name="alpha")  # taken over, without a word
    assert pool.address == address
    proc = cli("status", "--pool", "alpha", env=without_address())
    assert proc.returncode == 0, proc.stderr
    assert the_status(pool, "w").pid in pids_in(proc.stdout)
    pids = (directory / "pid").read_text().split()
    assert pids == [str(os.getpid()), str(supervisor_pid(pool))]


# ------------------------------------------------------------ directories


def test_a_directory_others_may_write_to_is_refused(runtime_dir: Path) -> None:
    base = runtime_dir / "bgpool"
    base.mkdir()
    base.chmod(0o770)
    children = psutil.Process().children()
    pool = bgpool.Pool(bgpool.PoolConfig(workers=[idle()], name="alpha"))
    with pytest.raises(bgpool.StartupError) as info:
        pool.start()
    problem = (
        f"refusing to use {base} for pool sockets: group or others may write to it "
        f"(mode 770); make it private: chmod 700 {base}"
    )
    assert str(info.value) == f"could not start the pool: {problem}"
    assert psutil.Process().children() == children
    assert os.listdir(base) == []
    proc = cli("status", "--pool", "alpha", env=without_address())
    assert (proc.returncode, proc.stderr) == (1, f"bgpool: BgpoolError: {problem}\n")

    base.chmod(0o700)
    (base / "alpha").mkdir(mode=0o700)
    (base / "alpha").chmod(0o702)
    with pytest.raises(bgpool.BgpoolError) as error:
        bgpool.connect(pool="alpha")
    assert str(error.value) == (
        f"refusing to use {base / 'alpha'} for pool sockets: group or others may write to it "
        f"(mode 702); make it private: chmod 700 {base / 'alpha'}"
    )


def test_a_symlink_in_place_of_a_directory_is_refused(runtime_dir: Path, tmp_path: Path) -> None:
    base = runtime_dir / "bgpool"
    base.mkdir(mode=0o700)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (base / "alpha").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(bgpool.StartupError) as info:
        bgpool.Pool(bgpool.PoolConfig(workers=[idle()], name="alpha")).start()
    assert str(info.value) == (
        f"could not start the pool: refusing to use {base / 'alpha'} for pool sockets: "
        "it is not a directory"
    )
    assert os.listdir(tmp_path / "elsewhere") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_of_another_user_is_refused(runtime_dir: Path) -> None:
    base = runtime_dir / "bgpool"
    base.mkdir(mode=0o700)
    os.chown(base, 65534, -1)
    with pytest.raises(bgpool.StartupError) as info:
        bgpool.Pool(bgpool.PoolConfig(workers=[idle()], name="alpha")).start()
    assert str(info.value) == (
        f"could not start the pool: refusing to use {base} for pool sockets: it is owned by "
        f"uid 65534, not by this user (uid {os.getuid()})"
    )


def test_without_a_usable_xdg_runtime_dir_pools_live_under_the_temp_dir(tmp_path: Path) -> None:
    """Unset, relative, missing, or another user's: the temp dir's bgpool-UID instead."""
    code = "from bgpool import naming; print(naming.address('alpha'))"
    expected = f"{tmp_path}/bgpool-{os.getuid()}/alpha/control.sock"
    runtimes = [None, "relative/dir", str(tmp_path / "missing")]
    if os.geteuid() == 0:  # a directory of another user's (making one needs root)
        (tmp_path / "theirs").mkdir(mode=0o700)
        os.chown(tmp_path / "theirs", 65534, -1)
        runtimes.append(str(tmp_path / "theirs"))
    for runtime in runtimes:
        env = subprocess_env(TMPDIR=str(tmp_path))
        env.pop("XDG_RUNTIME_DIR", None)
        if runtime is not None:
            env["XDG_RUNTIME_DIR"] = runtime
        proc = run_python(code, env=env)
        assert (proc.returncode, proc.stdout) == (0, expected + "\n"), (runtime, proc.stderr)
    assert not (tmp_path / f"bgpool-{os.getuid()}").exists()  # looking makes nothing


# ------------------------------------------------------------ error texts


def test_no_pool_is_listening_where_none_ever_ran(tmp_path: Path, runtime_dir: Path) -> None:
    nothing = tmp_path / "nothing.sock"
    stale = tmp_path / "stale.sock"  # a socket file nobody listens on
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))
    assert stale.exists()
    for address in (nothing, stale, tmp_path / "file" / "below-a-file.sock"):
        (tmp_path / "file").touch()
        with pytest.raises(bgpool.BgpoolError) as info:
            bgpool.connect(str(address))
        assert str(info.value) == f"no pool is listening at {address}"
        assert not isinstance(info.value, bgpool.PoolClosed)
        proc = cli("status", "--address", str(address), env=without_address())
        assert proc.returncode == 1
        assert proc.stderr == f"bgpool: BgpoolError: no pool is listening at {address}\n"
    with pytest.raises(bgpool.BgpoolError) as info:
        bgpool.connect(pool="alpha")
    assert str(info.value) == (
        f"no pool is listening at {runtime_dir / 'bgpool' / 'alpha' / 'control.sock'}"
    )


def test_pool_is_closed_for_a_client_whose_pool_stopped(make_pool: Any, runtime_dir: Path) -> None:
    for name in (None, "alpha"):
        pool = make_pool([idle()], name=name)
        client = bgpool.connect(pool.address)
        try:
            assert client.name == name
            pool.shutdown()
            for call in (client.status, functools.partial(client.diagnostics, "w"), client.watch):
                with pytest.raises(bgpool.PoolClosed) as info:
                    call()
                assert str(info.value) == "pool is closed"
        finally:
            client.close()


def test_no_address_says_how_to_give_one(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for args in [("status",), ("ensure", "w"), ("restart",), ("reload",)]:
        proc = cli(*args, env=without_address())
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", NO_POOL_GIVEN), args
    monkeypatch.delenv("BGPOOL_ADDRESS", raising=False)
    with pytest.raises(bgpool.BgpoolError) as info:
        bgpool.connect()
    assert str(info.value) == (
        "no pool address: pass connect(address) or connect(pool=NAME), or set BGPOOL_ADDRESS "
        "(Pool.start() sets it for the processes the application starts)"
    )


# ------------------------------------------------------------ nothing left


def test_named_pool_leaves_nothing_behind(make_pool: Any, runtime_dir: Path) -> None:
    directory = runtime_dir / "bgpool" / "alpha"
    pool = make_pool([idle()], name="alpha")
    assert sorted(os.listdir(directory)) == ["control.sock", "pid"]
    pool.shutdown()
    assert os.listdir(directory) == []  # the directory itself stays

    # a supervisor that died left its files: its owner removes them as it sees
    # the death, before shutdown() (an application killed then leaves none)
    pool = make_pool([idle()], name="alpha")
    os.kill(supervisor_pid(pool), signal.SIGKILL)
    wait_for(lambda: raises_closed(pool), timeout=10, what="the pool closed")
    wait_for(lambda: os.listdir(directory) == [], timeout=10, what="the owner to remove them")
    pool.shutdown()
    assert os.listdir(directory) == []
    make_pool([idle()], name="alpha")  # and the name is free


# ------------------------------------------------------------ process titles


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_titles(make_pool: Any, runtime_dir: Path, method: str) -> None:
    api = bgpool.next_scope("api")
    pool = make_pool(
        [idle(num=2), spec("job", "idle", num=1, scope=api)], name="alpha", start_method=method
    )
    # every instance ready (start() waits for one of each name): each titled itself before
    wait_for(lambda: all(state(s.state) == "ready" for s in pool.status()), what="all ready")
    supervisor = supervisor_pid(pool)
    assert cmdline(supervisor) == "bgpool: supervisor alpha"
    workers = {s.pid: f"{s.name}.{s.instance}" for s in statuses(pool, "w")}
    workers[next(s.pid for s in pool.status() if s.name == "job")] = "api:job.0"
    for pid, label in workers.items():
        assert cmdline(pid) == f"bgpool: worker {label} alpha"
        # the title leaves the environment as it was: the pool's mark stays readable
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert f"BGPOOL_POOL={pool.address}".encode() in f.read().split(b"\0")
    generations = [p for p in psutil.Process(supervisor).children() if is_generation(p)]
    if method == "fork":
        titles = {comm(p.pid): cmdline(p.pid) for p in generations}
        assert titles.pop("bgpool-spare", "bgpool: spare 1 alpha") == "bgpool: spare 1 alpha"
        assert titles == {
            "bgpool-seed": "bgpool: seed alpha",
            "bgpool-gen1": "bgpool: generation 1 alpha",
        }
        wait_for(
            lambda: any(
                comm(p.pid) == "bgpool-spare" for p in psutil.Process(supervisor).children()
            ),
            what="a spare of generation 1",
        )
        spares = [p for p in psutil.Process(supervisor).children() if comm(p.pid) == "bgpool-spare"]
        assert {cmdline(p.pid) for p in spares} == {"bgpool: spare 1 alpha"}


def test_unnamed_pool_titles_show_its_address_id(make_pool: Any) -> None:
    pool = make_pool([idle()])
    label = Path(pool.address).parent.name
    assert label.startswith("bgpool-")
    assert cmdline(supervisor_pid(pool)) == f"bgpool: supervisor {label}"
    assert cmdline(the_status(pool, "w").pid) == f"bgpool: worker w.0 {label}"

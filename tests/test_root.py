"""Where targets are found: ``PoolConfig.root`` (README, "Declaring workers").

A relative script path is resolved against root, and a module target is
imported with root first on the module search path, then the application's
``sys.path``, whatever the current directory, with either start method. The
default root is the current directory for a config built in Python, and the
config file's directory for ``bgpool run CONFIG``, so ``bgpool run`` behaves the
same from any directory. Each worker here publishes the file it runs from.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from helpers import BgpoolRun, published, spec

import bgpool
from bgpool import PoolConfig, WorkerSpec

MakePool = Callable[..., Any]
StartMethod = Literal["fork", "spawn"]

_MODULE = """
import os

import bgpool


def run() -> None:
    handle = bgpool.get_worker_handle()
    bgpool.set_vars({"file": __file__, "cwd": os.getcwd(), "origin": ORIGIN})
    handle.wait()
"""

_SCRIPT = """
import os

import bgpool

handle = bgpool.get_worker_handle()
bgpool.set_vars({"file": __file__, "cwd": os.getcwd()})
handle.wait()
"""


def project(directory: Path, package: str) -> Path:
    """A project in `directory`: `<package>/jobs.py` (a module target) and
    `scripts/job.py` (a script target), neither on `sys.path`."""
    (directory / package).mkdir(parents=True)
    (directory / package / "__init__.py").write_text("")
    (directory / package / "jobs.py").write_text(f"ORIGIN = 'root'\n{_MODULE}")
    (directory / "scripts").mkdir()
    (directory / "scripts" / "job.py").write_text(_SCRIPT)
    return directory


@pytest.fixture
def package() -> str:
    """A package name no other test imports."""
    return f"rootpkg_{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["fork", "spawn"])
def method(request: pytest.FixtureRequest) -> StartMethod:
    value: StartMethod = request.param
    return value


def test_both_kinds_of_target_resolve_against_root_from_another_directory(
    make_pool: MakePool,
    tmp_path: Path,
    package: str,
    method: StartMethod,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = project(tmp_path / "project", package)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pool = make_pool(
        [
            WorkerSpec(name="mod", target=f"{package}.jobs:run", num=1, ready_on="vars"),
            WorkerSpec(name="script", target="scripts/job.py", num=1, ready_on="vars"),
        ],
        root=root,
        start_method=method,
    )
    assert published(pool, "mod")["file"] == str(root / package / "jobs.py")
    assert published(pool, "script")["file"] == str(root / "scripts" / "job.py")
    assert published(pool, "mod")["cwd"] == str(elsewhere)  # the cwd is the application's


def test_root_comes_before_the_applications_sys_path(
    make_pool: MakePool,
    tmp_path: Path,
    package: str,
    method: StartMethod,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A module found both under root and on the application's `sys.path`
    is imported from root."""
    root = project(tmp_path / "project", package)
    other = project(tmp_path / "on-sys-path", package)
    (other / package / "jobs.py").write_text(f"ORIGIN = 'sys.path'\n{_MODULE}")
    monkeypatch.syspath_prepend(str(other))
    pool = make_pool(
        [WorkerSpec(name="mod", target=f"{package}.jobs:run", num=1, ready_on="vars")],
        root=root,
        start_method=method,
    )
    assert published(pool, "mod")["origin"] == "root"


def test_a_module_only_under_root_is_found_when_the_config_is_built(
    tmp_path: Path, package: str
) -> None:
    root = project(tmp_path / "project", package)
    PoolConfig(root=root, workers=[WorkerSpec(name="m", target=f"{package}.jobs:run")])
    with pytest.raises(ValueError, match=f"module '{package}.nothing' cannot be found"):
        PoolConfig(root=root, workers=[WorkerSpec(name="m", target=f"{package}.nothing:run")])


def test_root_cannot_change_on_reload(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool([spec("a", "idle", num=1)])
    with pytest.raises(ValueError, match="root cannot change while the pool runs"):
        pool.reload(PoolConfig(workers=[spec("a", "idle", num=1)], root=tmp_path))
    pool.ensure("a")


_CONFIG = """
from bgpool import PoolConfig, WorkerSpec

config = PoolConfig(workers=[
    WorkerSpec(name="mod", target="{package}.jobs:run", num=1, ready_on="vars"),
    WorkerSpec(name="script", target="scripts/job.py", num=1, ready_on="vars"),
])
"""


def test_bgpool_run_resolves_targets_from_the_config_files_directory(
    tmp_path: Path, package: str, sentinel_dir: Path
) -> None:
    """`bgpool run path/to/CONFIG.py` from a directory that holds none of it:
    the config file's directory is the root."""
    root = project(tmp_path / "project", package)
    (root / "config.py").write_text(_CONFIG.format(package=package))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = BgpoolRun(str(root / "config.py"), sentinel_dir, "--plain", cwd=elsewhere)
    try:
        client = bgpool.connect(run.address())
        try:
            client.ensure(["mod", "script"], timeout=15)
            assert published(client, "mod")["file"] == str(root / package / "jobs.py")
            assert published(client, "script")["file"] == str(root / "scripts" / "job.py")
        finally:
            client.close()
        assert run.stop() == 0, run.stderr()
    finally:
        run.close()

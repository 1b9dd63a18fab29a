"""Declarations: WorkerSpec and PoolConfig validation (README, "Declaring workers").

Every mistake is a pydantic ``ValidationError`` carrying the field's path, all
mistakes are reported at once, and nothing starts (no process is created: the
autouse leak check would notice one).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import FIXTURES, ROOT, spec
from pydantic import ValidationError

import bgpool
from bgpool import GLOBAL_SCOPE, Pool, PoolConfig, WorkerSpec, next_scope

IDLE = "fixtures.workers:idle"


def locs(exc: ValidationError) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in exc.errors()]


def spec_error_locs(**kwargs: Any) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as info:
        WorkerSpec(**kwargs)
    return locs(info.value)


def config_error_locs(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as info:
        PoolConfig(*args, **kwargs)
    return locs(info.value)


def target_error(target: str, **config_kwargs: Any) -> ValidationError:
    """Build a config with one worker whose target is ``target``; return the error.

    The check may live in WorkerSpec or in PoolConfig (a target must be checked by
    the time the PoolConfig is built); either way the error's path must end at
    ``target``.
    """
    with pytest.raises(ValidationError) as info:
        PoolConfig(workers=[WorkerSpec(name="w", target=target)], **config_kwargs)
    return info.value


# --------------------------------------------------------------------- defaults


def test_worker_spec_defaults_match_spec() -> None:
    s = WorkerSpec(target=IDLE)
    assert s.name is None
    assert s.num == 0
    assert s.max_instances is None
    assert s.max_consecutive_failures == 6
    assert s.env == {}
    assert s.args == []
    assert s.scope == GLOBAL_SCOPE


def test_worker_spec_ready_on_defaults_to_handle() -> None:
    assert WorkerSpec(target=IDLE).ready_on == "handle"
    assert WorkerSpec(target=IDLE, ready_on="vars").ready_on == "vars"


def test_pool_config_defaults_match_spec() -> None:
    c = PoolConfig(workers=[])
    assert c.ensure_timeout == 30.0
    assert c.grace_period == 30.0
    assert c.restart_grace_period == 6.0
    assert c.start_method == "fork"
    assert c.root == Path.cwd()  # built in Python: the current directory
    assert c.metrics_port is None
    assert c.max_vars_bytes == 1048576


def test_valid_declarations_from_spec_example_are_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    api = next_scope("api.example.com")
    config = PoolConfig(
        workers=[
            WorkerSpec(name="job-runner", target=IDLE, num=1),
            WorkerSpec(name="mailer", target="fixtures/script_worker.py"),
            WorkerSpec(target="fixtures.workers:report", max_instances=16),
            WorkerSpec(name="job-runner", target=IDLE, scope=api),
        ]
    )
    assert [w.name for w in config.workers] == ["job-runner", "mailer", None, "job-runner"]


def test_name_limits_are_utf8_bytes() -> None:
    WorkerSpec(name="a" * 128, target=IDLE)
    WorkerSpec(name="é" * 64, target=IDLE)  # 128 UTF-8 bytes
    assert ("name",) in spec_error_locs(name="a" * 129, target=IDLE)
    assert ("name",) in spec_error_locs(name="é" * 65, target=IDLE)  # 65 chars, 130 bytes


# ------------------------------------------------------------ WorkerSpec errors


@pytest.mark.parametrize(
    ("kwargs", "loc"),
    [
        pytest.param({}, ("target",), id="target-missing"),
        pytest.param({"target": 123}, ("target",), id="target-not-str"),
        pytest.param({"target": IDLE, "name": ""}, ("name",), id="name-empty"),
        pytest.param({"target": IDLE, "name": "a\x00b"}, ("name",), id="name-nul"),
        pytest.param({"target": IDLE, "name": 7}, ("name",), id="name-not-str"),
        pytest.param({"target": IDLE, "name": "a", "num": -1}, ("num",), id="num-negative"),
        pytest.param({"target": IDLE, "name": None, "num": 1}, ("num",), id="catch-all-num"),
        pytest.param(
            {"target": IDLE, "name": "a", "max_instances": 4},
            ("max_instances",),
            id="max-instances-on-named",
        ),
        pytest.param(
            {"target": IDLE, "name": "a", "max_consecutive_failures": -2},
            ("max_consecutive_failures",),
            id="max-failures-below-minus-one",
        ),
        pytest.param({"target": IDLE, "env": {"A": 1}}, ("env", "A"), id="env-value-not-str"),
        pytest.param({"target": IDLE, "env": ["A"]}, ("env",), id="env-not-mapping"),
        pytest.param({"target": IDLE, "args": ["a", 1]}, ("args", 1), id="args-item-not-str"),
        pytest.param({"target": IDLE, "args": "abc"}, ("args",), id="args-a-string"),
        pytest.param({"target": IDLE, "ready_on": "later"}, ("ready_on",), id="ready-on"),
        pytest.param({"target": IDLE, "bogus": True}, ("bogus",), id="extra-field"),
    ],
)
def test_worker_spec_rejects_with_field_path(kwargs: dict[str, Any], loc: tuple[Any, ...]) -> None:
    assert loc in spec_error_locs(**kwargs)


def test_worker_spec_reports_every_mistake_at_once() -> None:
    found = spec_error_locs(
        target=IDLE,
        name="",
        num=-1,
        max_consecutive_failures=-5,
        env={"A": 1},
        bogus=True,
    )
    for loc in [("name",), ("num",), ("max_consecutive_failures",), ("env", "A"), ("bogus",)]:
        assert loc in found, f"{loc} missing from {found}"


def test_catch_all_with_max_instances_is_accepted() -> None:
    s = WorkerSpec(target=IDLE, max_instances=3)
    assert s.name is None
    assert s.max_instances == 3


# ------------------------------------------------------------- PoolConfig errors


@pytest.mark.parametrize(
    ("kwargs", "loc"),
    [
        pytest.param({"workers": "x"}, ("workers",), id="workers-not-list"),
        pytest.param({"workers": [{"name": "a"}]}, ("workers", 0, "target"), id="item-no-target"),
        pytest.param({"ensure_timeout": 0}, ("ensure_timeout",), id="ensure-timeout-zero"),
        pytest.param({"ensure_timeout": -1}, ("ensure_timeout",), id="ensure-timeout-negative"),
        pytest.param({"ensure_timeout": math.nan}, ("ensure_timeout",), id="ensure-timeout-nan"),
        pytest.param({"grace_period": -1}, ("grace_period",), id="grace-negative"),
        pytest.param(
            {"restart_grace_period": -1}, ("restart_grace_period",), id="restart-grace-negative"
        ),
        pytest.param({"start_method": "forkserver"}, ("start_method",), id="start-method"),
        pytest.param({"metrics_port": 70000}, ("metrics_port",), id="metrics-port-too-big"),
        pytest.param({"metrics_port": -1}, ("metrics_port",), id="metrics-port-negative"),
        pytest.param({"max_vars_bytes": -1}, ("max_vars_bytes",), id="max-vars-negative"),
        pytest.param({"bogus": 1}, ("bogus",), id="extra-field"),
    ],
)
def test_pool_config_rejects_with_field_path(kwargs: dict[str, Any], loc: tuple[Any, ...]) -> None:
    kwargs.setdefault("workers", [])
    assert loc in config_error_locs(**kwargs)


def test_pool_config_reports_every_mistake_at_once_with_paths() -> None:
    found = config_error_locs(
        workers=[
            {"name": "", "target": IDLE},
            {"name": "b", "target": IDLE, "num": -1},
            {"name": "c", "target": IDLE, "nonsense": 1},
        ],
        ensure_timeout=0,
        start_method="thread",
    )
    for loc in [
        ("workers", 0, "name"),
        ("workers", 1, "num"),
        ("workers", 2, "nonsense"),
        ("ensure_timeout",),
        ("start_method",),
    ]:
        assert loc in found, f"{loc} missing from {found}"


# ----------------------------------------------------------------- targets


def test_missing_module_is_rejected_at_target() -> None:
    err = target_error("no_such_pkg_for_bgpool_tests.jobs:run")
    assert any(loc[-1] == "target" for loc in locs(err)), locs(err)
    assert "no_such_pkg_for_bgpool_tests" in str(err)


def test_missing_submodule_of_existing_package_is_rejected() -> None:
    err = target_error("fixtures.no_such_module:run")
    assert any(loc[-1] == "target" for loc in locs(err)), locs(err)
    assert "fixtures.no_such_module" in str(err)


def test_missing_script_is_rejected_at_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    err = target_error("fixtures/no_such_script.py")
    assert any(loc[-1] == "target" for loc in locs(err)), locs(err)
    assert "no_such_script.py" in str(err)


def test_target_that_is_neither_module_function_nor_script_is_rejected() -> None:
    err = target_error("fixtures.workers")
    assert any(loc[-1] == "target" for loc in locs(err)), locs(err)


def test_every_missing_target_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    found = config_error_locs(
        workers=[
            {"name": "a", "target": "no_such_pkg_for_bgpool_tests:run"},
            {"name": "b", "target": IDLE},
            {"name": "c", "target": "fixtures/no_such_script.py"},
        ]
    )
    assert any(loc[:2] == ("workers", 0) and loc[-1] == "target" for loc in found), found
    assert any(loc[:2] == ("workers", 2) and loc[-1] == "target" for loc in found), found
    assert not any(loc[:2] == ("workers", 1) for loc in found), found


def test_relative_script_resolves_against_current_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    PoolConfig(workers=[WorkerSpec(name="s", target="fixtures/script_worker.py")])
    err = target_error("script_worker.py")  # exists only under fixtures/
    assert any(loc[-1] == "target" for loc in locs(err)), locs(err)


def test_relative_script_resolves_against_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # the cwd does not have the script; root does
    config = PoolConfig(root=FIXTURES, workers=[WorkerSpec(name="s", target="script_worker.py")])
    assert config.root == FIXTURES
    err = target_error("script_worker.py", root=tmp_path)
    assert any(loc[-1] == "target" for loc in locs(err)), locs(err)


def test_absolute_script_path_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    PoolConfig(workers=[WorkerSpec(name="s", target=str(FIXTURES / "script_worker.py"))])


# -------------------------------------------------------------- duplicates


def test_duplicate_name_in_one_scope_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        PoolConfig(workers=[spec("dup", "idle"), spec("other", "idle"), spec("dup", "report")])
    assert all(loc[0] == "workers" for loc in locs(info.value)), locs(info.value)
    assert '"dup"' in str(info.value) or "'dup'" in str(info.value)


def test_two_catch_alls_in_one_scope_are_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        PoolConfig(workers=[spec(None, "idle"), spec(None, "report")])
    assert all(loc[0] == "workers" for loc in locs(info.value)), locs(info.value)


def test_same_name_and_catch_alls_in_other_scopes_are_accepted() -> None:
    a, b = next_scope("a"), next_scope("b")
    PoolConfig(
        workers=[
            spec("dup", "idle"),
            spec("dup", "idle", scope=a),
            spec("dup", "idle", scope=b),
            spec(None, "idle"),
            spec(None, "idle", scope=a),
        ]
    )


def test_two_named_declarations_may_share_a_target() -> None:
    config = PoolConfig(
        workers=[
            spec("one", "idle", max_consecutive_failures=2),
            spec("two", "idle", max_consecutive_failures=-1, env={"X": "1"}),
        ]
    )
    one, two = config.workers
    assert one.target == two.target
    assert (one.max_consecutive_failures, two.max_consecutive_failures) == (2, -1)
    assert (one.env, two.env) == ({}, {"X": "1"})


def test_pool_accepts_a_list_and_validates_it_before_starting() -> None:
    with pytest.raises(ValidationError):
        Pool([spec("dup", "idle"), spec("dup", "idle")])
    assert psutil.Process().children() == []


def test_pool_from_list_starts_nothing_until_start(make_pool: Any) -> None:
    pool = make_pool([spec("eager", "idle", num=1)], start=False)
    assert isinstance(pool, Pool)
    assert psutil.Process().children() == []


# ---------------------------------------------------------------- scopes


def test_next_scope_hands_out_distinct_scopes() -> None:
    a, b = next_scope("same"), next_scope("same")
    assert a != b
    assert a != GLOBAL_SCOPE
    assert next_scope() != GLOBAL_SCOPE


def test_scope_label_with_colon_is_rejected() -> None:
    with pytest.raises(ValueError):
        next_scope("a:b")


def test_errors_are_importable_from_package() -> None:
    for name in (
        "BgpoolError",
        "WorkerNotDeclared",
        "CatchAllLimitReached",
        "EnsureTimeout",
        "WorkerAborted",
        "WorkerBootFailed",
        "StartupError",
        "PoolClosed",
        "VarsNotPublished",
    ):
        assert issubclass(getattr(bgpool, name), bgpool.BgpoolError), name


# ---------------------------------------------------- every mistake at once, across


def test_field_and_declaration_mistakes_are_reported_together(tmp_path: Path) -> None:
    """A wrong PoolConfig field does not hide what only the PoolConfig can see
    in its declarations: a target that does not exist, a name declared twice."""
    with pytest.raises(ValidationError) as info:
        PoolConfig(
            ensure_timeout=0,
            grace_period=-1,
            root=tmp_path,
            workers=[
                WorkerSpec(name="a", target="no_such_pkg_for_bgpool_tests:run"),
                WorkerSpec(name="a", target=IDLE),
                WorkerSpec(name="s", target="missing_script.py"),
            ],
        )
    found = locs(info.value)
    assert found == [
        ("workers", 0, "target"),
        ("workers", 1, "name"),
        ("workers", 2, "target"),
        ("ensure_timeout",),
        ("grace_period",),
    ], found
    text = str(info.value)
    assert "5 validation errors for PoolConfig" in text, text
    assert "must be a finite number > 0" in text and "must be a finite number >= 0" in text
    assert "module 'no_such_pkg_for_bgpool_tests' cannot be found" in text, text
    assert 'worker "a" is already declared in this scope (workers.0)' in text, text
    assert f"script '{tmp_path / 'missing_script.py'}' does not exist" in text, text


def test_bad_declarations_given_as_dicts_are_all_reported_with_the_rest() -> None:
    """Declarations as dicts are checked in the same pass: one's own field
    error, another's missing module and a PoolConfig field, all at once."""
    found = config_error_locs(
        start_method="thread",
        workers=[
            {"name": "a", "target": IDLE, "num": -1},
            {"name": "b", "target": "no_such_pkg_for_bgpool_tests:run"},
            {"name": "b", "target": IDLE},
        ],
    )
    assert found == [
        ("workers", 0, "num"),
        ("workers", 1, "target"),
        ("workers", 2, "name"),
        ("start_method",),
    ], found


def test_a_bad_root_is_reported_without_guessing_the_targets_under_it() -> None:
    found = config_error_locs(
        root="/no/such/bgpool/root",
        workers=[spec("a", "idle"), spec("a", "idle"), WorkerSpec(name="s", target="x.py")],
    )
    assert found == [("workers", 1, "name"), ("root",)], found


def test_a_config_built_under_default_root_resolves_there(tmp_path: Path) -> None:
    """What `bgpool run` does while it runs a config file: its directory is
    the default root, whatever the current directory."""
    from bgpool.declarations import default_root

    (tmp_path / "job.py").write_text("print('job')\n")
    with default_root(tmp_path):
        config = PoolConfig(workers=[WorkerSpec(name="s", target="job.py")])
    assert config.root == tmp_path
    assert config.script_path(0) == tmp_path / "job.py"
    assert PoolConfig(workers=[]).root == Path.cwd()  # outside the block: the cwd again

"""ensure() input validation: TypeError / ValueError before anything starts, names
resolved for the whole batch before any is started.

Each test uses one started pool with a lazy worker ``lazy`` that records every start
in ``$STARTS``; after each rejected call we check that it is still unstarted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import spec, starts, state, the_status, worker_children

import bgpool

TYPE_ERRORS = [
    pytest.param((42,), {}, id="names-int"),
    pytest.param((None,), {}, id="names-None"),
    pytest.param((b"lazy",), {}, id="names-bytes"),
    pytest.param(({"lazy"},), {}, id="names-set"),
    pytest.param((["lazy", 1],), {}, id="element-int"),
    pytest.param((("lazy", None),), {}, id="element-None"),
    pytest.param(([b"lazy"],), {}, id="element-bytes"),
    pytest.param((["lazy", ["x"]],), {}, id="element-list"),
    pytest.param(("lazy",), {"timeout": True}, id="timeout-True"),
    pytest.param(("lazy",), {"timeout": False}, id="timeout-False"),
    pytest.param(("lazy",), {"timeout": "5"}, id="timeout-str"),
    pytest.param(("lazy",), {"timeout": [5]}, id="timeout-list"),
    pytest.param(("lazy",), {"timeout": object()}, id="timeout-object"),
    # validation happens before resolution: an undeclared name does not win
    pytest.param((["undeclared", 3],), {}, id="undeclared-and-int"),
]

VALUE_ERRORS = [
    pytest.param(("",), {}, id="empty-string"),
    pytest.param(([],), {}, id="empty-list"),
    pytest.param(((),), {}, id="empty-tuple"),
    pytest.param((["lazy", ""],), {}, id="empty-element"),
    pytest.param(("la\x00zy",), {}, id="nul-in-name"),
    pytest.param((["lazy", "x\x00"],), {}, id="nul-in-element"),
    pytest.param((["lazy", "lazy"],), {}, id="duplicates"),
    pytest.param((("lazy", "other", "lazy"),), {}, id="duplicates-tuple"),
    pytest.param(("lazy",), {"timeout": 0}, id="timeout-zero"),
    pytest.param(("lazy",), {"timeout": 0.0}, id="timeout-zero-float"),
    pytest.param(("lazy",), {"timeout": -1}, id="timeout-negative"),
    pytest.param(("lazy",), {"timeout": math.nan}, id="timeout-nan"),
    pytest.param(("lazy",), {"timeout": math.inf}, id="timeout-inf"),
    pytest.param(("lazy",), {"timeout": -math.inf}, id="timeout-minus-inf"),
    pytest.param((["undeclared", ""],), {}, id="undeclared-and-empty"),
]


@pytest.fixture
def lazy_pool(make_pool: Any, sentinel_dir: Path) -> Any:
    return make_pool(
        [
            spec("lazy", "idle", env={"STARTS": str(sentinel_dir / "lazy.starts")}),
            spec("other", "idle", env={"STARTS": str(sentinel_dir / "other.starts")}),
        ]
    )


def assert_nothing_started(pool: Any, sentinel_dir: Path) -> None:
    for name in ("lazy", "other"):
        st = the_status(pool, name)
        assert state(st.state) == "stopped", st
        assert st.pid is None, st
        assert st.attempts == 0, st
        assert starts(sentinel_dir / f"{name}.starts") == [], f"{name} was started"
    for child in psutil.Process().children():  # the supervisor
        assert worker_children(child.pid) == [], "the supervisor forked a worker"


@pytest.mark.parametrize(("args", "kwargs"), TYPE_ERRORS)
def test_ensure_raises_type_error_and_starts_nothing(
    lazy_pool: Any, sentinel_dir: Path, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(TypeError):
        lazy_pool.ensure(*args, **kwargs)
    assert_nothing_started(lazy_pool, sentinel_dir)


@pytest.mark.parametrize(("args", "kwargs"), VALUE_ERRORS)
def test_ensure_raises_value_error_and_starts_nothing(
    lazy_pool: Any, sentinel_dir: Path, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        lazy_pool.ensure(*args, **kwargs)
    assert_nothing_started(lazy_pool, sentinel_dir)


def test_batch_with_one_undeclared_name_starts_nothing(lazy_pool: Any, sentinel_dir: Path) -> None:
    with pytest.raises(bgpool.WorkerNotDeclared) as info:
        lazy_pool.ensure(["lazy", "nope", "other"], timeout=5)
    assert str(info.value) == 'no background worker configured for name "nope"'
    assert_nothing_started(lazy_pool, sentinel_dir)


def test_valid_forms_are_accepted(lazy_pool: Any, sentinel_dir: Path) -> None:
    lazy_pool.ensure(("lazy",), timeout=5)  # a tuple, an int timeout
    lazy_pool.ensure(["lazy", "other"], timeout=5.5)  # a list, a float timeout
    lazy_pool.ensure("other")  # None: PoolConfig.ensure_timeout
    assert state(the_status(lazy_pool, "lazy").state) == "ready"
    assert state(the_status(lazy_pool, "other").state) == "ready"
    assert len(starts(sentinel_dir / "lazy.starts")) == 1
    assert len(starts(sentinel_dir / "other.starts")) == 1

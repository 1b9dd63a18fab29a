"""What the application declares: `WorkerSpec` and `PoolConfig` (pydantic v2).

Everything a user can get wrong is checked here, when the models are built and
before any process starts, and reported at once with each mistake's field path
(`workers.2.target`). Knows nothing of processes.

Where targets are looked for is `PoolConfig.root`: a relative script path is
resolved against it, and a module target is looked for with root first on the
module search path (then the application's `sys.path`), here as in the code
generations and workers (`supervisor/lifecycle.py`, `_module_path`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import sys
import typing
from collections.abc import Collection, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_core.core_schema import ErrorType

from . import texts
from .names import GLOBAL_SCOPE, Scope, name_problem, pool_name_problem

DEFAULT_MAX_INSTANCES = 16

MIN_LEASE_TTL = 0.5
"""The shortest `lease_ttl`: renewed at a third of it, a lease shorter than this
would leave no time for a Redis round trip and a drain before it expires."""

COORDINATOR_SCHEMES = ("redis://", "rediss://", "unix://")

MAX_LOG_LINES = 10_000_000
"""The most `log_lines` a pool keeps per worker name (a bound, so a typo cannot
ask the supervisor for a ring it cannot make)."""

POLICY_FIELDS = frozenset({"boot_timeout", "heartbeat_timeout", "max_restarts", "restart_window",
                           "max_memory", "max_lifetime", "lifetime_jitter"})  # fmt: skip
"""The `WorkerSpec` fields of the lifecycle policies (supervisor/policies.py)."""

_MODULE_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def target_kind(target: str) -> Literal["module", "script"]:
    """Whether `target` names a `module:function` or a script path."""
    return "script" if target.endswith(".py") else "module"


def _field_error(loc: str | tuple[str | int, ...], kind: str, message: str, value: object) -> Any:
    """One entry of a ValidationError raised by a cross-field check, so it still
    names the field it is about."""
    return {
        "type": PydanticCustomError(kind, message),
        "loc": (loc,) if isinstance(loc, str) else loc,
        "input": value,
    }


_BUILT_IN_ERRORS = frozenset(typing.get_args(ErrorType))


def _line_errors(exc: ValidationError) -> list[Any]:
    """`exc`'s errors, as entries a new ValidationError can be built from
    (pydantic's own kinds as they are; bgpool's kept with their message)."""
    entries: list[Any] = []
    for error in exc.errors():
        entry: dict[str, Any] = {"loc": error["loc"], "input": error["input"]}
        if error["type"] in _BUILT_IN_ERRORS:
            entry.update(type=error["type"], **({"ctx": error["ctx"]} if "ctx" in error else {}))
        else:
            entry.update(type=PydanticCustomError(error["type"], error["msg"]))
        entries.append(entry)
    return entries


_DEFAULT_ROOT: ContextVar[Path | None] = ContextVar("bgpool_default_root", default=None)


@contextlib.contextmanager
def default_root(directory: Path) -> Iterator[None]:
    """Make `directory` the default `PoolConfig.root` of the configs built
    inside the block (`bgpool run` builds its config file's so), instead of
    the current directory."""
    token = _DEFAULT_ROOT.set(directory)
    try:
        yield
    finally:
        _DEFAULT_ROOT.reset(token)


def _default_root_dir() -> Path:
    """`PoolConfig.root` when none is given: `default_root()`'s, else the
    current directory."""
    return _DEFAULT_ROOT.get() or Path.cwd()


def _no_nul(value: str, what: str) -> None:
    if "\0" in value:
        raise ValueError(f"{what} must not contain NUL")


class WorkerSpec(BaseModel):
    """One declaration: a named worker (or a pool of them), or a catch-all.

    `target` is `"package.module:function"` or a path to a `.py` script; `name`
    is the user-facing name, and `None` makes the declaration a catch-all that
    hosts any name `ensure()` asks for in its scope, up to `max_instances`
    (default 16); `num` eager instances (`0`: lazy, one instance on the first
    `ensure()`; more than 1: a pool); `max_consecutive_failures` boot failures
    before the instance is aborted (`-1`: never); `env` and `args` for the
    worker; `scope`; `output` relayed with a prefix or inherited; `ready_on`
    the handle alone or the handle and a first `set_vars()`; `watch`, glob
    patterns of files whose change restarts the worker on new code;
    `requires`, named workers of the same scope that must be ready before it
    starts; the lifecycle policies (`boot_timeout`, `heartbeat_timeout`,
    `max_restarts` within `restart_window`, `max_memory`, `max_lifetime` with
    `lifetime_jitter`), all off by default; `singleton`, one instance across
    every pool that shares the pool's `coordinator` and name (README,
    "Singletons across hosts"). The README's "Declaring workers" has the table.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    target: str
    name: str | None = None
    num: Annotated[int, Field(ge=0)] = 0
    max_instances: Annotated[int, Field(ge=1)] | None = None
    max_consecutive_failures: int = 6
    env: dict[str, str] = Field(default_factory=dict)
    args: list[str] = Field(default_factory=list)
    scope: Scope = GLOBAL_SCOPE
    output: Literal["prefix", "inherit"] = "prefix"
    ready_on: Literal["handle", "vars"] = "handle"
    watch: list[str] = Field(default_factory=list)
    requires: list[str] = Field(default_factory=list)
    # lifecycle policies (SPEC "Lifecycle policies"; README "Lifecycle policies")
    boot_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    heartbeat_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    max_restarts: Annotated[int, Field(ge=0)] | None = None
    restart_window: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    max_memory: Annotated[int, Field(gt=0)] | None = None
    max_lifetime: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    lifetime_jitter: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.1
    singleton: bool = False

    @field_validator("target")
    @classmethod
    def _check_target(cls, target: str) -> str:
        _no_nul(target, "target")
        if target_kind(target) == "module" and not _MODULE_TARGET.match(target):
            raise ValueError(
                "target must be 'package.module:function' or a path to a .py script, "
                f"not {target!r}"
            )
        return target

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str | None) -> str | None:
        if name is not None and (problem := name_problem(name)) is not None:
            raise ValueError(f"name {problem}")
        return name

    @field_validator("max_consecutive_failures")
    @classmethod
    def _check_failures(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("must be -1 (never give up) or at least 1")
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not key or "=" in key:
                raise ValueError(f"environment variable name {key!r} is not valid")
            _no_nul(key, "environment variable names")
            _no_nul(value, f"environment variable {key}")
        return env

    @field_validator("args")
    @classmethod
    def _check_args(cls, args: list[str]) -> list[str]:
        for arg in args:
            _no_nul(arg, "args")
        return args

    @field_validator("watch")
    @classmethod
    def _check_watch(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not pattern.strip():
                raise ValueError("a watch pattern must not be empty")
            _no_nul(pattern, "watch patterns")
        return patterns

    @field_validator("requires")
    @classmethod
    def _check_requires(cls, names: list[str]) -> list[str]:
        for name in names:
            if (problem := name_problem(name)) is not None:
                raise ValueError(f"a required name {problem}")
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(texts.required_twice(twice))
        return names

    @model_validator(mode="after")
    def _check_kind(self) -> WorkerSpec:
        errors = []
        if self.name is None and self.num != 0:
            errors.append(_field_error(
                "num", "catch_all_num", "num must be 0 on a catch-all (name=None): "
                "it starts one instance per name on ensure()", self.num,
            ))  # fmt: skip
        if self.name is not None and self.max_instances is not None:
            errors.append(_field_error(
                "max_instances", "named_max_instances",
                "max_instances applies only to a catch-all (name=None)", self.max_instances,
            ))  # fmt: skip
        if self.name is not None and self.name in self.requires:
            errors.append(_field_error(
                "requires", "requires_itself", texts.requires_itself(self.name), self.requires,
            ))  # fmt: skip
        if self.singleton and (self.name is None or self.num > 1):
            errors.append(_field_error(
                "singleton", "singleton_shape",
                "a singleton is one named instance: it needs a name and num 0 or 1",
                self.singleton,
            ))  # fmt: skip
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def policies(self) -> dict[str, Any]:
        """The lifecycle policies' fields, as the supervisor receives them."""
        return self.model_dump(include=set(POLICY_FIELDS))

    @property
    def instance_cap(self) -> int:
        """How many table slots the declaration needs: its instances, or for a
        catch-all the number of names it may host."""
        if self.name is None:
            return self.max_instances or DEFAULT_MAX_INSTANCES
        return max(self.num, 1)


def _finite(value: float, *, positive: bool) -> float:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError("must be a finite number " + ("> 0" if positive else ">= 0"))
    return value


class PoolConfig(BaseModel):
    """A pool's declarations and settings. Building it checks every target exists.

    `name` makes the pool findable by name (its socket at a fixed place, see
    `bgpool.naming`) and unique: a second pool of that name cannot start.
    `coordinator` (a Redis URL) and `lease_ttl` are for singleton workers: the
    pools sharing both the coordinator and the name run each singleton once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: list[WorkerSpec]
    ensure_timeout: float = 30.0
    grace_period: float = 30.0
    restart_grace_period: float = 6.0
    start_method: Literal["fork", "spawn"] = "fork"
    root: Path = Field(default_factory=_default_root_dir)
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    metrics_host: str = "127.0.0.1"
    max_vars_bytes: Annotated[int, Field(ge=1)] = 1048576
    log_lines: Annotated[int, Field(ge=0, le=MAX_LOG_LINES)] = 1000
    name: str | None = None
    coordinator: str | None = None
    lease_ttl: Annotated[float, Field(ge=MIN_LEASE_TTL)] = 10.0

    _scripts: dict[int, Path] = PrivateAttr(default_factory=dict)

    @field_validator("ensure_timeout")
    @classmethod
    def _check_timeout(cls, value: float) -> float:
        return _finite(value, positive=True)

    @field_validator("grace_period", "restart_grace_period")
    @classmethod
    def _check_grace(cls, value: float) -> float:
        return _finite(value, positive=False)

    @field_validator("lease_ttl")
    @classmethod
    def _check_ttl(cls, value: float) -> float:
        return _finite(value, positive=True)

    @field_validator("coordinator")
    @classmethod
    def _check_coordinator(cls, url: str | None) -> str | None:
        if url is None:
            return None
        _no_nul(url, "coordinator")
        if not url.startswith(COORDINATOR_SCHEMES):
            raise ValueError(
                "coordinator must be a Redis URL (redis://host:port/db, rediss://..., "
                f"unix:///path), not {url!r}"
            )
        try:
            found = importlib.util.find_spec("redis") is not None
        except (ImportError, ValueError):  # a broken install, or an import blocked on purpose
            found = False
        if not found:
            raise ValueError(
                "a coordinator needs the Redis client, which is not installed: "
                "pip install 'bgpool[redis]'"
            )
        return url

    @field_validator("root", mode="before")
    @classmethod
    def _default_root(cls, root: object) -> object:
        return _default_root_dir() if root is None else root

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str | None) -> str | None:
        if name is not None and (problem := pool_name_problem(name)) is not None:
            raise ValueError(f"name {problem}")
        return name

    @field_validator("root")
    @classmethod
    def _check_root(cls, root: Path) -> Path:
        if not root.is_dir():
            raise ValueError(f"root {str(root)!r} is not a directory")
        return root.resolve()

    @model_validator(mode="wrap")
    @classmethod
    def _check_pool(cls, data: Any, handler: ModelWrapValidatorHandler[PoolConfig]) -> PoolConfig:
        """Check what spans declarations (a name declared twice, a target that
        does not exist) along with every field, and report it all in one
        ValidationError: even when a field is wrong, the declarations (and the
        root) that are valid on their own are checked across too."""
        try:
            config = handler(data)
        except ValidationError as exc:
            workers, root, invalid = cls._valid_parts(data)
            given = data if isinstance(data, dict) else {}
            errors = _line_errors(exc) + _check_across(workers, root, {}, invalid)
            errors += _check_singletons(workers, given.get("coordinator"), given.get("name"))
            errors.sort(key=lambda e: (e["loc"][:1] != ("workers",), e["loc"][1:2]))  # stable
            raise ValidationError.from_exception_data(cls.__name__, errors) from None
        errors = _check_across(list(enumerate(config.workers)), config.root, config._scripts)
        errors += _check_singletons(list(enumerate(config.workers)), config.coordinator,
                                    config.name)  # fmt: skip
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return config

    @classmethod
    def _valid_parts(cls, data: Any) -> tuple[list[tuple[int, WorkerSpec]], Path | None, set[str]]:
        """What of a PoolConfig's input that failed is valid on its own: the
        declarations, by index, and the root (None if it is not valid); and
        the names the invalid declarations give (a requirement naming one is
        not reported as undeclared)."""
        if not isinstance(data, dict):
            return [], None, set()
        workers = []
        invalid: set[str] = set()
        entries = data.get("workers")
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            try:
                workers.append((index, WorkerSpec.model_validate(entry)))
            except ValidationError:
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    invalid.add(entry["name"])
        value = data.get("root")
        try:
            root = _default_root_dir() if value is None else cls._check_root(Path(value))
        except (TypeError, ValueError):
            root = None
        return workers, root, invalid

    def worker_messages(self) -> list[dict[str, Any]]:
        """The declarations as the supervisor receives them (plain data)."""
        return [
            {
                "index": index,
                "name": spec.name,
                "target": spec.target,
                "script": str(self._scripts[index]) if index in self._scripts else None,
                "num": spec.num,
                "cap": spec.instance_cap,
                "max_failures": spec.max_consecutive_failures,
                "env": spec.env,
                "args": spec.args,
                "scope_id": spec.scope.id,
                "scope_label": spec.scope.label,
                "output": spec.output,
                "ready_on": spec.ready_on,
                "watch": spec.watch,
                "requires": spec.requires,
                **spec.policies(),
                "singleton": spec.singleton,
            }
            for index, spec in enumerate(self.workers)
        ]

    def settings_message(self) -> dict[str, Any]:
        """The pool-wide settings the supervisor acts on (plain data)."""
        return {
            "ensure_timeout": self.ensure_timeout,
            "grace_period": self.grace_period,
            "restart_grace_period": self.restart_grace_period,
            "start_method": self.start_method,
            "max_vars_bytes": self.max_vars_bytes,
            "log_lines": self.log_lines,
            "root": str(self.root),
            "name": self.name,
            "coordinator": self.coordinator,
            "lease_ttl": self.lease_ttl,
        }

    def script_path(self, index: int) -> Path | None:
        """The absolute path of declaration `index`'s script target, if it is one."""
        return self._scripts.get(index)


def _check_singletons(
    workers: list[tuple[int, WorkerSpec]], coordinator: object, name: object
) -> list[Any]:
    """What singletons need of the pool: a coordinator to hold their leases,
    and a pool name, which (with the coordinator) says which pools share them."""
    errors = [
        _field_error(
            ("workers", index, "singleton"), "singleton_without_coordinator",
            "a singleton needs PoolConfig.coordinator (a Redis URL) to hold its lease",
            True,
        )
        for index, spec in workers
        if spec.singleton and coordinator is None
    ]  # fmt: skip
    if coordinator is not None and name is None:
        errors.append(_field_error(
            "name", "coordinator_without_name",
            "a pool with a coordinator needs a name: the pools that share the "
            "coordinator and the name share their singletons", None,
        ))  # fmt: skip
    return errors


def _check_across(
    workers: list[tuple[int, WorkerSpec]],
    root: Path | None,
    scripts: dict[int, Path],
    invalid: Collection[str] = (),
) -> list[Any]:
    """The mistakes that span declarations: a name (or a scope's catch-all)
    declared twice, a target that cannot be found under `root` (not looked
    for without one), a requirement that is undeclared (unless an invalid
    declaration, `invalid`, gives its name) or part of a cycle. Fills
    `scripts` with each script target's absolute path."""
    errors: list[Any] = []

    def fail(index: int, field: str, kind: str, message: str, value: object) -> None:
        errors.append(_field_error(("workers", index, field), kind, message, value))

    named: dict[tuple[Scope, str], int] = {}
    catch_alls: dict[Scope, int] = {}
    for index, spec in workers:
        if spec.name is None:
            if spec.scope in catch_alls:
                fail(
                    index,
                    "name",
                    "duplicate_catch_all",
                    f"a second catch-all in scope {spec.scope!r}; the first is "
                    f"workers.{catch_alls[spec.scope]}",
                    None,
                )
            catch_alls.setdefault(spec.scope, index)
        else:
            key = (spec.scope, spec.name)
            if key in named:
                fail(
                    index,
                    "name",
                    "duplicate_name",
                    f'worker "{spec.name}" is already declared in this scope '
                    f"(workers.{named[key]})",
                    spec.name,
                )
            named.setdefault(key, index)
        problem = _locate(index, spec.target, root, scripts) if root is not None else None
        if problem is not None:
            fail(index, "target", "target_not_found", problem, spec.target)
    return errors + _check_requirements(workers, named, invalid)


def _check_requirements(
    workers: list[tuple[int, WorkerSpec]],
    named: dict[tuple[Scope, str], int],
    invalid: Collection[str],
) -> list[Any]:
    """`requires` across declarations: each name a named declaration of the
    same scope (with the closest such names if not), and no cycle among them
    (each cycle reported once, in order, from its first declaration)."""
    errors: list[Any] = []
    edges: dict[int, list[int]] = {}  # declaration index: those it requires
    for index, spec in workers:
        found = []
        for name in spec.requires:
            if (spec.scope, name) in named:
                found.append(named[(spec.scope, name)])
            elif name not in invalid:
                close = texts.closest(name, [n for s, n in named if s == spec.scope], 3)
                text = texts.unknown_requirement(name, close)
                errors.append(_field_error(("workers", index, "requires"), "unknown_requirement",
                                           text, spec.requires))  # fmt: skip
        if spec.name is not None and named.get((spec.scope, spec.name)) == index:
            edges[index] = [i for i in found if i != index]  # itself: WorkerSpec said so
    specs = dict(workers)
    for cycle in _cycles(edges):
        text = texts.requirement_cycle([str(specs[i].name) for i in cycle])
        errors.append(_field_error(("workers", cycle[0], "requires"), "requirement_cycle", text,
                                   specs[cycle[0]].requires))  # fmt: skip
    return errors


def _cycles(edges: dict[int, list[int]]) -> list[list[int]]:
    """Cycles of the graph `edges`, each once, as a path that starts at its
    lowest node and ends where it started: `[0, 1, 2, 0]`. Every node that is
    left once those without requirements are peeled away (repeatedly) is on a
    cycle or leads to one; one cycle is walked from the lowest, taken out, and
    the rest peeled again, until nothing is left."""
    remaining = {node: [n for n in targets if n in edges] for node, targets in edges.items()}
    found: list[list[int]] = []
    while True:
        peeled = True
        while peeled:
            free = [node for node, targets in remaining.items()
                    if not any(n in remaining for n in targets)]  # fmt: skip
            peeled = bool(free)
            for node in free:
                del remaining[node]
        if not remaining:
            return found
        path = [min(remaining)]
        while path[-1] not in path[:-1]:
            path.append(next(n for n in remaining[path[-1]] if n in remaining))
        cycle = path[path.index(path[-1]) : -1]
        start = cycle.index(min(cycle))
        cycle = cycle[start:] + cycle[:start]
        found.append([*cycle, cycle[0]])
        for node in cycle:
            del remaining[node]


def _locate(index: int, target: str, root: Path, scripts: dict[int, Path]) -> str | None:
    """Check that `target` exists under `root`; remember a script's absolute path."""
    if target_kind(target) == "script":
        path = (root / target).resolve()
        if not path.is_file():
            return f"script {str(path)!r} does not exist"
        scripts[index] = path
        return None
    module = target.partition(":")[0]
    # Looked for as a worker will: root first on the path (parent packages are
    # imported to find a submodule, as importlib.util.find_spec does).
    sys.path.insert(0, str(root))
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as exc:
        return f"module {module!r} cannot be found: {exc}"
    finally:
        sys.path.remove(str(root))
    return None if found else f"module {module!r} cannot be found"

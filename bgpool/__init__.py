"""bgpool: supervised background workers beside a Python application.

Declare workers with `WorkerSpec` / `PoolConfig`, run them with `Pool`, reach them
from any process with `connect()`; inside a worker, `get_worker_handle()` is the
readiness signal and the stop signal. See README.md.

The names that need pydantic (the declarations, `Pool`, the reporting models) are
imported on first use, so a worker or the supervisor that never touches them
does not pay for the import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BgpoolError,
    CatchAllLimitReached,
    EnsureTimeout,
    PoolClosed,
    StartupError,
    VarsNotPublished,
    WorkerAborted,
    WorkerBootFailed,
    WorkerNotDeclared,
)
from .identity import WorkerInfo, current_worker
from .names import GLOBAL_SCOPE, Scope, next_scope
from .worker.handle import WorkerHandle, get_worker_handle, set_vars

if TYPE_CHECKING:
    from . import metrics as metrics
    from .app.client import PoolClient, connect, get_vars
    from .app.pool import Pool
    from .declarations import PoolConfig, WorkerSpec
    from .models import ErrorInfo, LogLine, ReloadReport, WorkerDiagnostics, WorkerStatus
    from .shm.snapshot import Vars

_LAZY = {
    "Pool": "app.pool",
    "PoolClient": "app.client",
    "connect": "app.client",
    "get_vars": "app.client",
    "PoolConfig": "declarations",
    "WorkerSpec": "declarations",
    "ErrorInfo": "models",
    "LogLine": "models",
    "ReloadReport": "models",
    "WorkerDiagnostics": "models",
    "WorkerStatus": "models",
    "Vars": "shm.snapshot",
}

__all__ = [
    "GLOBAL_SCOPE",
    "BgpoolError",
    "CatchAllLimitReached",
    "EnsureTimeout",
    "ErrorInfo",
    "LogLine",
    "Pool",
    "PoolClient",
    "PoolClosed",
    "PoolConfig",
    "ReloadReport",
    "Scope",
    "StartupError",
    "Vars",
    "VarsNotPublished",
    "WorkerAborted",
    "WorkerBootFailed",
    "WorkerDiagnostics",
    "WorkerHandle",
    "WorkerInfo",
    "WorkerNotDeclared",
    "WorkerSpec",
    "WorkerStatus",
    "connect",
    "current_worker",
    "get_vars",
    "get_worker_handle",
    "next_scope",
    "set_vars",
]


_SUBMODULES = frozenset({"metrics"})
"""Public submodules reachable as attributes after `import bgpool` alone
(`bgpool.metrics.collector(...)`), imported on first use."""


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # which sets the attribute
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bgpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES])

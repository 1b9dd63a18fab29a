"""The exception hierarchy of bgpool.

Every error the library raises on purpose derives from `BgpoolError`. Errors that
explain a worker's failure carry `.diagnostics` (a `WorkerDiagnostics`, or a list of
them for errors that concern several workers), so a caller can log or inspect
the structured data behind the message instead of parsing it.

This module imports nothing else from bgpool, so any module may import it.
"""

from __future__ import annotations

from typing import Any


class BgpoolError(RuntimeError):
    """Base class of every error bgpool raises on purpose."""


class WorkerNotDeclared(BgpoolError, LookupError):
    """No declaration matches the name in the resolved scope (no named worker,
    and no catch-all to host it)."""


class CatchAllLimitReached(BgpoolError):
    """The scope's catch-all already hosts `max_instances` distinct names; unlike
    `WorkerNotDeclared`, the name would be valid if a place were free."""


class _WithDiagnostics(BgpoolError):
    """An error that explains one or more workers' failures with diagnostics."""

    def __init__(self, message: str, diagnostics: Any = None) -> None:
        super().__init__(message)
        self.diagnostics = diagnostics


class EnsureTimeout(_WithDiagnostics, TimeoutError):
    """`ensure()`'s deadline passed while a worker was still not ready. The worker
    may still become ready later: its supervision goes on."""


class WorkerBootFailed(_WithDiagnostics):
    """A worker failed to boot and the caller asked to hear about it at once
    (`fail_fast=True`). The supervisor keeps retrying unless it was aborted."""


class WorkerAborted(WorkerBootFailed):
    """A worker reached `max_consecutive_failures` boot failures and was given up;
    a later `ensure()` starts it afresh."""


class StartupError(_WithDiagnostics):
    """`Pool.start()` could not bring every eager worker up; nothing was left
    running. `.diagnostics` lists the workers that failed."""


class PoolClosed(BgpoolError):
    """The pool is shutting down or closed (including when its supervisor died),
    so it can start or ensure nothing."""


class VarsNotPublished(BgpoolError, LookupError):
    """`get_vars()` for a declared worker that has not called `set_vars()` yet."""


ERRORS: dict[str, type[BgpoolError]] = {
    cls.__name__: cls
    for cls in (
        BgpoolError,
        WorkerNotDeclared,
        CatchAllLimitReached,
        EnsureTimeout,
        WorkerBootFailed,
        WorkerAborted,
        StartupError,
        PoolClosed,
        VarsNotPublished,
    )
}
"""Error classes by name: how an error crosses the control socket as data."""

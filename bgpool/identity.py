"""Who this process is: a worker's name, scope and instance, or nobody.

Set once by the worker runtime in a new worker process, before the target runs;
read by the worker API (`current_worker()`) and by clients, because `ensure()`
called from inside a worker resolves names in that worker's own scope. Kept apart
from the worker-side modules so application-side code can ask without importing
them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerInfo:
    """Who the current worker is: `name` as it was ensured (a catch-all instance
    sees the name it hosts), `scope` label (`""` for the global scope),
    `instance` index within a pool (from 0), and for a singleton the fencing
    token of the lease it runs under (`lease_token`, None otherwise: a larger
    one means a later holder, see the README's "Singletons across hosts")."""

    name: str
    scope: str
    instance: int
    lease_token: int | None = None


_current: tuple[WorkerInfo, int] | None = None


def current_worker() -> WorkerInfo | None:
    """The current worker's identity, or None outside a bgpool worker."""
    return _current[0] if _current is not None else None


def own_scope_id() -> int | None:
    """The scope id of the current worker (for `ensure()` from inside a worker)."""
    return _current[1] if _current is not None else None


def assume(info: WorkerInfo, scope_id: int) -> None:
    """Make this process the worker `info` (the runtime calls it after fork)."""
    global _current
    _current = (info, scope_id)

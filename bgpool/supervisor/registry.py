"""Which declaration answers a name: (scope, name) to a named declaration or a
scope's catch-all. Pure: no processes, no I/O.

Lives in the supervisor, which receives the declarations as plain data (`Decl`)
and is the authority on resolution; clients only cache its answers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import texts

GLOBAL_SCOPE_ID = 0


@dataclass
class Decl:
    """The supervisor's view of one `WorkerSpec`."""

    index: int
    name: str | None
    target: str
    script: str | None
    num: int
    cap: int
    max_failures: int
    env: dict[str, str]
    args: list[str]
    scope_id: int
    scope_label: str
    output: str = "prefix"
    ready_on: str = "handle"
    watch: list[str] = field(default_factory=list)
    requires: list[str] = field(default_factory=list)  # named workers of its scope
    # lifecycle policies (policies.py, recycling.py); None: off
    boot_timeout: float | None = None
    heartbeat_timeout: float | None = None
    max_restarts: int | None = None
    restart_window: float = 60.0
    max_memory: int | None = None
    max_lifetime: float | None = None
    lifetime_jitter: float = 0.1
    singleton: bool = False  # one instance across the pools sharing the coordinator
    hosted: set[str] = field(default_factory=set)  # catch-all: names it hosts now

    @property
    def label(self) -> str:
        """How messages name the declaration: `name`, `label:name`, `*` for a catch-all."""
        name = self.name if self.name is not None else "*"
        return f"{self.scope_label}:{name}" if self.scope_label else name

    @property
    def eager(self) -> bool:
        """Whether `start()` starts it (a named declaration with num >= 1)."""
        return self.name is not None and self.num >= 1

    def fields(self) -> tuple[Any, ...]:
        """What the declaration says, as a value: two declarations that compare
        equal here run the same workers the same way."""
        skip = {"index", "hosted"}
        return tuple(
            repr(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skip
        )

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> Decl:
        """Build from the JSON the application sent."""
        return cls(**data)


class Registry:
    """All declarations, indexed for resolution."""

    def __init__(self, decls: list[Decl]) -> None:
        self.decls = decls
        self.named: dict[tuple[int, str], Decl] = {}
        self.catch_alls: dict[int, Decl] = {}
        for decl in decls:
            if decl.name is None:
                self.catch_alls[decl.scope_id] = decl
            else:
                self.named[(decl.scope_id, decl.name)] = decl
        # table slots it takes at most: each named instance, each catch-all name
        self.slots_needed = sum(decl.cap for decl in decls)
        self.scopes = {decl.scope_id: decl.scope_label for decl in decls}

    def effective_scope(self, scope_id: int) -> int:
        """A scope that declares no workers falls back to the global scope."""
        return scope_id if scope_id in self.scopes else GLOBAL_SCOPE_ID

    def resolve(self, scope_id: int, name: str) -> Decl | None:
        """The declaration serving `name` in `scope_id` (after fallback): the named
        one, else the scope's catch-all, else None."""
        scope_id = self.effective_scope(scope_id)
        return self.named.get((scope_id, name)) or self.catch_alls.get(scope_id)

    def close_names(self, scope_id: int, name: str) -> list[str]:
        """The names declared in `scope_id` (after fallback) closest to
        `name`, best first (at most three), for WorkerNotDeclared's did-you-mean."""
        scope_id = self.effective_scope(scope_id)
        return texts.closest(name, [n for sid, n in self.named if sid == scope_id], 3)

    def scope_by_label(self, label: str) -> int | None:
        """The declared scope with this label, if exactly one has it."""
        matches = [sid for sid, lab in self.scopes.items() if lab == label]
        if not matches and label == "":
            return GLOBAL_SCOPE_ID
        return matches[0] if len(matches) == 1 else None

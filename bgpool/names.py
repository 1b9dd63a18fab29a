"""Rules for worker names and scope labels, shared by declarations and `ensure()`.

A name travels into the shared-memory table (a fixed 128-byte field), metric
labels and log lines, so it is checked once, at the boundary, before it reaches
any of them: a truncated or control-character-laden name would no longer match
what the caller asked for, or would forge a log line.
"""

from __future__ import annotations

import _thread
import itertools
import unicodedata

_UNPRINTABLE = frozenset({"Cc", "Zl", "Zp"})  # C0, DEL, C1 controls; U+2028, U+2029

MAX_NAME_BYTES = 128
MAX_LABEL_BYTES = 128


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a worker name, or None when it can."""
    if not name:
        return "must not be empty"
    if "\0" in name:
        return "must not contain NUL"
    if any(unicodedata.category(c) in _UNPRINTABLE for c in name):
        return "must not contain control characters or line separators"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"must be at most {MAX_NAME_BYTES} UTF-8 bytes"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (no lone surrogates)"
    return None


def pool_name_problem(name: str) -> str | None:
    """Why `name` cannot be a pool's name (`PoolConfig.name`), or None when it
    can: a worker name that can also be one directory's name, since it names
    the directory of the pool's socket."""
    if "/" in name:
        return "must not contain '/' (it names a directory)"
    if name in (".", ".."):
        return "must not be '.' or '..' (it names a directory)"
    return name_problem(name)


def label_problem(label: str) -> str | None:
    """Why `label` cannot be a scope label, or None when it can."""
    if ":" in label:
        return "must not contain ':' (it separates scope and name in metric labels)"
    if label and (problem := name_problem(label)) is not None:
        return problem
    return None


class Scope:
    """An isolation scope: the same worker name may be declared once per scope.

    Opaque to users: compare scopes with `==`; `label` is for display and metric
    labels only, and two scopes may share a label.
    """

    __slots__ = ("id", "label")

    id: int
    label: str

    def __init__(self, scope_id: int, label: str = "") -> None:
        object.__setattr__(self, "id", scope_id)
        object.__setattr__(self, "label", label)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("Scope is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scope) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("bgpool.Scope", self.id))

    def __repr__(self) -> str:
        return "GLOBAL_SCOPE" if self.id == 0 else f"Scope({self.id}, {self.label!r})"


GLOBAL_SCOPE = Scope(0, "")

_scope_ids = itertools.count(1)
_scope_lock = _thread.allocate_lock()  # not threading's: worker/handle.py says why


def next_scope(label: str = "") -> Scope:
    """A fresh scope, distinct from every other scope of this process.

    Raises `ValueError` for a label containing ':' (it would break the
    `m#<scope-label>:<name>` metric label) or control characters.
    """
    if not isinstance(label, str):
        raise TypeError(f"scope label must be a str, not {type(label).__name__}")
    if (problem := label_problem(label)) is not None:
        raise ValueError(f"scope label {label!r} {problem}")
    with _scope_lock:
        return Scope(next(_scope_ids), label)

"""The format of published vars: what `set_vars()` accepts and what `get_vars()`
returns. Pure: no I/O.

Allowed values: None, bool, int, float, str, bytes, lists, tuples and dicts with
str keys, nested (exact types: a subclass such as an IntEnum member is refused,
so every reader gets back exactly what the checks allowed).

Encoding is `marshal` of the validated value (C speed both ways). A reader never
trusts the bytes: `thaw()` rebuilds the value and refuses any type outside the
list above, so nothing a worker publishes can make a reader run code or hand it
an unexpected object. What a reader gets is deeply read-only: mappings are
`MappingProxyType`s, sequences tuples.
"""

from __future__ import annotations

import marshal
from types import MappingProxyType
from typing import Any

SCALARS = frozenset({type(None), bool, int, float, str, bytes})
_SEQUENCES = (list, tuple)
_STR = frozenset({str})
_LARGE = 32  # above this size, checking a set of element types beats a loop


class SnapshotError(ValueError):
    """The bytes of a snapshot do not decode to an allowed value."""


def check(value: object) -> None:
    """Raise `TypeError` naming the first disallowed value's path, e.g.
    `vars["routes"][3]: values of type Foo are not allowed`."""
    if type(value) is not dict:
        raise TypeError(f"vars must be a dict with str keys, not {type(value).__name__}")
    if not _valid(value):
        path, culprit = _find(value, "vars")
        raise TypeError(f"{path}: {culprit}")


def _valid(value: Any) -> bool:
    """Whether `value` holds only allowed types. Large containers of scalars are
    checked by C code (a set of their element types); small ones by a loop,
    which is cheaper below `_LARGE` elements."""
    kind = type(value)
    if kind is dict:
        if len(value) > _LARGE:
            if not set(map(type, value)) <= _STR:
                return False
            if set(map(type, value.values())) <= SCALARS:
                return True
        for key, item in value.items():
            if type(key) is not str or (type(item) not in SCALARS and not _valid(item)):
                return False
        return True
    if kind is list or kind is tuple:
        if len(value) > _LARGE and set(map(type, value)) <= SCALARS:
            return True
        for item in value:  # noqa: SIM110 - a loop is twice as fast as all() here
            if type(item) not in SCALARS and not _valid(item):
                return False
        return True
    return kind in SCALARS


def _find(value: Any, path: str) -> tuple[str, str]:
    """The path of the first disallowed value under `value` and why (slow, only
    run to explain a refusal)."""
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                return path, f"keys must be str, not {type(key).__name__} ({key!r})"
            if not (type(item) in SCALARS or _valid(item)):
                return _find(item, f"{path}[{key!r}]")
    elif type(value) in _SEQUENCES:
        for index, item in enumerate(value):
            if not (type(item) in SCALARS or _valid(item)):
                return _find(item, f"{path}[{index}]")
    return path, f"values of type {type(value).__qualname__} are not allowed"


def encode(value: dict[str, Any]) -> bytes:
    """The bytes to publish for a checked `value`."""
    return marshal.dumps(value)


def decode(data: bytes) -> MappingProxyType[str, Any]:
    """A read-only value from published bytes; `SnapshotError` if they are not a
    snapshot this module produced."""
    try:
        value = marshal.loads(data)
    except (EOFError, ValueError, TypeError) as exc:
        raise SnapshotError(f"unreadable snapshot: {exc}") from None
    if type(value) is not dict:
        raise SnapshotError("a snapshot must be a dict")
    frozen = thaw(value)
    assert isinstance(frozen, MappingProxyType)
    return frozen


def thaw(value: Any) -> Any:
    """`value` made deeply read-only; refuses anything outside the allowed types."""
    kind = type(value)
    if kind is dict:
        if len(value) > _LARGE and set(map(type, value.values())) <= SCALARS:
            if not set(map(type, value)) <= _STR:
                raise SnapshotError("snapshot keys must be str")
            return MappingProxyType(value)
        frozen = {}
        for key, item in value.items():
            if type(key) is not str:
                raise SnapshotError("snapshot keys must be str")
            frozen[key] = item if type(item) in SCALARS else thaw(item)
        return MappingProxyType(frozen)
    if kind is list or kind is tuple:
        if len(value) > _LARGE and set(map(type, value)) <= SCALARS:
            return tuple(value)
        return tuple([item if type(item) in SCALARS else thaw(item) for item in value])
    if kind in SCALARS:
        return value
    raise SnapshotError(f"a snapshot cannot hold {kind.__name__}")

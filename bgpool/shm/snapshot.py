"""The format of published vars: what `set_vars()` accepts and what `get_vars()`
returns. Pure: no I/O.

Allowed values: None, bool, int, float, str, bytes, lists, tuples and dicts with
str keys, nested up to `MAX_DEPTH` containers deep (exact types: a subclass such
as an IntEnum member is refused, so every reader gets back exactly what the
checks allowed).

The bytes are bgpool's own format, encoded and decoded in C (`_codec.c` says
why and describes it). It can express only the allowed types, so nothing a
worker publishes can make a reader run code or hand it an unexpected object.
What a reader gets is deeply read-only: mappings are `Vars` (a read-only
`Mapping` that builds its dict on first read, so a reader pays only for what it
reads), sequences tuples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import _codec

MAX_DEPTH = _codec.MAX_DEPTH
Vars = _codec.Vars
Mapping.register(Vars)


class SnapshotError(ValueError):
    """The bytes of a snapshot do not decode to an allowed value."""


def encode(value: object) -> bytes:
    """The bytes to publish for `value`. A disallowed value raises `TypeError`
    naming its path, e.g. `vars['routes'][3]: values of type Foo are not
    allowed`; nesting deeper than `MAX_DEPTH` raises `ValueError`."""
    if type(value) is not dict:
        raise TypeError(f"vars must be a dict with str keys, not {type(value).__name__}")
    try:
        return _codec.encode(value)
    except TypeError as exc:
        if len(exc.args) != 2 or type(exc.args[1]) is not tuple:
            raise  # not a refusal: the codec says (reason, path) for those
        reason, path = exc.args
        raise TypeError(f"{_path(path)}: {reason}") from None


def _path(segments: Sequence[object]) -> str:
    return "vars" + "".join(f"[{segment!r}]" for segment in segments)


def decode(data: bytes) -> Vars:
    """The read-only value of published bytes, all of them checked first;
    `SnapshotError` if they are not a snapshot this module produced."""
    try:
        return _codec.decode(data)
    except ValueError as exc:
        raise SnapshotError(f"unreadable snapshot: {exc}") from None

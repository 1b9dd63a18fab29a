"""The readiness table: a shared-memory segment, one fixed-size slot per worker
instance, written by the supervisor alone and read by any process of the
application without a system call.

Layout: a 64-byte header, then `nslots` slots of `SLOT.size` bytes. A name's
instances occupy consecutive slots; the first (instance 0) is the name's
*primary* slot and carries the name-level `name_ready` flag that `ensure()`'s
fast path reads. The header also says how many slots are in use (every used
slot lies below that count: readers scan what is hosted, not what a catch-all's
cap allows; the segment is sparse, so unused slots cost no memory), and whether
the pool still serves (`Status`): a table outlives its supervisor in every
reader's mapping, and must not go on saying "ready" then.

Consistency: each slot starts with a sequence counter (a seqlock, the one in
`_segment.c` that the vars segments use too). The writer makes it odd, writes
the fields, then makes it even, with barriers; a reader retries while it is
odd or changed under it, so multi-field reads are never torn and nobody takes
a lock across processes. A reader gives up after `STUCK_SECONDS` of an odd
counter (its writer stopped between two stores) with a `BgpoolError` naming
the slot.

Damage: readers trust nothing they read. A header that is not this version's,
a slot count the segment cannot hold, a field out of its range or a name that
is not UTF-8 raise `BgpoolError` saying what is wrong where, never a bare
`ValueError`, `struct.error` or `UnicodeDecodeError`.

Truncation: a process of the same user can truncate the segment, and touching
a mapped page past the file's new end raises SIGBUS, which would kill the
reader. Every access to the table goes through `_segment.c`, whose SIGBUS
guard turns such a fault into an exception at no cost to the hot path (no
system call: see the top of `_segment.c`). A reader gets `BgpoolError` ("the
readiness table ... is truncated (damaged by another process)") from any
read that touches a page the truncation took, `name_ready`, `generation`,
`status` and `in_use` included; a slot on a page it kept reads as zeros (a
free slot, not ready: `ensure()` takes its slow path). `attach()` still
checks the file's size against the header once, before it reads a slot. The
supervisor, the one writer, repairs the table at its next write into it: it
grows the file back and writes again everything the table held (it keeps a
copy), and logs that it did; readers see the table whole again from then on.

Identity: a slot's `gen` changes whenever the slot is handed to another name (a
catch-all place freed and reused), so a reader's cached (slot, gen) never
answers for the wrong name.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import platform
from ..errors import BgpoolError
from ..names import MAX_LABEL_BYTES, MAX_NAME_BYTES
from ..states import State
from . import _segment

_E = TypeVar("_E", bound=enum.IntEnum)

log = logging.getLogger("bgpool")


class Kind(enum.IntEnum):
    """What a slot belongs to."""

    FREE = 0
    NAMED = 1
    CATCH_ALL = 2


MAGIC = b"BGPOOL\x01\x00"
HEADER = struct.Struct("<8sIIIi")  # magic, version, nslots, slot size, supervisor pid
HEADER_SIZE = 64
VERSION = 5  # 3: the in-use count and the status; 4: a 64-bit counter; 5: hangs, recycles
_IN_USE = HEADER.size  # offset of the in-use slot count (u32)
_STATUS = HEADER.size + 4  # offset of the status byte
_DECLARATIONS = HEADER.size + 8  # offset of the declarations' version (u32): reload() bumps it


class Status(enum.IntEnum):
    """Whether a pool still serves, as its table says."""

    SERVING = 0
    SHUTTING_DOWN = 1  # draining: no new work
    CLOSED = 2  # the supervisor is gone


class RecycleReason(enum.IntEnum):
    """Why an instance was last recycled (a graceful restart a policy asked for)."""

    NONE = 0
    MEMORY = 1
    LIFETIME = 2

    @property
    def label(self) -> str | None:
        """`"memory"`, `"lifetime"`, or None: the `reason` label of the recycles metric."""
        return None if self is RecycleReason.NONE else self.name.lower()


BOOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
"""Upper bounds (seconds) of the spawn-to-ready histogram kept per slot."""

_STATUSES: tuple[Status, ...] = (*Status, *[Status.CLOSED] * (256 - len(Status)))
"""The status each value of the status byte means (beyond the known ones: gone)."""

STUCK_SECONDS = _segment.STUCK_SECONDS
"""How long a reader waits for a slot whose counter stays odd before it gives up."""

_FIELDS = (
    ("gen", "I"),  # the slot's identity: _segment.c reads it without the seqlock
    ("name_ready", "B"),  # the name-level flag: so does it
    ("kind", "B"),
    ("state", "B"),
    ("ever_ready", "B"),
    ("has_exit", "B"),  # whether last_exit is set
    ("eager", "B"),  # an eager worker's instance (num >= 1, as declared or scaled)
    ("", "2x"),
    ("scope_id", "Q"),
    ("decl", "H"),  # declaration index
    ("instance", "H"),
    ("pool_size", "H"),
    ("name_len", "H"),
    ("pid", "i"),
    ("attempts", "I"),
    ("failures", "I"),  # consecutive
    ("last_exit", "i"),
    ("crashes", "I"),
    ("restarts", "I"),
    ("hangs", "I"),  # killed for a missed heartbeat
    ("recycles_memory", "I"),  # graceful restarts for max_memory
    ("recycles_lifetime", "I"),  # graceful restarts for max_lifetime
    ("recycle_reason", "B"),  # the latest recycle's (`RecycleReason`)
    ("", "3x"),
    ("started_at", "d"),  # wall clock, 0 = never
    ("ready_at", "d"),  # wall clock, 0 = never
    ("boot_sum", "d"),  # seconds
    ("boot_buckets", f"{len(BOOT_BUCKETS)}I"),  # count per bucket (not cumulative)
    ("name", f"{MAX_NAME_BYTES}s"),
    ("label_len", "H"),
    ("scope_label", f"{MAX_LABEL_BYTES}s"),
)
_BODY = struct.Struct("<" + "".join(code for _, code in _FIELDS))
"""A slot after its sequence counter (which `_segment.c` owns, as the order of
the stores around it)."""

FIELD_OFFSETS = {
    name: _segment.SLOT_BODY + struct.calcsize("<" + "".join(code for _, code in _FIELDS[:i]))
    for i, (name, _) in enumerate(_FIELDS)
    if name
}
"""Where each field lies in a slot."""

if (FIELD_OFFSETS["gen"], FIELD_OFFSETS["name_ready"], _IN_USE, _STATUS) != (
    _segment.SLOT_GEN,
    _segment.SLOT_READY,
    _segment.TABLE_IN_USE,
    _segment.TABLE_STATUS,
):
    raise ImportError("bgpool/shm/table.py and _segment.c disagree on the table's layout")

SLOT = struct.Struct(f"<Q{_BODY.size}s{-(_segment.SLOT_BODY + _BODY.size) % 8}x")
"""A slot: the counter, the body, padding to a multiple of 8 (every counter 8-aligned)."""


@dataclass(frozen=True, slots=True)
class Slot:
    """One instance's published state, as every reader sees it (the defaults
    are a free slot's)."""

    gen: int
    name_ready: bool = False
    kind: Kind = Kind.FREE
    state: State = State.STOPPED
    ever_ready: bool = False
    last_exit: int | None = None
    scope_id: int = 0
    decl: int = 0
    instance: int = 0
    pool_size: int = 0
    pid: int = 0
    attempts: int = 0
    failures: int = 0
    crashes: int = 0
    restarts: int = 0
    hangs: int = 0
    recycles_memory: int = 0
    recycles_lifetime: int = 0
    recycle_reason: RecycleReason = RecycleReason.NONE
    started_at: float = 0.0
    ready_at: float = 0.0
    boot_sum: float = 0.0
    boot_buckets: tuple[int, ...] = (0,) * len(BOOT_BUCKETS)
    name: str = ""
    scope_label: str = ""
    eager: bool = False


def _pack_body(slot: Slot) -> bytes:
    name = slot.name.encode()
    label = slot.scope_label.encode()
    return _BODY.pack(
        slot.gen,
        slot.name_ready, slot.kind, slot.state, slot.ever_ready, slot.last_exit is not None,
        slot.eager,
        slot.scope_id, slot.decl, slot.instance, slot.pool_size, len(name),
        slot.pid, slot.attempts, slot.failures, slot.last_exit or 0, slot.crashes, slot.restarts,
        slot.hangs, slot.recycles_memory, slot.recycles_lifetime, slot.recycle_reason,
        slot.started_at, slot.ready_at, slot.boot_sum, *slot.boot_buckets,
        name, len(label), label,
    )  # fmt: skip


def _text(raw: bytes, length: int, field: str) -> str:
    if length > len(raw):
        raise ValueError(f"its {field} claims {length} bytes, more than the {len(raw)} it has")
    try:
        return raw[:length].decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"its {field} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _member(enum_type: type[_E], value: int) -> _E:
    try:
        return enum_type(value)
    except ValueError:
        known = ", ".join(str(int(member)) for member in enum_type)
        raise ValueError(f"its {enum_type.__name__} byte is {value}, not one of {known}") from None


def _unpack_body(body: bytes) -> Slot:
    """The slot `body` holds; `ValueError` saying which field is out of its range."""
    (gen, name_ready, kind, state, ever_ready, has_exit, eager, scope_id, decl, instance,
     pool_size, name_len, pid, attempts, failures, last_exit, crashes, restarts,
     hangs, recycles_memory, recycles_lifetime, recycle_reason, started_at, ready_at, boot_sum,
     *rest) = _BODY.unpack_from(body)  # fmt: skip
    buckets = tuple(rest[: len(BOOT_BUCKETS)])
    name, label_len, label = rest[len(BOOT_BUCKETS) :]
    return Slot(
        gen=gen, name_ready=bool(name_ready), kind=_member(Kind, kind), state=_member(State, state),
        ever_ready=bool(ever_ready), last_exit=last_exit if has_exit else None,
        scope_id=scope_id, decl=decl, instance=instance, pool_size=pool_size, pid=pid,
        attempts=attempts, failures=failures, crashes=crashes, restarts=restarts,
        hangs=hangs, recycles_memory=recycles_memory, recycles_lifetime=recycles_lifetime,
        recycle_reason=_member(RecycleReason, recycle_reason), started_at=started_at,
        ready_at=ready_at, boot_sum=boot_sum, boot_buckets=buckets,
        name=_text(name, name_len, "name"), scope_label=_text(label, label_len, "scope label"),
        eager=bool(eager),
    )  # fmt: skip


def _offset(index: int) -> int:
    return HEADER_SIZE + index * SLOT.size


class TableReader:
    """Read access to a table, from any process."""

    def __init__(self, name: str, mapping: mmap.mmap, nslots: int) -> None:
        self.name = name
        self.nslots = nslots
        self._map = mapping  # every access to it goes through _segment (its SIGBUS guard)

    @classmethod
    def attach(cls, name: str) -> TableReader:
        """Map table `name` read-only (no resource-tracker registration).
        `BgpoolError` if the segment is not a table this bgpool can read."""
        try:
            mapping = platform.map_shm_readonly(name)
        except ValueError:  # mmap refuses an empty file
            raise BgpoolError(
                f"shared memory segment {name!r} is empty: not a bgpool table"
            ) from None
        try:
            nslots = cls._check_header(name, mapping)
        except BaseException:
            mapping.close()
            raise
        return cls(name, mapping, nslots)

    @staticmethod
    def _check_header(name: str, mapping: mmap.mmap) -> int:
        """The slot count of the table in `mapping`, whose header is checked,
        and whose file must hold every slot the header counts (one fstat: the
        file may have shrunk since it was mapped)."""
        size = min(len(mapping), mapping.size())
        problem = None
        if size < HEADER_SIZE:
            problem = f"it is {size} bytes, smaller than a table's header"
        else:
            try:
                header = _segment.read_bytes(mapping, 0, HEADER_SIZE)
            except _segment.Truncated as exc:  # since the fstat
                raise BgpoolError(
                    f"shared memory segment {name!r} is truncated (damaged by another "
                    f"process): {exc}"
                ) from None
            magic, version, nslots, slot_size, _ = HEADER.unpack_from(header)
            if magic != MAGIC:
                problem = f"it starts with {magic!r}, not {MAGIC!r}"
            elif version != VERSION:
                problem = f"its layout is version {version}: this bgpool reads version {VERSION}"
            elif slot_size != SLOT.size:
                problem = f"its slots are {slot_size} bytes: this bgpool's are {SLOT.size}"
            elif _offset(nslots) > size:
                problem = (
                    f"its header counts {nslots} slots, which take {_offset(nslots)} bytes, "
                    f"but it has {size}"
                )
        if problem is not None:
            raise BgpoolError(f"shared memory segment {name!r} is not a bgpool table: {problem}")
        return int(nslots)

    def _truncated(self, exc: Exception) -> BgpoolError:
        return BgpoolError(
            f"the readiness table {self.name} is truncated (damaged by another process): {exc}"
        )

    def close(self) -> None:
        """Unmap the table; the object must not be used afterwards."""
        self._map.close()

    @staticmethod
    def offset(index: int) -> int:
        """Where slot `index` starts in the segment."""
        return _offset(index)

    @staticmethod
    def index(offset: int) -> int:
        """The slot starting at `offset`."""
        return (offset - HEADER_SIZE) // SLOT.size

    def generation(self, offset: int) -> int:
        """The identity generation of the slot at `offset` (one load).
        `BgpoolError` if the table was truncated under it."""
        try:
            return _segment.slot_generation(self._map, offset)
        except _segment.Truncated as exc:
            raise self._truncated(exc) from None

    def read(self, index: int) -> Slot:
        """Slot `index`, consistently (retries while the writer is in it, for at
        most `STUCK_SECONDS`). `BgpoolError` if the slot stays mid-write, if the
        table was truncated, or if the slot holds nonsense."""
        if not 0 <= index < self.nslots:
            raise IndexError(f"slot {index} is not in a table of {self.nslots}")
        return self._read(index, 1)[0]

    def _read(self, first: int, count: int) -> list[Slot]:
        """Slots `first` to `first + count` (checked to lie in the table)."""
        try:
            bodies = _segment.read_slots(
                self._map, _offset(first), count, SLOT.size, _BODY.size, STUCK_SECONDS
            )
        except TimeoutError as exc:
            raise BgpoolError(
                f"slot {first + exc.args[1]} of the readiness table {self.name} stays mid-write: "
                f"its sequence counter has been odd for {STUCK_SECONDS} s (the supervisor "
                "stopped between two stores, or another process wrote into the table)"
            ) from None
        except _segment.Truncated as exc:
            raise self._truncated(exc) from None
        slots = []
        for index, body in enumerate(bodies, first):
            try:
                slots.append(_unpack_body(body))
            except ValueError as exc:
                raise BgpoolError(
                    f"slot {index} of the readiness table {self.name} is damaged: {exc}"
                ) from None
        return slots

    def in_use(self) -> int:
        """How many slots from the first may be in use (the rest never were; one
        acquire load). `BgpoolError` if the table was truncated."""
        try:
            return min(self.nslots, _segment.in_use(self._map))
        except _segment.Truncated as exc:
            raise self._truncated(exc) from None

    def status(self) -> Status:
        """Whether the pool serves, drains, or is gone (one acquire load).
        `BgpoolError` if the table was truncated."""
        try:
            return _STATUSES[_segment.status(self._map)]
        except _segment.Truncated as exc:
            raise self._truncated(exc) from None

    def declarations(self) -> int:
        """The version of the pool's declarations: it grows with each
        `reload()`, so a reader knows when what it learnt of them (which
        scopes are declared) may be out of date. `BgpoolError` if the table
        was truncated."""
        try:
            return int.from_bytes(_segment.read_bytes(self._map, _DECLARATIONS, 4), "little")
        except _segment.Truncated as exc:
            raise self._truncated(exc) from None

    def slots(self) -> list[Slot]:
        """Every slot that may be in use, in table order (`BgpoolError` as for
        `read`)."""
        return self._read(0, self.in_use())

    def serving(self) -> bool:
        """Whether the pool serves (one acquire load; `BgpoolError` if the
        table was truncated)."""
        try:
            return not _segment.status(self._map)  # Status.SERVING is 0
        except _segment.Truncated as exc:
            raise self._truncated(exc) from None

    def name_ready(self, offset: int, gen: int) -> bool:
        """The hot path of `ensure()`: whether the pool serves and the slot at
        `offset`, still holding generation `gen`, says its name is ready (False
        once the pool drains, so the caller takes its slow path, which says
        why). Three loads, no syscall, no seqlock:
        the flag is read before the generation, a slot whose name was ever ready is
        never handed to another name, and generations only grow, so a set flag
        followed by the expected generation can only be that name's. (The writer
        stores the flag last, and the loads are ordered: `_segment.c`.)
        `BgpoolError` if the table was truncated under it."""
        try:
            return _segment.name_ready(self._map, offset, gen)
        except _segment.Truncated as exc:
            raise self._truncated(exc) from None

    def ready_check(self, offset: int, gen: int) -> Callable[[], bool]:
        """`name_ready(offset, gen)` bound, for `ensure()`'s hot path: one C
        call. It raises `ValueError` once the mapping is closed or truncated
        under it; the caller's slow path then says why."""
        return functools.partial(_segment.name_ready, self._map, offset, gen)

    def vars_check(
        self, offset: int, gen: int, segment: mmap.mmap, vars_gen: int
    ) -> Callable[[], bool]:
        """`get_vars()`'s hot path, bound: a call (one C call, no syscall)
        saying whether the pool serves, the slot at `offset` still holds
        generation `gen` and the vars `segment` still holds `vars_gen`. It
        raises `ValueError` once either mapping is closed or truncated under
        it; the caller's slow path then says why."""
        return functools.partial(_segment.vars_current, self._map, offset, gen, segment, vars_gen)

    def find(self, scope_id: int, name: str) -> tuple[int, int] | None:
        """The primary slot (index, gen) holding `name` in scope `scope_id`
        (`BgpoolError` as for `read`)."""
        for index, slot in enumerate(self.slots()):
            if (
                slot.kind != Kind.FREE
                and slot.instance == 0
                and slot.scope_id == scope_id
                and slot.name == name
            ):
                return index, slot.gen
        return None


def new_name() -> str:
    """A fresh table name, `bgp_` and 16 hex digits (short: some platforms cap
    segment names at 31 bytes, and vars segments add `_v<slot>`). The owner
    picks it, so it can remove the table whatever becomes of the supervisor."""
    return "bgp_" + os.urandom(8).hex()


def mark_closed(name: str) -> None:
    """Say in table `name` that its pool is gone: what the owner does when the
    supervisor died without saying so itself (it writes nothing else)."""
    with contextlib.suppress(FileNotFoundError):
        fd = platform.open_shm(name, create=False)
        try:
            os.pwrite(fd, bytes([Status.CLOSED]), _STATUS)
        finally:
            os.close(fd)


class TableWriter:
    """The supervisor's side: creates, writes and removes the segment.

    It keeps a copy of everything it wrote (the header, each slot's last body,
    the in-use count, the status): when a write faults because another process
    truncated the table, it grows the file back, writes all of it again, logs
    that (the supervisor's log), and goes on. `BgpoolError` only if that fails
    (which the supervisor's loop logs)."""

    def __init__(self, nslots: int, supervisor_pid: int, name: str | None = None) -> None:
        self._size = HEADER_SIZE + max(nslots, 1) * SLOT.size
        self.name = name or new_name()
        self._map = platform.create_shm(self.name, self._size)
        self.nslots = nslots
        self._header = HEADER.pack(MAGIC, VERSION, nslots, SLOT.size, supervisor_pid)
        self._bodies: dict[int, bytes] = {}
        self._in_use = 0
        self._status = Status.SERVING
        self._declarations = 0
        self._store(_segment.write_bytes, self._map, 0, self._header)

    def write(self, index: int, slot: Slot) -> None:
        """Publish slot `index` (seqlock: odd while writing, even when done)."""
        if not 0 <= index < self.nslots:
            raise IndexError(f"slot {index} is not in a table of {self.nslots}")
        body = self._bodies[index] = _pack_body(slot)
        try:  # not _store(): the supervisor's most frequent call, kept short
            _segment.write_slot(self._map, _offset(index), body)
        except _segment.Truncated as exc:
            self._repair(exc)

    def destroy(self) -> None:
        """Unmap and unlink the segment."""
        self._map.close()
        platform.unlink_shm(self.name)

    def use(self, count: int) -> None:
        """Say that slots below `count` may be in use (a release store after
        writing them, so a reader that sees the count sees them written)."""
        if count > self._in_use:
            self._in_use = min(count, self.nslots)
            self._store(_segment.set_in_use, self._map, self._in_use)

    def set_status(self, status: Status) -> None:
        """Say whether the pool serves, drains or is gone (a release store)."""
        self._status = status
        self._store(_segment.set_status, self._map, status)

    def declarations_changed(self) -> None:
        """Say that the declarations changed (a reload): bump their version."""
        self._declarations += 1
        self._store(_segment.write_bytes, self._map, _DECLARATIONS, self._declarations_bytes())

    def _declarations_bytes(self) -> bytes:
        return self._declarations.to_bytes(4, "little")

    def _store(self, store: Callable[..., None], *args: Any) -> None:
        """`store(*args)`, a write into the table, repaired if it faults."""
        try:
            store(*args)
        except _segment.Truncated as exc:
            self._repair(exc)

    def _repair(self, exc: Exception) -> None:
        """Another process truncated the table (`exc` says where a write met
        that): grow its file back, and write everything it held again."""
        try:
            fd = platform.open_shm(self.name, create=False)
            try:
                if os.fstat(fd).st_size < self._size:
                    os.ftruncate(fd, self._size)
            finally:
                os.close(fd)
            for index, body in self._bodies.items():
                _segment.write_slot(self._map, _offset(index), body)
            _segment.set_in_use(self._map, self._in_use)
            _segment.set_status(self._map, self._status)
            _segment.write_bytes(self._map, _DECLARATIONS, self._declarations_bytes())
            _segment.write_bytes(self._map, 0, self._header)  # last: attach() refuses till then
        except (OSError, _segment.Truncated) as failed:
            raise BgpoolError(
                f"the readiness table {self.name} is truncated (damaged by another process: "
                f"{exc}), and cannot be restored: {failed}"
            ) from None
        log.error(
            "the readiness table %s was truncated by another process (a write met it: %s); "
            "it is restored, with every slot written again", self.name, exc,
        )  # fmt: skip

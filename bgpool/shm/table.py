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

Consistency: each slot starts with a sequence counter (a seqlock). The writer
makes it odd, writes the fields, then makes it even; a reader retries while it
is odd or changed under it, so multi-field reads are never torn and nobody
takes a lock across processes.

Identity: a slot's `gen` changes whenever the slot is handed to another name (a
catch-all place freed and reused), so a reader's cached (slot, gen) never
answers for the wrong name.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
import secrets
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any

from .. import platform
from ..names import MAX_LABEL_BYTES, MAX_NAME_BYTES
from ..states import State


class Kind(enum.IntEnum):
    """What a slot belongs to."""

    FREE = 0
    NAMED = 1
    CATCH_ALL = 2


MAGIC = b"BGPOOL\x01\x00"
HEADER = struct.Struct("<8sIIIi")  # magic, version, nslots, slot size, supervisor pid
HEADER_SIZE = 64
VERSION = 3
_WORD = struct.Struct("<I")
_IN_USE = HEADER.size  # offset of the in-use slot count
_STATUS = HEADER.size + _WORD.size  # offset of the status byte


class Status(enum.IntEnum):
    """Whether a pool still serves, as its table says."""

    SERVING = 0
    SHUTTING_DOWN = 1  # draining: no new work
    CLOSED = 2  # the supervisor is gone


BOOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
"""Upper bounds (seconds) of the spawn-to-ready histogram kept per slot."""

_SEQ = struct.Struct("<I")
_BODY = struct.Struct(
    "<I"  # gen
    "BBBBB3x"  # name_ready, kind, state, ever_ready, has_exit
    "Q"  # scope id
    "HHHH"  # declaration index, instance, pool size, name length
    "iIIiII"  # pid, attempts, consecutive failures, last exit status, crashes, restarts
    "ddd"  # started_at, ready_at (wall clock, 0 = never), boot seconds sum
    f"{len(BOOT_BUCKETS)}I"  # boot histogram: count per bucket (not cumulative)
    f"{MAX_NAME_BYTES}sH{MAX_LABEL_BYTES}s"  # name, label length, scope label
)
"""A slot after its sequence counter. Packed separately from the counter because
`struct.pack_into` zeroes its whole target before writing: over the counter, that
would make a half-written slot look consistent to a reader."""

SLOT = struct.Struct(f"<I{_BODY.size}s4x")  # seq, body, padding to a multiple of 8
_GEN = struct.Struct("<4xI")
_READY_AT = 8  # offset of name_ready in a slot


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
    started_at: float = 0.0
    ready_at: float = 0.0
    boot_sum: float = 0.0
    boot_buckets: tuple[int, ...] = (0,) * len(BOOT_BUCKETS)
    name: str = ""
    scope_label: str = ""


def _pack_body(slot: Slot) -> bytes:
    name = slot.name.encode()
    label = slot.scope_label.encode()
    return _BODY.pack(
        slot.gen,
        slot.name_ready, slot.kind, slot.state, slot.ever_ready, slot.last_exit is not None,
        slot.scope_id, slot.decl, slot.instance, slot.pool_size, len(name),
        slot.pid, slot.attempts, slot.failures, slot.last_exit or 0, slot.crashes, slot.restarts,
        slot.started_at, slot.ready_at, slot.boot_sum, *slot.boot_buckets,
        name, len(label), label,
    )  # fmt: skip


def _unpack_body(body: bytes) -> Slot:
    (gen, name_ready, kind, state, ever_ready, has_exit, scope_id, decl, instance,
     pool_size, name_len, pid, attempts, failures, last_exit, crashes, restarts,
     started_at, ready_at, boot_sum, *rest) = _BODY.unpack(body)  # fmt: skip
    buckets = tuple(rest[: len(BOOT_BUCKETS)])
    name, label_len, label = rest[len(BOOT_BUCKETS) :]
    return Slot(
        gen=gen, name_ready=bool(name_ready), kind=Kind(kind), state=State(state),
        ever_ready=bool(ever_ready), last_exit=last_exit if has_exit else None,
        scope_id=scope_id, decl=decl, instance=instance, pool_size=pool_size, pid=pid,
        attempts=attempts, failures=failures, crashes=crashes, restarts=restarts,
        started_at=started_at, ready_at=ready_at, boot_sum=boot_sum, boot_buckets=buckets,
        name=name[:name_len].decode(), scope_label=label[:label_len].decode(),
    )  # fmt: skip


class TableReader:
    """Read access to a table, from any process."""

    def __init__(self, buf: memoryview, nslots: int) -> None:
        self._buf = buf
        self.nslots = nslots

    @classmethod
    def attach(cls, name: str) -> TableReader:
        """Map table `name` read-only (no resource-tracker registration)."""
        mapping = platform.map_shm_readonly(name)
        reader = cls(memoryview(mapping), 0)
        reader._mapping = mapping
        magic, version, nslots, slot_size, _ = HEADER.unpack_from(reader._buf, 0)
        if magic != MAGIC or version != VERSION or slot_size != SLOT.size:
            reader.close()
            raise ValueError(f"shared memory segment {name!r} is not a bgpool table")
        reader.nslots = nslots
        return reader

    _mapping: mmap.mmap | None = None

    def close(self) -> None:
        """Unmap the table; the object must not be used afterwards."""
        self._buf.release()
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None

    @staticmethod
    def offset(index: int) -> int:
        """Where slot `index` starts in the segment."""
        return HEADER_SIZE + index * SLOT.size

    @staticmethod
    def index(offset: int) -> int:
        """The slot starting at `offset`."""
        return (offset - HEADER_SIZE) // SLOT.size

    def generation(self, offset: int) -> int:
        """The identity generation of the slot at `offset` (one load)."""
        return int(_GEN.unpack_from(self._buf, offset)[0])

    def read(self, index: int) -> Slot:
        """Slot `index`, consistently (retries while the writer is in it)."""
        buf, off = self._buf, self.offset(index)
        while True:
            seq = _SEQ.unpack_from(buf, off)[0]
            if seq & 1:
                continue
            body = SLOT.unpack_from(buf, off)[1]
            if _SEQ.unpack_from(buf, off)[0] == seq:
                return _unpack_body(body)

    def in_use(self) -> int:
        """How many slots from the first may be in use (the rest never were)."""
        return min(self.nslots, int(_WORD.unpack_from(self._buf, _IN_USE)[0]))

    def status(self) -> Status:
        """Whether the pool serves, drains, or is gone (one load)."""
        return Status.CLOSED if self._buf[_STATUS] > Status.CLOSED else Status(self._buf[_STATUS])

    def slots(self) -> list[Slot]:
        """Every slot that may be in use, in table order."""
        return [self.read(i) for i in range(self.in_use())]

    def name_ready(self, offset: int, gen: int) -> bool:
        """The hot path of `ensure()`: whether the slot at `offset`, still holding
        generation `gen`, says its name is ready. Two loads, no syscall, no seqlock:
        the flag is read before the generation, a slot whose name was ever ready is
        never handed to another name, and generations only grow, so a set flag
        followed by the expected generation can only be that name's."""
        return self._buf[offset + _READY_AT] == 1 and _GEN.unpack_from(self._buf, offset)[0] == gen

    def find(self, scope_id: int, name: str) -> tuple[int, int] | None:
        """The primary slot (index, gen) holding `name` in scope `scope_id`."""
        for index in range(self.in_use()):
            slot = self.read(index)
            if (
                slot.kind != Kind.FREE
                and slot.instance == 0
                and slot.scope_id == scope_id
                and slot.name == name
            ):
                return index, slot.gen
        return None


def mark_closed(name: str) -> None:
    """Say in table `name` that its pool is gone: what the owner does when the
    supervisor died without saying so itself (it writes nothing else)."""
    with contextlib.suppress(FileNotFoundError):
        fd = platform.open_shm(name, create=False)
        try:
            os.pwrite(fd, bytes([Status.CLOSED]), _STATUS)
        finally:
            os.close(fd)


@contextmanager
def _untracked() -> Iterator[None]:
    """Keep multiprocessing's resource tracker out of segment creation and unlink.

    On Python < 3.13 SharedMemory registers every segment with a tracker process
    that unlinks it, with a "leaked shared_memory" warning, when the registering
    process exits (CPython #82300). The supervisor owns the segment's lifetime
    itself, and is single-threaded, so swapping the hooks around the calls is safe.
    """
    saved = resource_tracker.register, resource_tracker.unregister

    def _skip(name: Any, rtype: str) -> None:
        return None

    resource_tracker.register = resource_tracker.unregister = _skip
    try:
        yield
    finally:
        resource_tracker.register, resource_tracker.unregister = saved


class TableWriter(TableReader):
    """The supervisor's side: creates, writes and removes the segment."""

    def __init__(self, nslots: int, supervisor_pid: int) -> None:
        size = HEADER_SIZE + max(nslots, 1) * SLOT.size
        name = "bgp_" + secrets.token_hex(8)
        if sys.version_info >= (3, 13):
            self._shm = shared_memory.SharedMemory(name, create=True, size=size, track=False)
        else:
            with _untracked():
                self._shm = shared_memory.SharedMemory(name, create=True, size=size)
        self.name = self._shm.name
        assert self._shm.buf is not None
        super().__init__(self._shm.buf, nslots)
        HEADER.pack_into(self._buf, 0, MAGIC, VERSION, nslots, SLOT.size, supervisor_pid)
        self._in_use = 0
        self._seqs = [0] * nslots

    def write(self, index: int, slot: Slot) -> None:
        """Publish slot `index` (seqlock: odd while writing, even when done)."""
        off = self.offset(index)
        seq = self._seqs[index] + 1
        body = _pack_body(slot)
        _SEQ.pack_into(self._buf, off, seq)
        # One copy, not pack_into: pack_into zero-fills its target first, so a
        # reader's lock-free load of an unchanged field (the hot path's flag and
        # generation) could see 0 in passing.
        self._buf[off + _SEQ.size : off + _SEQ.size + _BODY.size] = body
        _SEQ.pack_into(self._buf, off, seq + 1)
        self._seqs[index] = seq + 1

    def destroy(self) -> None:
        """Unmap and unlink the segment."""
        self._buf.release()
        self._shm.close()
        with _untracked(), contextlib.suppress(FileNotFoundError):
            self._shm.unlink()

    def use(self, count: int) -> None:
        """Say that slots below `count` may be in use (after writing them, so a
        reader that sees the count sees them written)."""
        if count > self._in_use:
            self._in_use = min(count, self.nslots)
            _WORD.pack_into(self._buf, _IN_USE, self._in_use)

    def set_status(self, status: Status) -> None:
        """Say whether the pool serves, drains or is gone."""
        self._buf[_STATUS] = status

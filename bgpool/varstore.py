"""Where a worker name's published vars live: one shared-memory segment per name.

Layout: a 64-byte header, then two data areas of `capacity` bytes each. A
publish writes the area readers are *not* using, then flips the header to it,
so a writer killed half-way through never damages the snapshot readers see
(snapshots survive crashes, even a crash inside `set_vars()`). The header
flip is a seqlock; the data copy is checked against it too, so a reader that
raced two publishes retries instead of returning torn bytes.

The workers of one name (a pool) all write the segment: an exclusive `flock`
on it serialises them (last writer wins). Readers take no lock and make no
system call while the snapshot is unchanged: they compare one generation
number with the one they cached.

The supervisor never maps these segments (it is not told of each publish
either: diagnostics read the generation and time from the header); it removes
them with the pool.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time

from . import platform

HEADER_SIZE = 64
_SEQ = struct.Struct("<Q")  # at offset 0
_META = struct.Struct("<QB3xIId")  # at offset 8: gen, active area, lengths of areas 0 and 1, time
_META_AT = _SEQ.size
_GEN = struct.Struct("<Q")  # the first field of the metadata
# The metadata is written with one copy, never pack_into over the live header:
# pack_into zero-fills first (pad bytes included), which readers could see.

STUCK_RETRIES = 100_000
"""Reader retries before giving up on a header that stays mid-flip (its writer
died between two stores of the flip)."""


def segment_name(table: str, slot: int) -> str:
    """The segment of the name whose primary table slot is `slot`."""
    return f"{table}_v{slot}"


class Publisher:
    """A worker's write access to its name's segment (created on first use)."""

    def __init__(self, segment: str, capacity: int) -> None:
        self.capacity = capacity
        self._fd = platform.open_shm(segment, create=True)
        size = HEADER_SIZE + 2 * capacity
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        self._last: tuple[int, bytes] | None = None  # (generation, bytes) last written here

    def publish(self, data: bytes) -> bool:
        """Make `data` the current snapshot; False when it equals the current
        one (nothing changes)."""
        buf = self._map
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            seq = _SEQ.unpack_from(buf, 0)[0]
            gen, active, len0, len1, _ = _META.unpack_from(buf, _META_AT)
            current = (len0, len1)[active]
            if gen and current == len(data) and self._current_bytes(gen, active, current) == data:
                return False
            target = 1 - active if gen else 0
            start = HEADER_SIZE + target * self.capacity
            buf[start : start + len(data)] = data
            lengths = (len(data), len1) if target == 0 else (len0, len(data))
            now = time.time()
            seq += seq & 1  # a writer died mid-flip: start from the next even value
            meta = _META.pack(gen + 1, target, *lengths, now)
            _SEQ.pack_into(buf, 0, seq + 1)
            buf[_META_AT : _META_AT + _META.size] = meta  # one copy: no zero-fill to see
            _SEQ.pack_into(buf, 0, seq + 2)
            self._last = (gen + 1, data)
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _current_bytes(self, gen: int, active: int, length: int) -> bytes:
        """The current snapshot's bytes (under the lock): those this process
        published if it was the last writer, which spares reading them back
        from shared memory (a comparison stops at the first difference)."""
        if self._last is not None and self._last[0] == gen:
            return self._last[1]
        start = HEADER_SIZE + active * self.capacity
        return self._map[start : start + length]

    def close(self) -> None:
        """Unmap and close (the segment stays for readers)."""
        self._map.close()
        os.close(self._fd)


class Reader:
    """A process's read-only view of one segment, mapped on first success."""

    def __init__(self, segment: str) -> None:
        self._segment = segment
        self._map: mmap.mmap | None = None
        self._capacity = 0

    def _mapped(self) -> mmap.mmap | None:
        if self._map is None:
            try:
                mapping = platform.map_shm_readonly(self._segment)
            except (FileNotFoundError, ValueError):  # not created, or not sized yet
                return None
            if len(mapping) < HEADER_SIZE:
                mapping.close()
                return None
            self._map = mapping
            self._capacity = (len(mapping) - HEADER_SIZE) // 2
        return self._map

    def generation(self) -> int:
        """The current generation (0: nothing published yet). One load."""
        buf = self._mapped()
        return 0 if buf is None else int(_GEN.unpack_from(buf, _META_AT)[0])

    def read(self) -> tuple[int, float, bytes] | None:
        """The current (generation, publish time, bytes), or None if nothing
        was published."""
        buf = self._mapped()
        if buf is None:
            return None
        for _ in range(STUCK_RETRIES):
            seq = _SEQ.unpack_from(buf, 0)[0]
            if seq & 1:
                continue
            gen, active, len0, len1, when = _META.unpack_from(buf, _META_AT)
            length = (len0, len1)[active]
            start = HEADER_SIZE + active * self._capacity
            data = buf[start : start + length]
            if _SEQ.unpack_from(buf, 0)[0] == seq:
                return (gen, when, data) if gen else None
        raise TimeoutError(f"vars segment {self._segment} stays mid-update")

    def close(self) -> None:
        """Unmap."""
        if self._map is not None:
            self._map.close()
            self._map = None

"""Where a worker name's published vars live: one shared-memory segment per name.

Layout: a 64-byte header, then two data areas of `capacity` bytes each. A
publish writes the area readers are *not* using, then flips the header to it,
so a writer killed half-way through never damages the snapshot readers see
(snapshots survive crashes, even a crash inside `set_vars()`). The header
flip is a seqlock; the data copy is checked against it too, so a reader that
raced two publishes retries instead of returning torn bytes. Both sides of it
are C (`_segment.c`, which also owns the header's layout); this module owns
the segments' names, sizes and mappings.

The workers of one name (a pool) all write the segment: an exclusive `flock`
on it serialises them (last writer wins). Readers take no lock: while the
snapshot is unchanged they compare one generation number with the one they
cached, one load and no system call.

Every worker of the name holds the segment open for writing, and so could
truncate it: touching a mapped page past the file's end raises SIGBUS, which
would kill every reader, the application included. `_segment.c` guards each
access against that (a SIGBUS handler and a per-thread guard, no system
call: see its top comment): a load of the generation that faults gives 0,
and a read that faults raises `Truncated`, a `ValueError`, which the client
turns into a `BgpoolError`. A truncation that keeps the pages a read touches
is no fault: the bytes it lost read as zeros, as if a worker had written
them, which the header's checks or the decoder refuse, or which say that
nothing was published (and while the generation's low bytes survive, a
reader keeps the snapshot it holds). A publish first grows a truncated
segment back (one fstat: a publish is no hot path), and rewrites the header,
which makes it whole again; one that a truncation faults meanwhile grows it
back and starts over.

The supervisor never maps these segments (it is not told of each publish
either: diagnostics read the generation and time from the header); it removes
them with the pool.
"""

from __future__ import annotations

import mmap
import os

from .. import platform
from . import _segment

HEADER_SIZE = _segment.HEADER_SIZE  # the layout is _segment.c's

STUCK_SECONDS = _segment.STUCK_SECONDS
"""How long a reader waits for a header that stays mid-flip before it gives up
(its writer died between two stores of the flip, or is not being scheduled)."""


def _truncated(segment: str, exc: Exception) -> _segment.Truncated:
    return _segment.Truncated(
        f"the vars segment {segment} is truncated (damaged by another process): {exc}"
    )


def remove_all(table: str) -> None:
    """Remove every vars segment of table `table`'s pool."""
    for name in platform.shm_names(f"{table}_v"):
        platform.unlink_shm(name)


def segment_name(table: str, slot: int) -> str:
    """The segment of the name whose primary table slot is `slot`."""
    return f"{table}_v{slot}"


class Publisher:
    """A worker's write access to its name's segment (created on first use)."""

    def __init__(self, segment: str, capacity: int) -> None:
        self.capacity = capacity
        self._segment = segment
        self._fd = platform.open_shm(segment, create=True)
        size = HEADER_SIZE + 2 * capacity
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)

    def publish(self, data: bytes) -> bool:
        """Make `data` the current snapshot; False when it equals the current
        one (nothing changes). `Truncated` (a `ValueError`) if another process
        truncated the segment again while this wrote it, twice over."""
        try:
            return _segment.publish(self._map, self._fd, self.capacity, data)
        except _segment.Truncated as exc:
            raise _truncated(self._segment, exc) from None

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

    def mapping(self) -> mmap.mmap | None:
        """The mapped segment, once a `read()` found it (for checks done in
        one C call: `TableReader.vars_check`); None before, or once closed."""
        return self._map

    def generation(self) -> int:
        """The current generation (0: nothing published yet, or a segment
        truncated under the load, which `read()` explains). One load."""
        buf = self._mapped()
        return 0 if buf is None else _segment.generation(buf)

    def read(self) -> tuple[int, float, bytes] | None:
        """The current (generation, publish time, bytes), or None if nothing
        was published. `TimeoutError` if the header stays mid-flip (its writer
        died there), `ValueError` if a worker wrote nonsense into it, and
        `Truncated` (a `ValueError`) if what it reads lies past the end of the
        file (a process truncated it)."""
        buf = self._mapped()
        if buf is None:
            return None
        try:
            return _segment.read(buf, self._capacity, STUCK_SECONDS)
        except _segment.Truncated as exc:
            raise _truncated(self._segment, exc) from None

    def close(self) -> None:
        """Unmap."""
        if self._map is not None:
            self._map.close()
            self._map = None

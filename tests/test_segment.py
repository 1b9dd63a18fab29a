"""The vars segment's seqlock on its own (bgpool.shm._segment, over a mapped
file): what a publish writes, what a read returns, and how a reader copes with
a header that a dead writer or a hostile one left behind. No processes:
test_vars.py races real writers and readers, and reliability/test_shm_*.py
truncates segments under them."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgpool.shm import _segment

CAPACITY = 64


@contextlib.contextmanager
def mapped(path: Path, size: int) -> Iterator[tuple[mmap.mmap, int]]:
    """A file of `size` bytes, mapped, and its descriptor (what writers lock)."""
    with open(path, "w+b") as file:
        file.truncate(size)
        mapping = mmap.mmap(file.fileno(), size)
        try:
            yield mapping, file.fileno()
        finally:
            mapping.close()


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tuple[mmap.mmap, int]]:
    """A mapped segment and its file's descriptor."""
    with mapped(tmp_path / "segment", _segment.HEADER_SIZE + 2 * CAPACITY) as found:
        yield found


def seq(mapping: mmap.mmap | bytes) -> int:
    return int(struct.unpack_from("<Q", mapping, 0)[0])


def test_a_publish_is_read_back_and_flips_to_the_other_area(segment: tuple[mmap.mmap, int]) -> None:
    mapping, fd = segment
    assert _segment.read(mapping, CAPACITY, 1.0) is None and _segment.generation(mapping) == 0
    before = time.time()
    assert _segment.publish(mapping, fd, CAPACITY, b"first") is True
    found = _segment.read(mapping, CAPACITY, 1.0)
    assert found is not None
    generation, when, data = found
    assert (generation, data, mapping[16]) == (1, b"first", 0)
    assert before <= when <= time.time()
    assert _segment.publish(mapping, fd, CAPACITY, b"second") is True
    assert _segment.read(mapping, CAPACITY, 1.0)[::2] == (2, b"second")  # type: ignore[index]
    assert mapping[16] == 1 and _segment.generation(mapping) == 2 and seq(mapping) == 4


def test_publishing_the_current_bytes_changes_nothing(segment: tuple[mmap.mmap, int]) -> None:
    mapping, fd = segment
    _segment.publish(mapping, fd, CAPACITY, b"same")
    header = mapping[: _segment.HEADER_SIZE]
    assert _segment.publish(mapping, fd, CAPACITY, b"same") is False
    assert mapping[: _segment.HEADER_SIZE] == header


def test_a_snapshot_too_large_for_its_area_is_refused_and_nothing_changes(
    segment: tuple[mmap.mmap, int],
) -> None:
    mapping, fd = segment
    _segment.publish(mapping, fd, CAPACITY, b"kept")
    with pytest.raises(ValueError, match="does not fit"):
        _segment.publish(mapping, fd, CAPACITY, b"x" * (CAPACITY + 1))
    assert _segment.read(mapping, CAPACITY, 1.0)[::2] == (1, b"kept")  # type: ignore[index]


def test_a_header_left_mid_flip_times_out_and_the_next_publish_repairs_it(
    segment: tuple[mmap.mmap, int],
) -> None:
    mapping, fd = segment
    _segment.publish(mapping, fd, CAPACITY, b"before")
    struct.pack_into("<Q", mapping, 0, seq(mapping) + 1)  # a writer died between its stores
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="stays mid-update"):
        _segment.read(mapping, CAPACITY, 0.2)
    assert 0.2 <= time.monotonic() - started < 5
    assert _segment.publish(mapping, fd, CAPACITY, b"after") is True
    assert seq(mapping) % 2 == 0
    assert _segment.read(mapping, CAPACITY, 1.0)[::2] == (2, b"after")  # type: ignore[index]


@pytest.mark.parametrize(
    ("offset", "value"),
    [(16, b"\x07"), (20, struct.pack("<I", CAPACITY + 1)), (20, struct.pack("<I", 2**32 - 1))],
)
def test_a_header_pointing_outside_the_segment_is_refused(
    segment: tuple[mmap.mmap, int], offset: int, value: bytes
) -> None:
    mapping, fd = segment
    _segment.publish(mapping, fd, CAPACITY, b"ok")
    mapping[offset : offset + len(value)] = value
    with pytest.raises(ValueError, match="points outside"):
        _segment.read(mapping, CAPACITY, 1.0)
    assert _segment.publish(mapping, fd, CAPACITY, b"repaired") is True  # a writer rewrites it all
    assert _segment.read(mapping, CAPACITY, 1.0)[::2] == (2, b"repaired")  # type: ignore[index]


def test_a_mapping_too_small_for_its_areas_is_refused(tmp_path: Path) -> None:
    with mapped(tmp_path / "small", _segment.HEADER_SIZE + CAPACITY) as (small, fd):  # one area
        with pytest.raises(ValueError, match="does not fit"):
            _segment.publish(small, fd, CAPACITY, b"x")
        assert _segment.read(small, CAPACITY, 1.0) is None  # nothing was published


def test_a_segment_shorter_than_its_mapping_is_refused(segment: tuple[mmap.mmap, int]) -> None:
    # One byte short: every page the mapping touches is still there, so a
    # reader that did not check could not crash here, only read past the end.
    mapping, fd = segment
    _segment.publish(mapping, fd, CAPACITY, b"kept")
    os.ftruncate(fd, len(mapping) - 1)
    assert _segment.generation(mapping) == 0
    with pytest.raises(ValueError, match="is 191 bytes, shorter than the 192 mapped"):
        _segment.read(mapping, CAPACITY, 1.0)
    assert _segment.publish(mapping, fd, CAPACITY, b"again") is True  # grows it back
    assert os.fstat(fd).st_size == len(mapping)
    assert _segment.read(mapping, CAPACITY, 1.0)[::2] == (2, b"again")  # type: ignore[index]


# -- the table's slots: the same seqlock

SLOT, BODY = 48, 40  # a slot: the counter, then 40 bytes


@pytest.fixture
def table(tmp_path: Path) -> Iterator[tuple[mmap.mmap, int]]:
    with mapped(tmp_path / "table", 4 * SLOT) as found:
        yield found


def body(gen: int, ready: int, rest: bytes) -> bytes:
    return struct.pack("<IB", gen, ready) + rest.ljust(BODY - 5, b"\0")


def test_slots_are_read_back_as_written(table: tuple[mmap.mmap, int]) -> None:
    mapping, _ = table
    for i in range(4):
        _segment.write_slot(mapping, i * SLOT, body(i + 1, i % 2, b"slot %d" % i))
    bodies = _segment.read_slots(mapping, 0, 4, SLOT, BODY, 1.0)
    assert bodies == [body(i + 1, i % 2, b"slot %d" % i) for i in range(4)]
    assert [seq(mapping[i * SLOT :]) for i in range(4)] == [2, 2, 2, 2]
    assert _segment.slot_generation(mapping, 2 * SLOT) == 3
    assert [_segment.name_ready(mapping, i * SLOT, i + 1) for i in range(4)] == [0, 1, 0, 1]
    assert not _segment.name_ready(mapping, SLOT, 1)  # ready, but another generation


def test_a_slot_left_mid_write_times_out_naming_it_and_the_next_write_repairs_it(
    table: tuple[mmap.mmap, int],
) -> None:
    mapping, _ = table
    for i in range(4):
        _segment.write_slot(mapping, i * SLOT, body(i + 1, 1, b""))
    struct.pack_into("<Q", mapping, 2 * SLOT, 3)  # a writer died between its two stores
    started = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        _segment.read_slots(mapping, 0, 4, SLOT, BODY, 0.2)
    assert caught.value.args == ("the slot stays mid-update", 2)
    assert 0.2 <= time.monotonic() - started < 5
    assert _segment.name_ready(mapping, 2 * SLOT, 3)  # the hot path does not wait
    _segment.write_slot(mapping, 2 * SLOT, body(3, 1, b"again"))
    assert seq(mapping[2 * SLOT :]) == 6  # on from the next even value
    assert _segment.read_slots(mapping, 2 * SLOT, 1, SLOT, BODY, 1.0) == [body(3, 1, b"again")]


def test_a_reader_waiting_for_a_stuck_slot_lets_other_threads_run(
    table: tuple[mmap.mmap, int],
) -> None:
    mapping, _ = table
    struct.pack_into("<Q", mapping, 0, 1)
    counted = 0
    done = threading.Event()

    def count() -> None:
        nonlocal counted
        while not done.is_set():
            counted += 1

    thread = threading.Thread(target=count)
    thread.start()
    try:
        time.sleep(0.05)
        before = counted
        with pytest.raises(TimeoutError):
            _segment.read_slots(mapping, 0, 1, SLOT, BODY, 0.3)
        during = counted - before
    finally:
        done.set()
        thread.join()
    assert during > 1000  # the GIL was not held for the 0.3 s


@pytest.mark.parametrize(
    ("offset", "count", "stride"),
    [(-8, 1, SLOT), (3 * SLOT, 2, SLOT), (4, 1, SLOT), (0, 2, BODY), (0, 10**18, SLOT)],
)
def test_slots_outside_the_table_or_misaligned_are_refused(
    table: tuple[mmap.mmap, int], offset: int, count: int, stride: int
) -> None:
    mapping, _ = table
    with pytest.raises(ValueError):
        _segment.read_slots(mapping, offset, count, stride, BODY, 1.0)


def test_the_hot_path_refuses_an_offset_outside_the_table(table: tuple[mmap.mmap, int]) -> None:
    mapping, _ = table
    for offset in (-1, len(mapping) - 4, 4):
        with pytest.raises(IndexError):
            _segment.name_ready(mapping, offset, 1)
        with pytest.raises(IndexError):
            _segment.slot_generation(mapping, offset)

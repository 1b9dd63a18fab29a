"""The vars segment's seqlock on its own (bgpool._segment, over an anonymous
mapping): what a publish writes, what a read returns, and how a reader copes
with a header that a dead writer or a hostile one left behind. No processes:
test_vars.py races real writers and readers."""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bgpool.shm import _segment

CAPACITY = 64


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tuple[mmap.mmap, int]]:
    """A mapped segment and the file its writers lock."""
    mapping = mmap.mmap(-1, _segment.HEADER_SIZE + 2 * CAPACITY)
    with open(tmp_path / "lock", "wb") as lock:
        yield mapping, lock.fileno()
    mapping.close()


def seq(mapping: mmap.mmap) -> int:
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
    small = mmap.mmap(-1, _segment.HEADER_SIZE + CAPACITY)  # one area, not two
    try:
        with open(tmp_path / "lock", "wb") as lock, pytest.raises(ValueError, match="does not fit"):
            _segment.publish(small, lock.fileno(), CAPACITY, b"x")
        assert _segment.read(small, CAPACITY, 1.0) is None  # nothing was published
    finally:
        small.close()

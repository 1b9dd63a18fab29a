"""The vars segment's seqlock on its own (bgpool.shm._segment, over a mapped
file): what a publish writes, what a read returns, and how a reader copes with
a header that a dead writer or a hostile one left behind; the table's slots
and header fields; and the SIGBUS guard, over a file truncated under its
mapping. Each fault is taken in a fresh interpreter: this one enabled
faulthandler after importing bgpool (pytest does, after conftest), and then
faulthandler sees a guarded fault first (see the top of _segment.c).
test_vars.py races real writers and readers, and reliability/test_shm_damage.py
truncates real segments under them."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ATTEMPT, run_python

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


def test_a_segment_truncated_inside_its_last_page_reads_on(segment: tuple[mmap.mmap, int]) -> None:
    # One byte short: every page the mapping touches is still there, so no
    # access faults; the byte lost reads as zero (it is in the unused area),
    # and a publish grows the file back.
    mapping, fd = segment
    _segment.publish(mapping, fd, CAPACITY, b"kept")
    os.ftruncate(fd, len(mapping) - 1)
    assert _segment.generation(mapping) == 1
    assert _segment.read(mapping, CAPACITY, 1.0)[::2] == (1, b"kept")  # type: ignore[index]
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


def test_vars_current_checks_the_pool_the_slot_and_the_vars_generation_at_once(
    table: tuple[mmap.mmap, int], segment: tuple[mmap.mmap, int]
) -> None:
    mapping, _ = table
    vars_map, fd = segment
    _segment.write_slot(mapping, SLOT, body(5, 0, b"not ready: get_vars() reads it all the same"))
    _segment.publish(vars_map, fd, CAPACITY, b"one")
    published = _segment.generation(vars_map)
    assert _segment.vars_current(mapping, SLOT, 5, vars_map, published)
    assert not _segment.vars_current(mapping, SLOT, 4, vars_map, published)  # the slot moved on
    assert not _segment.vars_current(mapping, SLOT, 5, vars_map, published - 1)  # older snapshot
    _segment.publish(vars_map, fd, CAPACITY, b"two")
    assert not _segment.vars_current(mapping, SLOT, 5, vars_map, published)  # a newer one
    _segment.set_status(mapping, 1)  # shutting down: the slow path says so
    assert not _segment.vars_current(mapping, SLOT, 5, vars_map, published + 1)
    _segment.set_status(mapping, 0)
    assert _segment.vars_current(mapping, SLOT, 5, vars_map, published + 1)
    with mmap.mmap(-1, 8) as short:  # smaller than a header: read() says why
        assert not _segment.vars_current(mapping, SLOT, 5, short, 0)
    with pytest.raises(IndexError):
        _segment.vars_current(mapping, len(mapping) - 4, 5, vars_map, 0)


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


def test_the_header_fields_are_stored_and_loaded(table: tuple[mmap.mmap, int]) -> None:
    mapping, _ = table
    _segment.set_in_use(mapping, 3)
    _segment.set_status(mapping, 2)
    assert (_segment.in_use(mapping), _segment.status(mapping)) == (3, 2)
    assert struct.unpack_from("<IB", mapping, _segment.TABLE_IN_USE) == (3, 2)
    _segment.write_bytes(mapping, 1, b"abc")
    assert _segment.read_bytes(mapping, 0, 5) == b"\0abc\0" == mapping[:5]
    with pytest.raises(OverflowError):
        _segment.set_status(mapping, 256)
    with pytest.raises(IndexError):
        _segment.read_bytes(mapping, len(mapping) - 2, 3)
    with pytest.raises(IndexError):
        _segment.write_bytes(mapping, -1, b"x")


def test_the_header_fields_refuse_a_mapping_too_small(tmp_path: Path) -> None:
    with mapped(tmp_path / "tiny", 16) as (tiny, _):
        for call in (_segment.in_use, _segment.status):
            with pytest.raises(IndexError):
                call(tiny)


# -- the SIGBUS guard: each case in a fresh interpreter

GUARD_PRELUDE = (
    """
import mmap, os, signal, struct, sys, tempfile, threading, time
from bgpool.shm import _segment

"""
    + ATTEMPT
    + """

PAGE = mmap.PAGESIZE
with tempfile.TemporaryFile(dir="/dev/shm") as file:
    file.truncate(3 * PAGE)
    mapping = mmap.mmap(file.fileno(), 0)
    fd = os.dup(file.fileno())
SLOT = 2 * PAGE  # a slot on the third page
_segment.write_slot(mapping, SLOT, struct.pack("<IB", 7, 1) + bytes(40))
assert _segment.name_ready(mapping, SLOT, 7)
"""
)

# (where faulthandler is enabled, the flags) for each case
FAULTHANDLER = {
    "without faulthandler": ("", []),
    "faulthandler enabled first": ("", ["-X", "faulthandler"]),
    "faulthandler enabled after": ("import faulthandler; faulthandler.enable()", []),
}


def run_guarded(case: str, code: str) -> tuple[list[str], str]:
    """Run `code` after GUARD_PRELUDE in a fresh interpreter, set up as `case`
    of FAULTHANDLER; its output lines and its stderr. It must exit normally."""
    setup, flags = FAULTHANDLER[case]
    proc = run_python(GUARD_PRELUDE + setup + "\n" + textwrap.dedent(code), flags=flags)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout.splitlines(), proc.stderr


@pytest.mark.parametrize("case", FAULTHANDLER)
def test_every_access_to_a_truncated_mapping_raises_truncated(case: str) -> None:
    lines, stderr = run_guarded(
        case,
        """
        os.ftruncate(fd, 0)
        attempt("name_ready", lambda: _segment.name_ready(mapping, SLOT, 7))
        attempt("slot_generation", lambda: _segment.slot_generation(mapping, SLOT))
        attempt("vars_current", lambda: _segment.vars_current(mapping, SLOT, 7, mapping, 0))
        attempt("status", lambda: _segment.status(mapping))
        attempt("in_use", lambda: _segment.in_use(mapping))
        attempt("read_slots", lambda: _segment.read_slots(mapping, 0, 3, PAGE, 40, 1.0))
        attempt("read_bytes", lambda: _segment.read_bytes(mapping, 0, 64))
        attempt("write_slot", lambda: _segment.write_slot(mapping, SLOT, bytes(45)))
        attempt("set_status", lambda: _segment.set_status(mapping, 1))
        attempt("set_in_use", lambda: _segment.set_in_use(mapping, 1))
        attempt("write_bytes", lambda: _segment.write_bytes(mapping, 0, b"x"))
        attempt("generation", lambda: _segment.generation(mapping))
        attempt("read", lambda: _segment.read(mapping, PAGE, 1.0))
        attempt("blocked", lambda: signal.SIGBUS in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        attempt("publish", lambda: _segment.publish(mapping, fd, PAGE, b"grown back"))
        attempt("read again", lambda: _segment.read(mapping, PAGE, 1.0)[::2])
        """,
    )
    past = f"Truncated byte {{}} of the {3 * mmap.PAGESIZE} mapped lies past the end of its file"
    faulting = {
        "name_ready": 28,  # the table's status, loaded first
        "slot_generation": 2 * mmap.PAGESIZE + 8,
        "vars_current": 28,  # the table's status, loaded first
        "status": 28,
        "in_use": 24,
        "read_slots": 0,
        "read_bytes": 0,
        "write_slot": 2 * mmap.PAGESIZE,  # the counter, made odd first
        "set_status": 28,
        "set_in_use": 24,
        "write_bytes": 0,
    }
    expected = [f"{call}: {past.format(at)}" for call, at in faulting.items()]
    expected += [
        "generation: ok 0",  # read() says why
        f"read: {past.format(0)}",
        "blocked: ok False",  # the handler left SIGBUS blocked: the fault path unblocks it
        "publish: ok True",
        "read again: ok (1, b'grown back')",
    ]
    if case == "faulthandler enabled after":
        # faulthandler saw the first fault before the guard did: it dumped a
        # traceback, put the guard's handler back and raised it again, which
        # the guard recovered without knowing where it struck.
        expected[0] = (
            f"name_ready: Truncated an access to its {3 * mmap.PAGESIZE} mapped bytes went past "
            "the end of its file"
        )
        assert "Fatal Python error: Bus error" in stderr
    else:
        assert stderr == ""
    assert lines == expected


@pytest.mark.parametrize("case", FAULTHANDLER)
def test_a_reader_waiting_with_the_gil_released_is_guarded_too(case: str) -> None:
    # The counter is stuck odd: the reader waits, the GIL released, and the
    # truncation strikes while it does.
    lines, _ = run_guarded(
        case,
        """
        struct.pack_into("<Q", mapping, SLOT, 1)
        handled = threading.Event()
        def truncate():
            os.ftruncate(fd, 0)
            # Stay alive until the fault is handled: faulthandler's dump of
            # every thread may crash on a thread that is exiting meanwhile
            # (seen once on 3.13), which is not what this test is about.
            handled.wait(10)
        timer = threading.Timer(0.2, truncate)
        timer.start()
        started = time.monotonic()
        attempt("read_slots", lambda: _segment.read_slots(mapping, SLOT, 1, PAGE, 40, 5.0))
        print(f"{time.monotonic() - started:.1f}")
        handled.set()
        timer.join()
        """,
    )
    assert lines[0].startswith("read_slots: Truncated "), lines
    assert 0.1 < float(lines[1]) < 4.0


def test_faults_in_many_threads_at_once_are_each_recovered() -> None:
    lines, _ = run_guarded(
        "faulthandler enabled first",
        """
        os.ftruncate(fd, 0)
        counts = []
        def hammer():
            faults = 0
            for _ in range(2000):
                try:
                    _segment.name_ready(mapping, SLOT, 7)
                except _segment.Truncated:
                    faults += 1
            counts.append(faults)
        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(counts)
        """,
    )
    assert lines == ["[2000, 2000, 2000, 2000]"]

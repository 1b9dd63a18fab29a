"""The shared-memory readiness table: layout, identity, seqlock, lifetime."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ATTEMPT, run_python

from bgpool.shm import _segment
from bgpool.shm.table import (
    BOOT_BUCKETS,
    FIELD_OFFSETS,
    HEADER_SIZE,
    SLOT,
    Kind,
    Slot,
    Status,
    TableReader,
    TableWriter,
)
from bgpool.states import State


def slot(**changes: object) -> Slot:
    base: dict[str, object] = dict(
        gen=1, name_ready=False, kind=Kind.NAMED, state=State.STOPPED, ever_ready=False,
        last_exit=None, scope_id=0, decl=0, instance=0, pool_size=1, pid=0, attempts=0,
        failures=0, crashes=0, restarts=0, started_at=0.0, ready_at=0.0, boot_sum=0.0,
        boot_buckets=(0,) * len(BOOT_BUCKETS), name="w",
        scope_label="",
    )  # fmt: skip
    base.update(changes)
    return Slot(**base)  # type: ignore[arg-type]


@pytest.fixture
def table() -> Iterator[TableWriter]:
    writer = TableWriter(4, os.getpid())
    writer.use(4)
    yield writer
    writer.destroy()


def test_round_trip_of_every_field(table: TableWriter) -> None:
    written = slot(
        gen=7, name_ready=True, state=State.BACKOFF, ever_ready=True, last_exit=-9,
        scope_id=2**40, decl=3, instance=2, pool_size=3, pid=12345, attempts=9, failures=4,
        crashes=5, restarts=6, started_at=1.5, ready_at=2.5, boot_sum=0.25,
        boot_buckets=tuple(range(len(BOOT_BUCKETS))), name="ünï\x7e" * 20,
        scope_label="api.example.com",
    )  # fmt: skip
    table.write(2, written)
    reader = TableReader.attach(table.name)
    try:
        assert reader.read(2) == written
        assert reader.nslots == 4
        assert reader.find(2**40, written.name) is None  # instance 2 is not a primary slot
        table.write(1, slot(name="p", scope_id=5))
        assert reader.find(5, "p") == (1, 1)
    finally:
        reader.close()


def test_fast_path_needs_the_flag_and_the_generation(table: TableWriter) -> None:
    reader = TableReader.attach(table.name)
    try:
        offset = reader.offset(0)
        table.write(0, slot(gen=3))
        assert not reader.name_ready(offset, 3)
        table.write(0, slot(gen=3, name_ready=True))
        assert reader.name_ready(offset, 3)
        assert not reader.name_ready(offset, 2)  # an older identity of the slot
    finally:
        reader.close()


def test_segment_is_private_and_removed_without_tracker_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer = TableWriter(1, os.getpid())
        path = Path("/dev/shm") / writer.name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(writer.name) <= 31
        writer.destroy()
    assert not path.exists()


READER = """
import sys, time
from bgpool.shm.table import TableReader
reader = TableReader.attach(sys.argv[1])
seconds = float(sys.argv[2])
torn = reads = 0
deadline = time.monotonic() + seconds
while True:
    s = reader.read(0)
    reads += 1
    # the writer always keeps these fields equal: a mix means a torn read
    if not (s.attempts == s.failures == s.crashes == s.restarts == s.pid):
        torn += 1
    if time.monotonic() > deadline:
        break
print(s.name, torn, reads)
reader.close()
"""


def _readers(name: str, count: int, seconds: float) -> list[subprocess.Popen[str]]:
    root = str(Path(__file__).resolve().parent.parent)
    return [
        subprocess.Popen(
            [sys.executable, "-c", READER, name, str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": root},
        )
        for _ in range(count)
    ]


def test_readers_attaching_do_not_unlink_the_segment(table: TableWriter) -> None:
    table.write(0, slot())
    [reader] = _readers(table.name, 1, 0.0)
    out, _ = reader.communicate(timeout=30)
    assert reader.returncode == 0
    assert out.split()[0] == "w"
    assert (Path("/dev/shm") / table.name).exists()


def test_no_torn_reads_while_the_writer_hammers_a_slot(table: TableWriter) -> None:
    readers = _readers(table.name, 2, 1.0)
    n = 0
    while any(r.poll() is None for r in readers):
        n += 1
        table.write(0, slot(attempts=n, failures=n, crashes=n, restarts=n, pid=n,
                            name="w" * (n % 100 + 1)))  # fmt: skip
    results = [r.communicate(timeout=30)[0].split() for r in readers]
    assert [int(torn) for _, torn, _ in results] == [0, 0]
    assert all(int(reads) > 1000 for _, _, reads in results)
    assert n > 1000


def test_slots_are_8_aligned_and_agree_with_the_c_side() -> None:
    # The C seqlock makes 8-byte atomic loads of each counter, and the hot path
    # 4-byte ones of the generation: both must be aligned in every slot.
    assert SLOT.size % 8 == 0 and HEADER_SIZE % 8 == 0
    assert (FIELD_OFFSETS["gen"], FIELD_OFFSETS["name_ready"]) == (8, 12)
    assert all(TableReader.index(TableReader.offset(i)) == i for i in range(100))


def test_a_reader_sees_only_what_the_writer_published(table: TableWriter) -> None:
    reader = TableReader.attach(table.name)
    try:
        assert reader.slots() == [Slot(gen=0)] * 4  # free slots read as defaults
        with pytest.raises(IndexError):
            reader.read(4)
        with pytest.raises(IndexError):
            table.write(4, slot())
        table.write(3, slot(gen=9, name_ready=True, name="last"))
        assert reader.name_ready(reader.offset(3), 9) and reader.generation(reader.offset(3)) == 9
    finally:
        reader.close()
    with pytest.raises(ValueError):  # unmapped: not mistaken for a damaged table
        reader.read(0)


def test_the_in_use_count_and_the_status_are_read_back(table: TableWriter) -> None:
    reader = TableReader.attach(table.name)
    try:
        assert (reader.in_use(), reader.status()) == (4, Status.SERVING)
        table.set_status(Status.SHUTTING_DOWN)
        table.use(2)  # the count only grows
        assert (reader.in_use(), reader.status()) == (4, Status.SHUTTING_DOWN)
        with open(Path("/dev/shm") / table.name, "r+b") as file:
            os.pwrite(file.fileno(), b"\x09", _segment.TABLE_STATUS)  # not a status it knows
        assert reader.status() == Status.CLOSED
    finally:
        reader.close()


REPAIR = (
    """
import logging, os, sys
from bgpool.errors import BgpoolError
from bgpool.shm.table import Kind, Slot, Status, TableReader, TableWriter
from bgpool.states import State

logging.basicConfig(stream=sys.stdout, format="log: %(levelname)s %(message)s")

"""
    + ATTEMPT
    + """

def slot(index, **changes):
    fields = dict(gen=index + 1, kind=Kind.NAMED, state=State.READY, name_ready=True,
                  name=f"w{index}", pool_size=1)
    fields.update(changes)
    return Slot(**fields)

writer = TableWriter(16, os.getpid())  # two pages
for index in (0, 1, 2, 12):
    writer.write(index, slot(index))
writer.use(13)
writer.set_status(Status.SHUTTING_DOWN)
reader = TableReader.attach(writer.name)
path = "/dev/shm/" + writer.name
size = os.stat(path).st_size
os.truncate(path, 0)
"""
)


def test_the_writer_repairs_a_table_truncated_under_it() -> None:
    code = REPAIR + textwrap.dedent(
        """
        attempt("before", lambda: reader.name_ready(reader.offset(0), 1))
        writer.write(1, slot(1, pid=99))
        attempt("size", lambda: os.stat(path).st_size == size)
        attempt("names", lambda: [s.name for s in reader.slots()])
        attempt("pid", lambda: reader.read(1).pid)
        attempt("ready", lambda: [reader.read(i).name_ready for i in (0, 12)])
        attempt("header", lambda: (reader.in_use(), reader.status().name))
        attempt("attach", lambda: TableReader.attach(writer.name).nslots)
        writer.destroy()
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before, log, *lines = proc.stdout.splitlines()
    assert before.startswith("before: BgpoolError the readiness table bgp_"), before
    assert "is truncated (damaged by another process): byte " in before
    assert log.startswith("log: ERROR the readiness table bgp_"), log
    assert "was truncated by another process" in log and "it is restored" in log
    assert lines == [
        "size: ok True",
        f"names: ok {['w0', 'w1', 'w2'] + [''] * 9 + ['w12']!r}",
        "pid: ok 99",
        "ready: ok [True, True]",
        "header: ok (13, 'SHUTTING_DOWN')",
        "attach: ok 16",
    ]


@pytest.mark.parametrize("store", ["writer.write(1, slot(1))", "writer.set_status(Status.CLOSED)"])
def test_a_table_the_writer_cannot_repair_raises(store: str) -> None:
    # Truncated and unlinked: there is no file left to grow back.
    code = REPAIR + textwrap.dedent(
        f"""
        os.unlink(path)
        attempt("store", lambda: {store})
        writer.destroy()
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [line] = proc.stdout.splitlines()
    assert line.startswith("store: BgpoolError the readiness table bgp_"), line
    assert "is truncated (damaged by another process: byte " in line
    assert "), and cannot be restored: [Errno 2] No such file or directory" in line


def test_the_hot_path_says_not_ready_once_the_pool_no_longer_serves(table: TableWriter) -> None:
    """name_ready() reads the table's status too: once the pool drains, a ready
    name is not, so ensure() takes its slow path, which raises PoolClosed."""
    table.write(0, slot(gen=3, name_ready=True))
    reader = TableReader.attach(table.name)
    try:
        assert reader.name_ready(reader.offset(0), 3)
        assert reader.serving()
        table.set_status(Status.SHUTTING_DOWN)
        assert not reader.name_ready(reader.offset(0), 3)
        assert not reader.serving()
        table.set_status(Status.CLOSED)
        assert not reader.name_ready(reader.offset(0), 3)
    finally:
        reader.close()

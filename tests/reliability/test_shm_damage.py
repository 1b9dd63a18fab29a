"""Readers of damaged shared memory: no input can crash or hang them.

Another process of the same user can truncate a segment, leave a slot's
sequence counter odd (a writer frozen or killed between two stores), or write
garbage into the table. Each case damages a real segment (the table of a real
`TableWriter`, the vars of a real `Publisher`) and reads it with the real
reader classes in a fresh interpreter, where a crash is a signal: it must
exit normally and print the expected error. (SIGBUS, exit status -7, is what
a read through a mapping past the end of its file gets.)
"""

from __future__ import annotations

import mmap
import os
import secrets
import signal
import struct
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SHM, run_python, subprocess_env

from bgpool.shm import varstore
from bgpool.shm.table import FIELD_OFFSETS, HEADER_SIZE, Kind, Slot, TableReader, TableWriter
from bgpool.states import State

PRELUDE = """
import os, sys, time
from bgpool.errors import BgpoolError
from bgpool.shm.table import TableReader
from bgpool.shm.varstore import Publisher, Reader

SEGMENT = os.environ["SEGMENT"]
PATH = "/dev/shm/" + SEGMENT

def attempt(what, call):
    '''Print "<what>: ok <result>", or "<what>: <exception type> <message>".'''
    try:
        result = call()
    except Exception as exc:
        print(f"{what}: {type(exc).__name__} {exc}", flush=True)
    else:
        print(f"{what}: ok {result!r}", flush=True)
"""


def run_reader(segment: str, code: str, timeout: float = 30.0) -> list[str]:
    """Run `code` after PRELUDE in a fresh interpreter; the lines it printed.
    It must exit normally: a signal means a reader crashed."""
    proc = run_python(
        PRELUDE + textwrap.dedent(code), env=subprocess_env(SEGMENT=segment), timeout=timeout
    )
    if proc.returncode < 0:
        died = signal.Signals(-proc.returncode).name
        raise AssertionError(f"the reader died of {died}:\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def slot(index: int, **changes: object) -> Slot:
    fields: dict[str, object] = dict(
        gen=index + 1, kind=Kind.NAMED, state=State.READY, name_ready=True, name=f"w{index}",
        pool_size=1, scope_label="api",
    )  # fmt: skip
    fields.update(changes)
    return Slot(**fields)  # type: ignore[arg-type]


@pytest.fixture
def table() -> Iterator[TableWriter]:
    """A real table of 16 slots, the first 3 written and in use (16 slots take
    two pages: the later ones lie past the first)."""
    writer = TableWriter(16, os.getpid())
    for index in range(3):
        writer.write(index, slot(index))
    writer.write(12, slot(12))  # on the second page
    writer.use(16)
    yield writer
    writer.destroy()  # touches no page: safe after a truncation


@pytest.fixture
def vars_segment() -> Iterator[str]:
    """A real vars segment: 64 KiB areas, a 20 kB snapshot published (it spans
    several pages)."""
    name = varstore.segment_name("bgp_" + secrets.token_hex(8), 0)
    publisher = varstore.Publisher(name, 65536)
    publisher.publish(b"v" * 20000)
    publisher.close()
    yield name
    os.unlink(SHM / name)


def poke(segment: str, offset: int, data: bytes) -> None:
    """Write `data` at `offset` of the segment through a read-write mapping of
    its file, as another process could."""
    with open(SHM / segment, "r+b") as file, mmap.mmap(file.fileno(), 0) as mapping:
        mapping[offset : offset + len(data)] = data


# ------------------------------------------------------------ truncated vars


@pytest.mark.parametrize("size", [0, 10, 4096])
def test_a_vars_segment_truncated_under_its_reader_is_refused(vars_segment: str, size: int) -> None:
    # 0 takes every page, 10 keeps the header's page (the rest of it reads as
    # zeros), 4096 keeps only that page of a snapshot that runs past it.
    lines = run_reader(
        vars_segment,
        f"""
        reader = Reader(SEGMENT)
        attempt("before", lambda: reader.read()[0])
        os.truncate(PATH, {size})
        attempt("generation", reader.generation)
        attempt("read", reader.read)
        """,
    )
    assert lines[:2] == ["before: ok 1", "generation: ok 0"]
    assert lines[2].startswith("read: ValueError the vars segment is"), lines
    assert f"is {size} bytes, shorter than the " in lines[2]
    assert lines[2].endswith("mapped: another process truncated it")


@pytest.mark.parametrize("size", [0, 10, 4096])
def test_a_reader_that_maps_a_truncated_vars_segment_is_not_crashed(
    vars_segment: str, size: int
) -> None:
    os.truncate(SHM / vars_segment, size)
    lines = run_reader(
        vars_segment,
        """
        reader = Reader(SEGMENT)
        attempt("generation", reader.generation)
        attempt("read", reader.read)
        """,
    )
    if size < varstore.HEADER_SIZE:  # not sized yet, as far as a newcomer can tell
        assert lines == ["generation: ok 0", "read: ok None"]
    else:  # the header promises more than the file holds
        assert lines[1] == "read: ValueError the vars segment's header points outside it"


def test_a_publish_into_a_truncated_segment_grows_it_back(vars_segment: str) -> None:
    lines = run_reader(
        vars_segment,
        """
        publisher = Publisher(SEGMENT, 65536)
        reader = Reader(SEGMENT)
        attempt("before", lambda: reader.read()[::2])
        os.truncate(PATH, 0)
        attempt("publish", lambda: publisher.publish(b"again"))
        attempt("size", lambda: os.stat(PATH).st_size)
        attempt("read", lambda: reader.read()[::2])
        publisher.close()
        """,
    )
    assert lines == [
        f"before: ok (1, {b'v' * 20000!r})",
        "publish: ok True",
        f"size: ok {varstore.HEADER_SIZE + 2 * 65536}",
        "read: ok (1, b'again')",  # the header was lost: generations start again
    ]


def test_the_application_gets_an_error_for_truncated_vars(tmp_path: Path) -> None:
    # The whole way, in an application process: get_vars() after another
    # process truncated the segment under the client's mapping.
    lines = run_reader(
        "unused",
        """
        import bgpool
        spec = bgpool.WorkerSpec(
            name="w", target="fixtures.vars_workers:publish_case", num=1, env={"CASE": "mixed"}
        )
        pool = bgpool.Pool(bgpool.PoolConfig(workers=[spec], grace_period=5.0))
        pool.start()
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    print("first:", dict(pool.get_vars("w")), flush=True)
                    break
                except bgpool.VarsNotPublished:
                    assert time.monotonic() < deadline, "nothing published"
                    time.sleep(0.01)
            with open("/proc/self/maps") as maps:  # the vars segment this process reads
                [path] = {line.split()[-1] for line in maps if "_v" in line and "/bgp_" in line}
            os.truncate(path, 0)
            attempt("get_vars", lambda: pool.get_vars("w"))
            attempt("diagnostics", lambda: pool.diagnostics("w").vars_generation)
        finally:
            pool.shutdown()
        """,
    )
    assert lines[0].startswith("first: {'routes'")
    assert lines[1].startswith('get_vars: BgpoolError the vars of background worker "w" are')
    assert "another process truncated it" in lines[1]
    assert lines[2] == "diagnostics: ok 0"  # what cannot be read is left out


# ----------------------------------------------------------- truncated table


@pytest.mark.parametrize("size", [0, 10, HEADER_SIZE + 1000])
def test_a_table_truncated_under_its_reader_is_refused(table: TableWriter, size: int) -> None:
    lines = run_reader(
        table.name,
        f"""
        reader = TableReader.attach(SEGMENT)
        attempt("before", lambda: [s.name for s in reader.slots()][:3])
        os.truncate(PATH, {size})
        attempt("read", lambda: reader.read(0))
        attempt("slots", reader.slots)
        attempt("find", lambda: reader.find(0, "w1"))
        """,
    )
    assert lines[0] == "before: ok ['w0', 'w1', 'w2']"
    for line, call in zip(lines[1:], ["read", "slots", "find"], strict=True):
        assert line.startswith(f"{call}: BgpoolError the readiness table {table.name} cannot"), line
        assert line.endswith("another process truncated it"), line


@pytest.mark.parametrize("size", [0, 10, HEADER_SIZE + 1000])
def test_attaching_to_a_truncated_table_is_refused(table: TableWriter, size: int) -> None:
    os.truncate(SHM / table.name, size)
    [line] = run_reader(table.name, 'attempt("attach", lambda: TableReader.attach(SEGMENT))')
    assert line.startswith(
        f"attach: BgpoolError shared memory segment {table.name!r} is "
        + ("empty" if size == 0 else "not a bgpool table: ")
    ), line


def test_the_hot_path_reads_a_kept_page_as_not_ready_and_is_unchecked_past_it(
    table: TableWriter,
) -> None:
    # The decision table.py documents: name_ready() stays two loads without a
    # system call, so it does not check the size. A slot on a page the
    # truncation kept reads as zeros (not ready: ensure() takes its slow path,
    # which refuses); a slot on a page it took still raises SIGBUS.
    first, later = TableReader.offset(1), TableReader.offset(12)
    assert first + 100 < mmap.PAGESIZE <= later
    code = f"""
        reader = TableReader.attach(SEGMENT)
        attempt("ready", lambda: (reader.name_ready({first}, 2), reader.name_ready({later}, 13)))
        os.truncate(PATH, 10)
        attempt("kept page", lambda: reader.name_ready({first}, 2))
        attempt("slow path", lambda: reader.read(1))
        reader.name_ready({later}, 13)
        print("survived", flush=True)
        """
    proc = run_python(PRELUDE + textwrap.dedent(code), env=subprocess_env(SEGMENT=table.name))
    assert proc.returncode == -signal.SIGBUS, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["ready: ok (True, True)", "kept page: ok False"]
    assert lines[2].startswith("slow path: BgpoolError the readiness table"), lines
    assert lines[3:] == []


# -------------------------------------------------------- a slot stuck mid-write


def test_a_slot_left_mid_write_raises_naming_the_slot(table: TableWriter) -> None:
    counter = TableReader.offset(2)
    (seq,) = struct.unpack_from("<Q", (SHM / table.name).read_bytes(), counter)
    poke(table.name, counter, struct.pack("<Q", seq + 1))  # a writer frozen between two stores
    lines = run_reader(
        table.name,
        """
        reader = TableReader.attach(SEGMENT)
        attempt("slot 1", lambda: reader.read(1).name)
        for call in ("read(2)", "slots()", "find(0, 'w2')"):
            started = time.monotonic()
            attempt(call, lambda: eval("reader." + call))
            print(f"{time.monotonic() - started:.2f}", flush=True)
        """,
    )
    assert lines[0] == "slot 1: ok 'w1'"  # the other slots read as ever
    for line, seconds in zip(lines[1::2], lines[2::2], strict=True):
        assert f": BgpoolError slot 2 of the readiness table {table.name} stays mid-write" in line
        assert 0.4 < float(seconds) < 5.0  # the bound is half a second


def test_the_application_gets_an_error_for_a_stuck_slot() -> None:
    # The whole way: status() in an application process, whose table has a
    # slot stuck mid-write (written through a read-write mapping, as another
    # process could). It used to spin forever.
    lines = run_reader(
        "unused",
        """
        import mmap, struct
        import bgpool
        from bgpool.shm.table import TableReader
        pool = bgpool.Pool(bgpool.PoolConfig(
            workers=[bgpool.WorkerSpec(name="w", target="fixtures.vars_workers:publish_case")],
            grace_period=5.0,
        ))
        pool.start()
        try:
            attempt("before", lambda: [s.state for s in pool.status()])
            with open("/proc/self/maps") as maps:  # the table this process reads
                [path] = {line.split()[-1] for line in maps if "/dev/shm/bgp_" in line}
            with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0) as table:
                struct.pack_into("<Q", table, TableReader.offset(0), 1)
            started = time.monotonic()
            attempt("status", pool.status)
            print(f"{time.monotonic() - started:.1f}", flush=True)
        finally:
            pool.shutdown()
        """,
    )
    assert lines[0] == "before: ok ['stopped']"
    assert lines[1].startswith("status: BgpoolError slot 0 of the readiness table bgp_"), lines
    assert "stays mid-write" in lines[1]
    assert 0.4 < float(lines[2]) < 5.0


# ------------------------------------------------------------ garbage in the table

HEADER_DAMAGE = {
    "magic": (0, b"NOTATABL", "it starts with b'NOTATABL', not b'BGPOOL\\x01\\x00'"),
    "version": (8, struct.pack("<I", 99), "its layout is version 99: this bgpool reads version"),
    "slot size": (16, struct.pack("<I", 100), "its slots are 100 bytes: this bgpool's are"),
    "slot count": (12, struct.pack("<I", 10**6), "its header counts 1000000 slots, which take"),
}


@pytest.mark.parametrize("damage", HEADER_DAMAGE)
def test_a_header_that_is_not_a_tables_is_refused(table: TableWriter, damage: str) -> None:
    offset, data, why = HEADER_DAMAGE[damage]
    poke(table.name, offset, data)
    [line] = run_reader(table.name, 'attempt("attach", lambda: TableReader.attach(SEGMENT))')
    assert line.startswith(
        f"attach: BgpoolError shared memory segment {table.name!r} is not a bgpool table: {why}"
    ), line


SLOT_DAMAGE = {
    "kind": ({"kind": b"\x09"}, "its Kind byte is 9, not one of 0, 1, 2"),
    "state": ({"state": b"\xc8"}, "its State byte is 200, not one of 0, 1, 2, 3, 4, 5, 6"),
    "name length": (
        {"name_len": struct.pack("<H", 300)},
        "its name claims 300 bytes, more than the 128 it has",
    ),
    "label length": (
        {"label_len": struct.pack("<H", 129)},
        "its scope label claims 129 bytes, more than the 128 it has",
    ),
    "name": (
        {"name": b"\xff\xfe", "name_len": struct.pack("<H", 2)},
        "its name is not UTF-8 (invalid start byte at byte 0)",
    ),
    "label": ({"scope_label": b"a\xe2\x82"}, "its scope label is not UTF-8"),
}


@pytest.mark.parametrize("damage", SLOT_DAMAGE)
def test_a_slot_holding_nonsense_is_refused(table: TableWriter, damage: str) -> None:
    fields, why = SLOT_DAMAGE[damage]
    for field, data in fields.items():
        poke(table.name, TableReader.offset(1) + FIELD_OFFSETS[field], data)
    lines = run_reader(
        table.name,
        """
        reader = TableReader.attach(SEGMENT)
        attempt("slot 0", lambda: reader.read(0).name)
        attempt("read", lambda: reader.read(1))
        attempt("slots", reader.slots)
        attempt("find", lambda: reader.find(0, "w2"))
        """,
    )
    assert lines[0] == "slot 0: ok 'w0'"
    for line, call in zip(lines[1:], ["read", "slots", "find"], strict=True):
        assert line.startswith(
            f"{call}: BgpoolError slot 1 of the readiness table {table.name} is damaged: {why}"
        ), line

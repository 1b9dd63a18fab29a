"""Readers of damaged shared memory: no input can crash or hang them.

Another process of the same user can truncate a segment, leave a slot's
sequence counter odd (a writer frozen or killed between two stores), or write
garbage into the table. Each case damages a real segment (the table of a real
`TableWriter`, the vars of a real `Publisher`, or those of a real pool) and
reads it with the real reader classes in a fresh interpreter, where a crash is
a signal: it must exit normally and print the expected error. (SIGBUS, exit
status -7, is what a read through a mapping past the end of its file gets
without the guard of `_segment.c`.) The supervisor, which writes the table,
must survive its truncation too; and a SIGBUS that is not a guarded access's
must still kill the process.
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
from helpers import ATTEMPT, SHM, run_python, subprocess_env

from bgpool.shm import varstore
from bgpool.shm.table import FIELD_OFFSETS, HEADER_SIZE, Kind, Slot, TableReader, TableWriter
from bgpool.states import State

PRELUDE = (
    """
import os, sys, time
from bgpool.errors import BgpoolError
from bgpool.shm.table import TableReader
from bgpool.shm.varstore import Publisher, Reader

SEGMENT = os.environ["SEGMENT"]
PATH = "/dev/shm/" + SEGMENT

"""
    + ATTEMPT
    + """
"""
)


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


TRUNCATED = "is truncated (damaged by another process): "


def past_the_end(at: int, mapped: int) -> str:
    """What the guard says of an access that faulted."""
    return f"byte {at} of the {mapped} mapped lies past the end of its file"


VARS_MAPPED = varstore.HEADER_SIZE + 2 * 65536


@pytest.mark.parametrize(
    ("size", "generation", "read"),
    [
        # every page gone: the first access faults
        (0, "0", f"Truncated the vars segment {{name}} {TRUNCATED}{past_the_end(0, VARS_MAPPED)}"),
        # the header's page kept, but for 10 bytes of it: the rest reads as zeros
        # (the generation's low bytes survive), as if written so: no fault
        (10, "1", "ok (1, 0.0, b'')"),
        # that page kept whole: the snapshot runs past it
        (
            4096,
            "1",
            f"Truncated the vars segment {{name}} {TRUNCATED}{past_the_end(4096, VARS_MAPPED)}",
        ),
    ],
)
def test_a_vars_segment_truncated_under_its_reader_is_refused(
    vars_segment: str, size: int, generation: str, read: str
) -> None:
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
    assert lines == [
        "before: ok 1",
        f"generation: ok {generation}",
        "read: " + read.format(name=vars_segment),
    ]


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
    assert lines[1].startswith('get_vars: BgpoolError the vars of background worker "w" are'), lines
    assert f"{TRUNCATED}byte 0 of the " in lines[1]  # the load of the header's counter
    assert lines[1].endswith(" mapped lies past the end of its file")
    assert lines[2] == "diagnostics: ok 0"  # what cannot be read is left out


# ----------------------------------------------------------- truncated table


TABLE_MAPPED = TableReader.offset(16)
REFUSED = "refused"
CALLS = ["read", "slots", "find", "in_use", "status", "name_ready", "generation"]


@pytest.mark.parametrize(
    ("size", "outcomes"),
    [
        (0, [REFUSED] * 7),  # every page gone: every read faults
        # The first page kept, but for 10 bytes: the rest of it reads as zeros,
        # as if written so (a free slot 0, none in use, serving); past it, faults.
        (10, ["ok ''", "ok []", "ok None", "ok 0", "ok <Status.SERVING: 0>", REFUSED, REFUSED]),
        # The first page kept whole, and the slots on it; slot 10 runs past it.
        (
            HEADER_SIZE + 1000,
            ["ok 'w0'", REFUSED, REFUSED, "ok 16", "ok <Status.SERVING: 0>", REFUSED, REFUSED],
        ),
    ],
)
def test_a_table_truncated_under_its_reader_is_refused(
    table: TableWriter, size: int, outcomes: list[str]
) -> None:
    later = TableReader.offset(12)
    lines = run_reader(
        table.name,
        f"""
        reader = TableReader.attach(SEGMENT)
        attempt("before", lambda: [s.name for s in reader.slots()][:3])
        os.truncate(PATH, {size})
        attempt("read", lambda: reader.read(0).name)
        attempt("slots", reader.slots)
        attempt("find", lambda: reader.find(0, "w1"))
        attempt("in_use", reader.in_use)
        attempt("status", reader.status)
        attempt("name_ready", lambda: reader.name_ready({later}, 13))
        attempt("generation", lambda: reader.generation({later}))
        """,
    )
    assert lines[0] == "before: ok ['w0', 'w1', 'w2']"
    assert [line.split(": ", 1)[0] for line in lines[1:]] == CALLS
    for line, outcome in zip(lines[1:], outcomes, strict=True):
        if outcome == REFUSED:
            assert f": BgpoolError the readiness table {table.name} {TRUNCATED}byte " in line
            assert line.endswith(f" of the {TABLE_MAPPED} mapped lies past the end of its file")
        else:
            assert line.split(": ", 1)[1] == outcome, line


@pytest.mark.parametrize("size", [0, 10, HEADER_SIZE + 1000])
def test_attaching_to_a_truncated_table_is_refused(table: TableWriter, size: int) -> None:
    os.truncate(SHM / table.name, size)
    [line] = run_reader(table.name, 'attempt("attach", lambda: TableReader.attach(SEGMENT))')
    assert line.startswith(
        f"attach: BgpoolError shared memory segment {table.name!r} is "
        + ("empty" if size == 0 else "not a bgpool table: ")
    ), line


def test_the_hot_path_reads_a_kept_page_as_not_ready_and_refuses_past_it(
    table: TableWriter,
) -> None:
    # name_ready() stays two loads without a system call, guarded: a slot on a
    # page the truncation kept reads as zeros (not ready: ensure() takes its
    # slow path); a slot on a page it took raises, where it used to kill.
    first, later = TableReader.offset(1), TableReader.offset(12)
    assert first + 100 < mmap.PAGESIZE <= later
    lines = run_reader(
        table.name,
        f"""
        reader = TableReader.attach(SEGMENT)
        attempt("ready", lambda: (reader.name_ready({first}, 2), reader.name_ready({later}, 13)))
        os.truncate(PATH, 10)
        attempt("kept page", lambda: reader.name_ready({first}, 2))
        attempt("slow path", lambda: reader.read(1).gen)
        attempt("later page", lambda: reader.name_ready({later}, 13))
        attempt("generation", lambda: reader.generation({later}))
        """,
    )
    assert lines[:3] == ["ready: ok (True, True)", "kept page: ok False", "slow path: ok 0"]
    refused = f"BgpoolError the readiness table {table.name} {TRUNCATED}"
    assert lines[3] == f"later page: {refused}{past_the_end(later + 12, TABLE_MAPPED)}"  # the flag
    assert lines[4] == f"generation: {refused}{past_the_end(later + 8, TABLE_MAPPED)}"


# ------------------------------------------------ a truncated table, a real pool

POOL = """
import signal
import bgpool

def path_of(table):
    # the table's file, or the vars segment's, as this process maps it
    with open("/proc/self/maps") as maps:
        [path] = {
            line.split()[-1] for line in maps
            if "/dev/shm/bgp_" in line and ("_v" not in line) == table
        }
    return path

def wait_for_vars(client):
    deadline = time.monotonic() + 10
    while True:
        try:
            return dict(client.get_vars("w"))
        except bgpool.VarsNotPublished:
            assert time.monotonic() < deadline, "nothing published"
            time.sleep(0.01)

# Eleven lazy names first, so that "w", eager, has slot 11: on the second page.
specs = [
    bgpool.WorkerSpec(name=f"lazy{i}", target="fixtures.vars_workers:publish_case")
    for i in range(11)
]
specs.append(bgpool.WorkerSpec(
    name="w", target="fixtures.vars_workers:publish_case", num=1, env={"CASE": "mixed"}
))
pool = bgpool.Pool(bgpool.PoolConfig(workers=specs, grace_period=5.0))
pool.start()
client = bgpool.connect(pool.address)
pool.ensure("w")
client.ensure("w")
print("vars:", wait_for_vars(pool) == wait_for_vars(client), flush=True)
[pid] = [s.pid for s in pool.status() if s.name == "w"]
"""


def run_app(code: str, timeout: float = 60.0) -> tuple[list[str], str]:
    """Run `code` after PRELUDE and POOL (a pool started, a connect() client,
    both reading "w" and its vars) in a fresh interpreter: the lines it
    printed after POOL's, and its stderr (where the supervisor logs). It must
    exit normally."""
    proc = run_python(
        PRELUDE + POOL + textwrap.dedent(code), env=subprocess_env(SEGMENT=""), timeout=timeout
    )
    if proc.returncode < 0:
        died = signal.Signals(-proc.returncode).name
        raise AssertionError(f"the application died of {died}:\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:1] == ["vars: True"], proc.stdout + proc.stderr
    return lines[1:], proc.stderr


REPAIRED = "was truncated by another process (a write met it: byte "
W = TableReader.offset(11)  # the slot of "w"
STATUS_BYTE = 28  # in the table's header


@pytest.mark.parametrize("size", [0, 10])
def test_the_hot_paths_of_an_application_refuse_a_truncated_table(size: int) -> None:
    # ensure()'s fast path (the status, then name_ready), status() and
    # get_vars()'s unchanged path (the status, then the slot's generation),
    # through the pool and through a connect() client: each used to kill the
    # application. Truncated to 0 they fault at the status byte; to 10 bytes,
    # the header's page reads as zeros (serving, no slot in use), and the slot
    # of "w", on the next page, faults.
    lines, stderr = run_app(
        f"""
        table = path_of(table=True)
        os.truncate(table, {size})
        for who, reader in (("pool", pool), ("client", client)):
            attempt(who + " ensure", lambda: reader.ensure("w"))
            attempt(who + " status", lambda: [s.name for s in reader.status()])
            attempt(who + " get_vars", lambda: dict(reader.get_vars("w")))
        client.close()
        attempt("shutdown", pool.shutdown)
        mine = os.path.basename(table)  # the table, and the vars segments named after it
        attempt("left", lambda: [name for name in os.listdir("/dev/shm") if mine in name])
        """
    )
    fault = {
        "ensure": STATUS_BYTE if size == 0 else W + 12,  # the ready flag
        "status": STATUS_BYTE,
        "get_vars": STATUS_BYTE if size == 0 else W + 8,  # the slot's generation
    }
    for who in ("pool", "client"):
        for call in ("ensure", "status", "get_vars"):
            line = lines.pop(0)
            if call == "status" and size > 0:
                assert line == f"{who} status: ok []"  # the in-use count reads 0
                continue
            assert line.startswith(f"{who} {call}: BgpoolError the readiness table bgp_"), line
            assert f"{TRUNCATED}byte {fault[call]} of the " in line, line
    # The supervisor met the truncation at its first write of the shutdown,
    # repaired the table, logged that, and shut down as ever.
    assert lines == ["shutdown: ok None", "left: ok []"]
    assert REPAIRED in stderr, stderr


def test_the_supervisor_repairs_a_truncated_table_and_serves_on() -> None:
    # The worker's death makes the supervisor write its slot: the write faults,
    # and the supervisor grows the table back and writes it all again, rather
    # than dying of SIGBUS (which took every worker with it).
    lines, stderr = run_app(
        """
        table = path_of(table=True)
        size = os.stat(table).st_size
        os.truncate(table, 0)
        attempt("before", lambda: pool.ensure("w"))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while os.stat(table).st_size == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        attempt("size", lambda: os.stat(table).st_size == size)
        attempt("ensure", lambda: pool.ensure("w", timeout=20))
        attempt("client", lambda: client.ensure("w", timeout=20))
        attempt("restarted", lambda: [s.pid for s in client.status() if s.name == "w"] != [pid])
        attempt("names", lambda: sorted(s.name for s in pool.status())[-2:])
        attempt("vars", lambda: dict(client.get_vars("w")) == dict(pool.get_vars("w")))
        client.close()
        attempt("shutdown", pool.shutdown)
        """
    )
    assert lines[0].startswith("before: BgpoolError the readiness table bgp_"), lines
    assert lines[1:] == [
        "size: ok True",
        "ensure: ok None",
        "client: ok None",
        "restarted: ok True",
        "names: ok ['lazy9', 'w']",
        "vars: ok True",
        "shutdown: ok None",
    ]
    assert stderr.count(REPAIRED) == 1, stderr  # once: the table is whole again


@pytest.mark.parametrize("size", [0, 10])
def test_the_application_gets_an_error_for_truncated_vars_on_the_unchanged_path(
    size: int,
) -> None:
    # get_vars() while the snapshot is unchanged: one load of the generation.
    # Truncated to 0, the load faults (0), and the read that follows raises.
    # To 10 bytes, the generation's page is kept, and its low bytes with it:
    # the cached snapshot is returned. A client that maps the segment only
    # now finds it too short to hold a header: nothing published, as far as
    # a newcomer can tell.
    lines, _ = run_app(
        f"""
        before = dict(pool.get_vars("w"))
        os.truncate(path_of(table=False), {size})
        fresh = bgpool.connect(pool.address)
        for who, reader in (("pool", pool), ("client", client), ("fresh", fresh)):
            attempt(who, lambda: dict(reader.get_vars("w")) == before)
        for reader in (client, fresh):
            reader.close()
        pool.shutdown()
        """
    )
    *cached, fresh = lines
    if size == 0:
        for line, who in zip(cached, ("pool", "client"), strict=True):
            assert line.startswith(
                f'{who}: BgpoolError the vars of background worker "w" are unreadable: '
                "the vars segment bgp_"
            ), line
            assert f"{TRUNCATED}byte 0 of the " in line, line
    else:
        assert cached == ["pool: ok True", "client: ok True"]
    assert fresh.startswith("fresh: VarsNotPublished "), lines


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


# --------------------------------------------------- faults that are not bgpool's

FOREIGN = """
import ctypes, faulthandler, mmap, os, signal, tempfile
from bgpool.shm import _segment  # installs the guard's handler
{faulthandler}

def truncated_mapping(size):
    with tempfile.TemporaryFile(dir="/dev/shm") as file:
        file.truncate(size)
        mapping = mmap.mmap(file.fileno(), 0)
        os.ftruncate(file.fileno(), 0)
    return mapping

# A guarded fault first: the guard is live, and recovers it.
try:
    _segment.status(truncated_mapping(4096))
except _segment.Truncated:
    print("recovered", flush=True)
foreign = truncated_mapping(4096)  # a mapping bgpool did not make
{fault}
print("survived", flush=True)
"""

FAULTS = {
    # a read through the foreign mapping, from Python
    "ctypes": "ctypes.string_at(ctypes.addressof(ctypes.c_char.from_buffer(foreign)), 1)",
    # inside a guarded access, but outside the mapping it guards: the snapshot
    # to publish is the foreign mapping
    "in a guarded access": """
with tempfile.TemporaryFile(dir="/dev/shm") as file:
    file.truncate(_segment.HEADER_SIZE + 2 * 4096)
    segment = mmap.mmap(file.fileno(), 0)
    _segment.publish(segment, file.fileno(), 4096, foreign)
""",
    # not a fault: sent
    "sent": "os.kill(os.getpid(), signal.SIGBUS)",
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("enabled", ["never", "first", "after"])
def test_a_sigbus_that_is_not_a_guarded_access_still_kills(fault: str, enabled: str) -> None:
    # The guard recovers only a fault of a guarded access, inside the mapping
    # it guards: any other SIGBUS kills the process as it would have without
    # bgpool, faulthandler's traceback first if it was enabled before bgpool
    # was imported. (Enabled after, faulthandler met the guarded fault first,
    # dumped a traceback then, and is gone for SIGBUS: see _segment.c.)
    code = FOREIGN.format(
        faulthandler="faulthandler.enable()" if enabled == "after" else "",
        fault=textwrap.dedent(FAULTS[fault]),
    )
    flags = ["-X", "faulthandler"] if enabled == "first" else []
    proc = run_python(code, env=subprocess_env(), flags=flags)
    assert proc.returncode == -signal.SIGBUS, f"exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert proc.stdout == "recovered\n"
    # One dump: of this fault (enabled first: the guarded one went unsaid), or
    # of the guarded fault (enabled after: this one then kills unsaid).
    dumps = proc.stderr.count("Fatal Python error: Bus error")
    assert dumps == {"never": 0, "first": 1, "after": 1}[enabled], proc.stderr

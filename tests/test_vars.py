"""Shared state: set_vars() in workers, get_vars() everywhere, ready_on="vars",
and a real gunicorn application reading a worker's publications."""

from __future__ import annotations

import functools
import json
import marshal
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, LeakCheck, published, read_text, run_python, wait_for

import bgpool
from bgpool import WorkerSpec
from bgpool.shm import snapshot
from fixtures.vars_workers import CASES


def vspec(name: str | None, worker: str, **kwargs: Any) -> WorkerSpec:
    return WorkerSpec(name=name, target=f"fixtures.vars_workers:{worker}", **kwargs)


def frozen_equal(frozen: Any, plain: Any) -> bool:
    """Whether a read-only value matches `plain` (lists compare as tuples)."""
    if isinstance(plain, dict):
        return (
            isinstance(frozen, snapshot.Vars)
            and frozen.keys() == plain.keys()
            and all(frozen_equal(frozen[k], v) for k, v in plain.items())
        )
    if isinstance(plain, list | tuple):
        return (
            type(frozen) is tuple
            and len(frozen) == len(plain)
            and all(frozen_equal(f, p) for f, p in zip(frozen, plain, strict=True))
        )
    return type(frozen) is type(plain) and frozen == plain


# -- the format ---------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_allowed_type_round_trips_read_only(make_pool: Any, case: str) -> None:
    pool = make_pool([vspec("w", "publish_case", num=1, env={"CASE": case})])
    value = published(pool, "w")
    assert frozen_equal(value, CASES[case])
    with pytest.raises(TypeError):
        value["new"] = 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{'routes': [1, 2, 3, object()]}", "vars['routes'][3]: values of type object"),
        ("{'a': {1: 'x'}}", "vars['a']: keys must be str, not int"),
        ("{'s': {1, 2}}", "vars['s']: values of type set"),
        ("{'p': Path('/')}", "vars['p']: values of type PosixPath"),
        ("[1, 2]", "vars must be a dict with str keys, not list"),
        ("{'x': True.__class__.__mro__[1](7).__class__}", "vars['x']: values of type type"),
    ],
)
def test_disallowed_values_are_refused_with_their_path(
    make_pool: Any, sentinel_dir: Path, bad: str, message: str
) -> None:
    record = sentinel_dir / "record"
    pool = make_pool(
        [vspec("w", "publish_refused", num=1, env={"BAD": bad, "RECORD": str(record)})]
    )
    text = wait_for(lambda: read_text(record), 10, "the refusal")
    assert text.startswith("TypeError: ") and message in text, text
    with pytest.raises(bgpool.VarsNotPublished, match='"w" has not published any vars yet'):
        pool.get_vars("w")


def test_oversized_snapshot_is_a_value_error(make_pool: Any, sentinel_dir: Path) -> None:
    record = sentinel_dir / "record"
    bad = "{'blob': 'x' * 5000}"
    pool = make_pool(
        [vspec("w", "publish_refused", num=1, env={"BAD": bad, "RECORD": str(record)})],
        max_vars_bytes=4096,
    )
    text = wait_for(lambda: read_text(record), 10, "the refusal")
    assert text.startswith("ValueError: ") and "max_vars_bytes (4096)" in text
    with pytest.raises(bgpool.VarsNotPublished):
        pool.get_vars("w")


def test_a_reader_refuses_bytes_that_are_not_an_allowed_value() -> None:
    code = compile("print('pwned')", "<x>", "exec")
    for data in (marshal.dumps({"c": code}), marshal.dumps({"s": {1}}), marshal.dumps([1]),
                 b"\x00garbage"):  # fmt: skip
        with pytest.raises(snapshot.SnapshotError):
            snapshot.decode(data)


def test_set_vars_outside_a_worker_is_a_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="inside a bgpool worker"):
        bgpool.set_vars({"a": 1})


# -- reading ----------------------------------------------------------------------


def signalled_publisher(make_pool: Any, sentinel_dir: Path) -> tuple[Any, Path, Path]:
    """A pool whose worker "w" publishes {"n": k} when the trigger file says k
    (then records k): the pool, the trigger and the record."""
    trigger, record = sentinel_dir / "trigger", sentinel_dir / "record"
    env = {"TRIGGER": str(trigger), "RECORD": str(record)}
    return make_pool([vspec("w", "publish_on_signal", num=1, env=env)]), trigger, record


def test_same_object_while_unchanged_new_one_after_a_change(
    make_pool: Any, sentinel_dir: Path
) -> None:
    pool, trigger, _ = signalled_publisher(make_pool, sentinel_dir)
    trigger.write_text("1")
    first = published(pool, "w")
    assert dict(first) == {"n": 1}
    assert pool.get_vars("w") is first
    generation = pool.diagnostics("w").vars_generation
    assert generation == 1  # the identical second set_vars() made no new generation
    trigger.write_text("2")
    second = wait_for(lambda: pool.get_vars("w") if pool.get_vars("w") is not first else None, 10)
    assert dict(second) == {"n": 2}
    assert pool.get_vars("w") is second
    diagnostics = pool.diagnostics("w")
    assert diagnostics.vars_generation == 2
    assert diagnostics.vars_published_at is not None


def test_diagnostics_follow_the_segment_at_once(make_pool: Any, sentinel_dir: Path) -> None:
    pool, trigger, record = signalled_publisher(make_pool, sentinel_dir)

    def recorded(n: int) -> bool:
        return read_text(record) == str(n)

    for n in range(1, 4):
        trigger.write_text(str(n))
        wait_for(functools.partial(recorded, n), 10, f"publication {n}")
        # set_vars() has returned: the generation is there, not on its way
        assert pool.diagnostics("w").vars_generation == n


def test_a_worker_that_corrupts_its_header_cannot_break_diagnostics(
    make_pool: Any, sentinel_dir: Path
) -> None:
    record = sentinel_dir / "record"
    env = {"RECORD": str(record), "BREAK": "time"}
    pool = make_pool([vspec("w", "publish_then_break_the_header", num=1, env=env)])
    wait_for(lambda: read_text(record) == "broken", 10, "the corruption")
    diagnostics = pool.diagnostics("w")
    assert diagnostics.vars_generation == 1
    assert diagnostics.vars_published_at is None  # a NaN time is left out
    assert dict(pool.get_vars("w")) == {"ok": 1}


@pytest.mark.parametrize("field", ["area", "length"])
def test_a_header_that_points_outside_its_segment_is_refused(
    make_pool: Any, sentinel_dir: Path, field: str
) -> None:
    record = sentinel_dir / "record"
    env = {"RECORD": str(record), "BREAK": field}
    pool = make_pool([vspec("w", "publish_then_break_the_header", num=1, env=env)])
    wait_for(lambda: read_text(record) == "broken", 10, "the corruption")
    with pytest.raises(bgpool.BgpoolError, match="unreadable: the vars segment's header points"):
        pool.get_vars("w")
    assert pool.diagnostics("w").vars_generation == 0  # what cannot be read is left out


def test_undeclared_and_unpublished_names(make_pool: Any) -> None:
    pool = make_pool([vspec("quiet", "handle_only", num=1)])
    with pytest.raises(
        bgpool.WorkerNotDeclared, match='no background worker configured for name "x"'
    ):
        pool.get_vars("x")
    with pytest.raises(bgpool.VarsNotPublished) as caught:
        pool.get_vars("quiet")
    assert isinstance(caught.value, LookupError)
    assert str(caught.value) == 'background worker "quiet" has not published any vars yet'


def test_get_vars_never_starts_a_worker(make_pool: Any) -> None:
    pool = make_pool(
        [vspec("lazy", "publish_case", env={"CASE": "scalars"}), vspec(None, "publish_case")]
    )
    for name in ("lazy", "tenant-7"):
        with pytest.raises(bgpool.VarsNotPublished):
            pool.get_vars(name)
    assert [s.state for s in pool.status()] == ["stopped"]  # no catch-all instance either


def test_snapshot_survives_a_crash(make_pool: Any, sentinel_dir: Path) -> None:
    marker, record = sentinel_dir / "marker", sentinel_dir / "record"
    pool = make_pool(
        [vspec("w", "crash_after_publishing", env={"MARKER": str(marker), "RECORD": str(record)})]
    )
    pool.ensure("w")
    restarted_pid = int(wait_for(lambda: read_text(record), 10, "the restart"))
    assert marker.exists()
    assert dict(pool.get_vars("w")) == {"run": 1}  # published by the run that crashed
    assert pool.diagnostics("w").instances[0].pid == restarted_pid


def test_catch_all_names_have_their_own_vars(make_pool: Any) -> None:
    pool = make_pool([vspec(None, "publish_case", env={"CASE": "text"})])
    pool.ensure(["t1", "t2"])
    assert frozen_equal(published(pool, "t1"), CASES["text"])
    assert frozen_equal(published(pool, "t2"), CASES["text"])


def test_scopes_resolve_like_ensure(make_pool: Any) -> None:
    api = bgpool.next_scope("api")
    pool = make_pool(
        [
            vspec("w", "publish_case", num=1, env={"CASE": "scalars"}),
            vspec("w", "publish_case", num=1, env={"CASE": "bytes"}, scope=api),
        ]
    )
    assert frozen_equal(published(pool, "w"), CASES["scalars"])
    assert frozen_equal(published(pool, "w", scope=api), CASES["bytes"])
    with pool.request_scope(api):
        assert frozen_equal(pool.get_vars("w"), CASES["bytes"])


# -- readiness on vars -------------------------------------------------------------


def test_ready_on_vars_waits_for_the_first_publication(make_pool: Any) -> None:
    pool = make_pool([vspec("late", "publish_late", env={"DELAY": "0.4"}, ready_on="vars")])
    started = time.monotonic()
    pool.ensure("late")
    assert time.monotonic() - started >= 0.35
    assert dict(pool.get_vars("late")) == {"late": True}


def test_ready_on_vars_timeout_names_the_missing_step(make_pool: Any) -> None:
    pool = make_pool([vspec("mute", "handle_only", ready_on="vars")])
    with pytest.raises(bgpool.EnsureTimeout) as caught:
        pool.ensure("mute", timeout=0.5)
    assert str(caught.value) == 'background worker "mute" did not call set_vars() within 0.5s'


def test_ready_on_handle_stays_the_default(make_pool: Any) -> None:
    pool = make_pool([vspec("mute", "handle_only")])
    pool.ensure("mute", timeout=5)  # ready without publishing anything


# -- other processes -----------------------------------------------------------------


def test_get_vars_from_another_process_and_from_a_worker(
    make_pool: Any, sentinel_dir: Path
) -> None:
    record = sentinel_dir / "record"
    pool = make_pool(
        [
            vspec("src", "publish_case", num=1, env={"CASE": "mixed"}),
            vspec("reader", "read_other", env={"OTHER": "src", "RECORD": str(record)}),
        ]
    )
    published(pool, "src")
    code = textwrap.dedent(
        """
        import bgpool
        client = bgpool.connect()
        value = client.get_vars("src")
        assert value is client.get_vars("src")
        print(value["routes"][0]["path"], type(value["routes"]).__name__)
        client.close()
        """
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["/a", "tuple"]
    pool.ensure("reader")
    text = wait_for(lambda: read_text(record), 10, "the worker's read")
    assert "'/a'" in text and "routes" in text


TORN_READER = """
import sys, time, zlib, bgpool
client = bgpool.connect()
deadline = time.monotonic() + 30.0
seen = torn = 0
last = -1
while seen < int(sys.argv[1]) and time.monotonic() < deadline:
    value = client.get_vars("flags")
    if value["counter"] != last:
        body = {k: v for k, v in value.items() if k != "checksum"}
        if zlib.crc32(repr(sorted(body.items())).encode()) != value["checksum"]:
            torn += 1
        if value["counter"] < last:
            torn += 1  # an older snapshot after a newer one
        last = value["counter"]
        seen += 1
print(seen, torn)
client.close()
"""


def test_no_torn_or_stale_snapshot_under_fast_publishing(make_pool: Any) -> None:
    pool = make_pool(
        [
            WorkerSpec(
                name="flags",
                target="fixtures.webapp.flags:run",
                num=1,
                ready_on="vars",
                env={"FLAGS_INTERVAL": "0"},
            )
        ]
    )
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", TORN_READER, "300"], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        for _ in range(3)
    ]
    results = [r.communicate(timeout=60)[0].split() for r in readers]
    assert all(r.returncode == 0 for r in readers)
    assert [int(torn) for _, torn in results] == [0, 0, 0]
    assert all(int(seen) == 300 for seen, _ in results), results  # each saw 300 snapshots in turn
    assert pool.diagnostics("flags").vars_generation >= 300  # diagnostics count them too


# -- a real web application ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(urllib.request.urlopen(url, timeout=10).read())
    return result


@pytest.mark.timeout(90)
def test_gunicorn_workers_serve_what_the_worker_publishes(no_leaks: LeakCheck) -> None:
    port = _free_port()
    env = {**os.environ, "WEBAPP_BIND": f"127.0.0.1:{port}", "WEBAPP_WORKERS": "3",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "fixtures/webapp/gunicorn_conf.py",
         "--log-level", "warning", "fixtures.webapp.app:application"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"

        def up() -> dict[str, Any] | None:
            assert server.poll() is None, "gunicorn exited"
            try:
                return _get(url)
            except OSError:
                return None

        first = wait_for(up, 30, "gunicorn to answer")
        replies = [first]
        servers = {first["served_by"]}
        deadline = time.monotonic() + 20

        def settled() -> bool:
            advanced = replies[-1]["flags"]["counter"] > first["flags"]["counter"] + 3
            return len(servers) >= 2 and advanced

        while not settled() and time.monotonic() < deadline:
            replies.append(_get(url))
            servers.add(replies[-1]["served_by"])
        counters = [r["flags"]["counter"] for r in replies]
        assert len(servers) >= 2, "several gunicorn worker processes should answer"
        assert counters[-1] > counters[0] + 3, "the values follow the worker's publications"
        assert len({r["flags"]["publisher"] for r in replies}) == 1
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0

"""Bad input at every boundary.

- every argument error of ``ensure()`` (``TypeError`` for a wrong type;
  ``ValueError`` for an empty batch, an empty, overlong, control-character,
  lone-surrogate or duplicate name, a timeout that is not a finite number > 0, an
  unknown scope label), and the same checks in ``diagnostics()`` / ``get_vars()``,
  on the owner's Pool and on a ``connect()`` client, raised before anything starts;
- every declaration error, reported at once with its field path;
- a config file that raises on import: ``bgpool run`` exits 2 with the traceback,
  nothing started;
- a target whose module fails to import in the worker: the diagnostics show the
  ImportError;
- the control socket: a fuzz loop of a few thousand garbage, truncated, oversized,
  non-JSON, non-object and wrong-typed messages (each closes its connection and
  nothing else), then ``ensure()`` still works and the supervisor holds no more
  descriptors than before.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import random
import socket
import struct
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    BgpoolRun,
    Evil,
    frame,
    raw_connect,
    read_until_closed,
    resources,
    socket_dirs,
    spec,
    state,
    supervisor_pid,
    wait_for,
    worker_children,
)
from pydantic import ValidationError

import bgpool

MAX_FRAME = 4 << 20

# --------------------------------------------------------------- ensure() arguments

TYPE_ERRORS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("names int", (42,), {}),
    ("names None", (None,), {}),
    ("names bytes", (b"lazy",), {}),
    ("names bytearray", (bytearray(b"lazy"),), {}),
    ("names set", ({"lazy"},), {}),
    ("names dict", ({"lazy": 1},), {}),
    ("names generator", ((n for n in ["lazy"]),), {}),
    ("element int", (["lazy", 1],), {}),
    ("element None", (("lazy", None),), {}),
    ("element bytes", ([b"lazy"],), {}),
    ("element list", (["lazy", ["x"]],), {}),
    ("timeout True", ("lazy",), {"timeout": True}),
    ("timeout False", ("lazy",), {"timeout": False}),
    ("timeout str", ("lazy",), {"timeout": "5"}),
    ("timeout list", ("lazy",), {"timeout": [5]}),
    ("timeout Decimal", ("lazy",), {"timeout": Decimal(5)}),
    ("timeout complex", ("lazy",), {"timeout": 5j}),
    ("timeout object", ("lazy",), {"timeout": object()}),
    ("undeclared and int", (["undeclared", 3],), {}),
]

VALUE_ERRORS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("empty string", ("",), {}),
    ("empty list", ([],), {}),
    ("empty tuple", ((),), {}),
    ("empty element", (["lazy", ""],), {}),
    ("NUL", ("la\x00zy",), {}),
    ("NUL element", (["lazy", "x\x00"],), {}),
    ("newline", ("la\nzy",), {}),
    ("escape", ("\x1b[31mred",), {}),
    ("DEL", ("la\x7fzy",), {}),
    ("129 bytes", ("x" * 129,), {}),
    ("130 bytes of é", ("é" * 65,), {}),
    ("10 kB", ("x" * 10_000,), {}),
    ("lone surrogate", ("a\ud800",), {}),
    ("duplicates", (["lazy", "lazy"],), {}),
    ("duplicates tuple", (("lazy", "other", "lazy"),), {}),
    ("timeout 0", ("lazy",), {"timeout": 0}),
    ("timeout -1", ("lazy",), {"timeout": -1}),
    ("timeout nan", ("lazy",), {"timeout": math.nan}),
    ("timeout inf", ("lazy",), {"timeout": math.inf}),
    ("timeout -inf", ("lazy",), {"timeout": -math.inf}),
    ("undeclared and empty", (["undeclared", ""],), {}),
]


@pytest.fixture
def lazy_pool(make_pool: Any) -> Any:
    return make_pool([spec("lazy", "idle"), spec("other", "idle"), spec(None, "idle")])


def _nothing_started(pool: Any) -> None:
    for row in pool.status():
        assert state(row.state) == "stopped" and row.attempts == 0, row
    assert not worker_children(supervisor_pid(pool)), "a worker was forked"


def _expect(
    call: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    kind: type[BaseException],
    what: str,
) -> str | None:
    """None if ``call(*args, **kwargs)`` raises ``kind``, else what happened."""
    try:
        call(*args, **kwargs)
    except kind:
        return None
    except Exception as exc:
        return f"{what}: {type(exc).__name__}: {exc}"
    return f"{what}: no error"


def test_ensure_argument_errors_start_nothing(lazy_pool: Any) -> None:
    client = bgpool.connect()
    try:
        problems = []
        for who, target in (("Pool", lazy_pool), ("client", client)):
            for what, args, kwargs in TYPE_ERRORS:
                problems.append(_expect(target.ensure, args, kwargs, TypeError, f"{who} {what}"))
            for what, args, kwargs in VALUE_ERRORS:
                problems.append(_expect(target.ensure, args, kwargs, ValueError, f"{who} {what}"))
            for what, bad, kind in (
                ("int", 42, TypeError),
                ("empty", "", ValueError),
                ("NUL", "a\0", ValueError),
                ("control", "a\x01", ValueError),
                ("10 kB", "x" * 10_000, ValueError),
            ):
                for method in ("diagnostics", "get_vars"):
                    problems.append(
                        _expect(getattr(target, method), (bad,), {}, kind, f"{who} {method} {what}")
                    )
            problems.append(
                _expect(target.ensure, ("lazy",), {"scope": 42}, TypeError, f"{who} scope int")
            )
            problems.append(
                _expect(
                    target.ensure,
                    ("lazy",),
                    {"scope": "no-such-label"},
                    ValueError,
                    f"{who} unknown scope label",
                )
            )
        failed = [p for p in problems if p]
        assert not failed, "\n".join(failed)
        _nothing_started(lazy_pool)
    finally:
        client.close()


def test_name_length_is_counted_in_utf8_bytes(make_pool: Any) -> None:
    pool = make_pool([spec("lazy", "idle")])
    for name in ("x" * 128, "é" * 64, "日" * 42 + "xx"):
        assert len(name.encode()) == 128
        with pytest.raises(bgpool.WorkerNotDeclared):  # valid: resolved, not rejected
            pool.ensure(name, timeout=1)
    _nothing_started(pool)


def test_resolution_errors_start_nothing(make_pool: Any) -> None:
    api = bgpool.next_scope("api")
    pool = make_pool([spec("lazy", "idle"), spec("other", "idle"), spec(None, "idle", scope=api)])
    with pytest.raises(bgpool.WorkerNotDeclared):
        pool.ensure(["lazy", "other", "undeclared"], timeout=5)
    _nothing_started(pool)
    pool2 = make_pool([spec("lazy", "idle"), spec(None, "idle", max_instances=2)])
    with pytest.raises(bgpool.CatchAllLimitReached):
        pool2.ensure(["lazy", "t-1", "t-2", "t-3"], timeout=5)
    _nothing_started(pool2)


@pytest.mark.parametrize("timeout", [1e300, float(sys.maxsize), 2**63])
def test_a_huge_finite_timeout_is_a_valid_timeout(make_pool: Any, timeout: float) -> None:
    """A timeout is valid when it is a finite number > 0. A deadline far in the
    future (``sys.maxsize``, a common "forever") must just wait, not crash."""
    pool = make_pool([spec("lazy", "idle")])
    pool.ensure("lazy", timeout=timeout)
    assert state(pool.status()[0].state) == "ready"


# ----------------------------------------------------------- declaration errors

GOOD = "fixtures.workers:idle"

# WorkerSpec(**kwargs) -> the field path its ValidationError must name (CONFIG_ERRORS:
# the same for PoolConfig).
WORKER_SPEC_ERRORS: list[tuple[dict[str, Any], tuple[Any, ...]]] = [
    ({}, ("target",)),
    ({"target": "nocolon"}, ("target",)),
    ({"target": "os:system; rm -rf /"}, ("target",)),
    ({"target": "a.b:c\x00"}, ("target",)),
    ({"target": 42}, ("target",)),
    ({"target": GOOD, "name": ""}, ("name",)),
    ({"target": GOOD, "name": "a\x00b"}, ("name",)),
    ({"target": GOOD, "name": "a\nb"}, ("name",)),
    ({"target": GOOD, "name": "x" * 129}, ("name",)),
    ({"target": GOOD, "name": "x" * 10_000}, ("name",)),
    ({"target": GOOD, "name": 42}, ("name",)),
    ({"target": GOOD, "name": "a", "num": -1}, ("num",)),
    ({"target": GOOD, "name": "a", "num": "two"}, ("num",)),
    ({"target": GOOD, "num": 1}, ("num",)),
    ({"target": GOOD, "name": "a", "max_instances": 3}, ("max_instances",)),
    ({"target": GOOD, "max_instances": 0}, ("max_instances",)),
    ({"target": GOOD, "max_consecutive_failures": 0}, ("max_consecutive_failures",)),
    ({"target": GOOD, "max_consecutive_failures": -2}, ("max_consecutive_failures",)),
    ({"target": GOOD, "env": {"": "x"}}, ("env",)),
    ({"target": GOOD, "env": {"A=B": "x"}}, ("env",)),
    ({"target": GOOD, "env": {"A": "x\x00"}}, ("env",)),
    ({"target": GOOD, "env": {"A": 1}}, ("env", "A")),
    ({"target": GOOD, "args": ["a\x00"]}, ("args",)),
    ({"target": GOOD, "args": "not-a-list"}, ("args",)),
    ({"target": GOOD, "scope": "api"}, ("scope",)),
    ({"target": GOOD, "output": "file"}, ("output",)),
    ({"target": GOOD, "ready_on": "never"}, ("ready_on",)),
    ({"target": GOOD, "restart": "always"}, ("restart",)),
]

CONFIG_ERRORS: list[tuple[dict[str, Any], tuple[Any, ...]]] = [
    ({"ensure_timeout": 0}, ("ensure_timeout",)),
    ({"ensure_timeout": -1}, ("ensure_timeout",)),
    ({"ensure_timeout": math.nan}, ("ensure_timeout",)),
    ({"ensure_timeout": math.inf}, ("ensure_timeout",)),
    ({"grace_period": -1}, ("grace_period",)),
    ({"grace_period": math.nan}, ("grace_period",)),
    ({"restart_grace_period": math.inf}, ("restart_grace_period",)),
    ({"start_method": "forkserver"}, ("start_method",)),
    ({"metrics_port": 70000}, ("metrics_port",)),
    ({"metrics_port": -1}, ("metrics_port",)),
    ({"max_vars_bytes": 0}, ("max_vars_bytes",)),
    ({"root": "/nonexistent/dir"}, ("root",)),
    ({"workers": "fixtures.workers:idle"}, ("workers",)),
    ({"poll_interval": 1}, ("poll_interval",)),
]


def test_declaration_errors_name_their_field() -> None:
    problems = []
    for kwargs, loc in WORKER_SPEC_ERRORS:
        try:
            bgpool.WorkerSpec(**kwargs)
        except ValidationError as exc:
            locs = [e["loc"] for e in exc.errors()]
            if not any(tuple(found[: len(loc)]) == loc for found in locs):
                problems.append(f"WorkerSpec({kwargs!r:.80}): error at {locs}, expected {loc}")
        else:
            problems.append(f"WorkerSpec({kwargs!r:.80}) accepted")
    for kwargs, loc in CONFIG_ERRORS:
        kwargs = {"workers": [], **kwargs}
        try:
            bgpool.PoolConfig(**kwargs)
        except ValidationError as exc:
            locs = [e["loc"] for e in exc.errors()]
            if not any(tuple(found[: len(loc)]) == loc for found in locs):
                problems.append(f"PoolConfig({kwargs!r:.80}): error at {locs}, expected {loc}")
        else:
            problems.append(f"PoolConfig({kwargs!r:.80}) accepted")
    assert not problems, "\n".join(problems)


def test_every_declaration_error_is_reported_at_once() -> None:
    workers: list[Any] = [  # raw dicts: PoolConfig validates them into WorkerSpecs
        {"target": GOOD, "name": ""},
        {"target": GOOD, "name": "b", "num": -1},
        {"target": "bad target"},
        {"target": GOOD, "name": "d", "max_instances": 2},
    ]
    with pytest.raises(ValidationError) as info:
        bgpool.PoolConfig(workers=workers)
    locs = {e["loc"][:3] for e in info.value.errors()}
    assert locs == {
        ("workers", 0, "name"),
        ("workers", 1, "num"),
        ("workers", 2, "target"),
        ("workers", 3, "max_instances"),
    }, locs
    workers = [
        {"target": "no_such_module_rel:run", "name": "a"},
        {"target": GOOD, "name": "a"},
        {"target": GOOD},
        {"target": GOOD},
        {"target": "no/such/script.py", "name": "s"},
    ]
    with pytest.raises(ValidationError) as info:
        bgpool.PoolConfig(workers=workers)
    found = {e["loc"]: e["type"] for e in info.value.errors()}
    assert found == {
        ("workers", 0, "target"): "target_not_found",
        ("workers", 1, "name"): "duplicate_name",
        ("workers", 3, "name"): "duplicate_catch_all",
        ("workers", 4, "target"): "target_not_found",
    }, found


# -------------------------------------------------------------- bgpool run, imports


def test_run_with_a_config_that_raises_on_import_starts_nothing(sentinel_dir: Path) -> None:
    dirs_before = socket_dirs()
    run = BgpoolRun("fixtures/bad_config.py", sentinel_dir)
    try:
        status = run.wait(30)
    finally:
        run.close()
    stdout, stderr = run.text(), run.stderr()
    assert status == 2, (status, stdout, stderr)
    assert "Traceback" in stderr, stderr
    assert "RuntimeError: bad_config raises on import on purpose" in stderr
    assert "bad_config.py" in stderr
    assert "BGPOOL_ADDRESS" not in stdout + stderr, "a pool was started"
    assert socket_dirs() == dirs_before, "a socket directory was created"


def _check_import_error(diag: Any) -> None:
    error = diag.last_error
    assert error is not None, diag
    assert error.type == "ModuleNotFoundError", error
    assert "this_module_does_not_exist" in error.message, error
    assert error.filename is not None and error.filename.endswith("broken_import.py"), error
    assert error.lineno == 3, error
    assert "ModuleNotFoundError" in error.traceback, error


def test_target_whose_module_fails_to_import(make_pool: Any) -> None:
    pool = make_pool(
        [
            bgpool.WorkerSpec(
                name="broken", target="fixtures.broken_import:run", max_consecutive_failures=2
            ),
            spec("fine", "idle", num=1),
        ]
    )
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.ensure("broken", fail_fast=True, timeout=10)
    assert "ModuleNotFoundError" in str(info.value), info.value
    _check_import_error(info.value.diagnostics)
    with pytest.raises(bgpool.WorkerAborted) as aborted:
        pool.ensure("broken", timeout=10)
    _check_import_error(aborted.value.diagnostics)
    diag = pool.diagnostics("broken")
    assert diag.state == "aborted" and diag.last_exit_status == 1, diag
    _check_import_error(diag)
    pool.ensure("fine")  # the rest of the pool is unaffected


def test_target_whose_import_ends_the_process(make_pool: Any) -> None:
    """Its module's import kills the code generation (os._exit(3)): the
    generation is loaded again without it, so the rest of the pool starts,
    and the worker that needs it imports it itself and fails as it does."""
    pool = make_pool(
        [
            bgpool.WorkerSpec(
                name="exits", target="fixtures.exits_at_import:run", max_consecutive_failures=2
            ),
            spec("fine", "idle", num=1),
        ]
    )
    with pytest.raises(bgpool.WorkerBootFailed) as info:
        pool.ensure("exits", timeout=10)
    assert "exit status 3" in str(info.value), info.value
    assert pool.diagnostics("exits").last_exit_status == 3
    pool.ensure("fine")
    (before,) = [s.pid for s in pool.status() if s.name == "fine"]
    pool.restart_workers()  # a new generation: it too loads without the module
    (after,) = [s.pid for s in pool.status() if s.name == "fine"]
    assert after != before and pool.diagnostics("fine").state == "ready"


@pytest.mark.parametrize(
    ("module", "cause"),
    [("broken_import", "ModuleNotFoundError"), ("exits_at_import", "exit status 3")],
    ids=["fails-to-import", "ends-the-process"],
)
def test_eager_target_whose_module_cannot_load(make_pool: Any, module: str, cause: str) -> None:
    pool = make_pool(
        [
            bgpool.WorkerSpec(
                name="broken",
                target=f"fixtures.{module}:run",
                num=2,
                max_consecutive_failures=2,
            ),
            spec("fine", "idle", num=1),
        ],
        start=False,
    )
    with pytest.raises(bgpool.StartupError) as info:
        pool.start()
    assert '"broken"' in str(info.value) and cause in str(info.value), info.value
    (diag,) = info.value.diagnostics  # "fine" started: the failure is the module's alone
    if module == "broken_import":
        _check_import_error(diag)
    else:
        assert diag.name == "broken" and diag.last_exit_status == 3, diag
    assert not psutil.Process().children(recursive=True), "start() failed but left processes"


# ------------------------------------------------------------------ notify pipe


def test_bad_reports_on_the_notify_pipe(make_pool: Any) -> None:
    """The notify pipe is a boundary too: whatever a worker writes there (garbage,
    an oversized frame, reports with wrong types or values JSON allows but no real
    report has, such as NaN or a timestamp in the year 10^292), the supervisor
    keeps serving, and ``diagnostics()`` of that worker still answers. A worker
    whose readiness report was lost in the garbage may time out; nothing else."""
    from fixtures.rel_notify import PAYLOADS

    bad = {f"bad-{k}": {"SEND": k} for k in PAYLOADS}
    bad |= {f"exit-{k}": {"SEND": k, "EXIT": "1"} for k in ("error-types", "error-huge")}
    pool = make_pool(
        [
            bgpool.WorkerSpec(
                name=name, target="fixtures.rel_notify:send", env=env, max_consecutive_failures=-1
            )
            for name, env in bad.items()
        ]
        + [spec("ok", "idle"), spec("eager", "idle", num=1)]
    )
    sup = supervisor_pid(pool)

    def exited_twice(name: str) -> bool:
        return bool(pool.diagnostics(name).attempts >= 2)

    problems = []
    for name in bad:
        try:
            pool.ensure(name, timeout=1.0)
        except bgpool.EnsureTimeout:
            pass
        except Exception as exc:
            problems.append(f"ensure({name}): {type(exc).__name__}: {exc}")
        if name.startswith("exit-"):
            wait_for(functools.partial(exited_twice, name), what=f"{name} exits")
        try:
            diag = pool.diagnostics(name)
            json.dumps(diag.model_dump(mode="json"))
            if diag.last_error is not None and len(diag.last_error.type) > 1000:
                problems.append(f"diagnostics({name}): error type of {len(diag.last_error.type)}")
        except Exception as exc:
            problems.append(f"diagnostics({name}): {type(exc).__name__}: {exc}")
    assert supervisor_pid(pool) == sup and psutil.pid_exists(sup)
    assert len(pool.status()) == len(bad) + 2
    pool.ensure("ok", timeout=5)
    assert pool.diagnostics("ok").state == "ready"
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- control socket


BAD_NAMES = ["", "a\x00b", "a\nb", "\x1b[2J", "x" * 129, "x" * 10_000, "a\x7f"]
WRONG = [None, True, False, 0, -1, 1.5, "", "x", [], ["x"], {}, {"a": 1}]


def _wrong_typed(rng: random.Random) -> dict[str, Any]:
    """A well-framed JSON object that is not a valid request: one field of a valid
    request replaced by a value of the wrong type (or a forbidden value)."""
    kind = rng.randrange(7)
    if kind == 0:
        return {"op": rng.choice([None, 1, 2.5, True, [], {}, ["ensure"], "", "ENSURE", "x" * 50])}
    if kind == 1:
        return {"op": "ensure", "names": rng.choice([None, 1, "lazy", {}, {"lazy": 1}, True])}
    if kind == 2:
        bad: Any = rng.choice([1, None, True, [], {}, 2.5, ["x"], *BAD_NAMES])
        return {"op": "ensure", "names": ["lazy", bad] if rng.random() < 0.5 else [bad]}
    if kind == 3:
        return {"op": "ensure", "names": ["lazy", "lazy"]}
    if kind == 4:
        value = rng.choice(["5", "", [], {}, [5], True, False, 0, -1, -0.5])
        return {"op": "ensure", "names": ["lazy"], "timeout": value}
    if kind == 5:
        return {"op": "ensure", "names": ["lazy"], "scope": rng.choice([1.5, [], {}, True, -3])}
    op = rng.choice(["diagnostics", "locate"])
    return {"op": op, "name": rng.choice([None, 1, [], {}, ["lazy"], True, *BAD_NAMES])}


def _messages(rng: random.Random, evil: bytes) -> list[tuple[str, bytes, bool]]:
    """(kind, bytes to send, whether we half-close after sending). The supervisor
    must close every one of these connections without a successful reply."""
    valid = frame({"op": "ensure", "names": ["lazy"], "timeout": 5})
    out: list[tuple[str, bytes, bool]] = []
    for _ in range(700):
        out.append(("garbage", rng.randbytes(rng.randint(0, 400)), True))
    for _ in range(400):
        out.append(("truncated", valid[: rng.randint(1, len(valid) - 1)], True))
    for _ in range(300):
        length = rng.randint(MAX_FRAME + 1, 2**32 - 1)
        out.append(
            ("oversized", struct.pack(">I", length) + rng.randbytes(rng.randint(0, 64)), False)
        )
    for _ in range(300):
        body = rng.randbytes(rng.randint(1, 200))
        out.append(("not json", struct.pack(">I", len(body)) + body, False))
    for _ in range(100):
        body = b'{"op": "ensure", "names": ["l\xff\xfezy"]}'
        out.append(("bad utf-8", struct.pack(">I", len(body)) + body, False))
    for _ in range(200):
        value = rng.choice([[], [1, 2], 1, -2.5, "ensure", None, True, [{"op": "ensure"}]])
        out.append(("not an object", frame(value), False))
    for _ in range(900):
        out.append(("wrong type", frame(_wrong_typed(rng)), False))
    for raw in (
        b'{"op": "ensure", "names": ["lazy"], "timeout": NaN}',
        b'{"op": "ensure", "names": ["lazy"], "timeout": Infinity}',
        b'{"op": "ensure", "names": ["lazy"], "timeout": -Infinity}',
        b'{"op": "ensure", "names": ["lazy"], "timeout": 1e999}',
        b'{"op": "ensure", "names": ["lazy"], "timeout": 1' + b"0" * 400 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    ):
        out.append(("bad value", struct.pack(">I", len(raw)) + raw, False))
    for payload in (
        evil,
        struct.pack(">I", len(evil)) + evil,
        struct.pack("<I", len(evil)) + evil,
        evil + b"\n",
        frame({"op": "ensure", "names": ["lazy"], "pickle": evil.hex()})[:-1] + b"X",
        struct.pack(">I", len(pickle.dumps(Evil("x"), protocol=0)))
        + pickle.dumps(Evil("x"), protocol=0),
    ):
        out.append(("pickle", payload, True))
    rng.shuffle(out)
    return out


def _fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_control_socket_fuzz(make_pool: Any, sentinel_dir: Path, capfd: Any) -> None:
    """A few thousand malformed messages, each on its own connection: every one
    is closed by the supervisor with no successful reply, within a short bound; the
    supervisor is unaffected (same pid, same descriptors, nothing started), nothing
    is unpickled, nothing the clients sent reaches its log unescaped, and
    ``ensure()`` works afterwards."""
    seed = int(os.environ.get("REL_FUZZ_SEED", "20260707"))
    rng = random.Random(seed)
    pool = make_pool([spec("lazy", "idle"), spec("fresh", "idle"), spec("eager", "idle", num=1)])
    pool.ensure("lazy")  # the messages name it: if one started something, it shows
    res = resources(pool)
    sup = supervisor_pid(pool)
    fds = _fds_of(sup)
    marker = sentinel_dir / "unpickled"
    evil = pickle.dumps(Evil(str(marker)))
    answered: list[str] = []
    left_open: list[str] = []
    t0 = time.monotonic()
    messages = _messages(rng, evil)
    assert len(messages) >= 2500
    for kind, payload, half_close in messages:
        with raw_connect(res.address) as sock:
            try:
                sock.sendall(payload)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                continue  # closed on us mid-send: that is a close
            data, closed = read_until_closed(sock, timeout=2.0, stop_on_reply=True)
        sample = f"{kind}: {payload[:80]!r}"
        if data:
            answered.append(f"{sample} -> {data[:120]!r}")
        elif not closed:
            left_open.append(sample)
    elapsed = time.monotonic() - t0
    problems = []
    if answered:
        problems.append(f"{len(answered)} answered instead of closed, e.g. {answered[:4]}")
    if left_open:
        problems.append(f"{len(left_open)} left open for 2s, e.g. {left_open[:4]}")
    assert not marker.exists(), "the supervisor unpickled bytes sent by a client"
    assert psutil.Process(sup).is_running()
    with raw_connect(res.address):
        pass
    assert res.supervisor == sup
    wait_for(lambda: _fds_of(sup) <= fds, timeout=5, what="the supervisor's fds back to normal")
    assert [r.attempts for r in pool.status() if r.name == "lazy"] == [1], pool.status()
    _nothing_started_but(pool, {"eager", "lazy"})
    pool.ensure("fresh", timeout=10)  # the supervisor still starts workers
    assert pool.diagnostics("fresh").state == "ready"
    err = capfd.readouterr().err
    raw = [line for line in err.splitlines() if any(c in line for c in "\x1b\x00\x07\x08\x7f")]
    if raw:
        problems.append(f"client bytes in the supervisor's log unescaped: {raw[:3]!r}")
    assert not problems, f"(seed {seed}, {len(messages)} messages in {elapsed:.1f}s)\n" + "\n".join(
        problems
    )


def _nothing_started_but(pool: Any, running: set[str]) -> None:
    for row in pool.status():
        if row.name not in running:
            assert state(row.state) == "stopped" and row.attempts == 0, row


def test_idle_and_partial_connections_do_not_block_the_supervisor(make_pool: Any) -> None:
    """A client that connects and says nothing, or sends half a frame and stalls,
    holds only its own connection: 200 of them, and ensure() still answers."""
    pool = make_pool([spec("lazy", "idle"), spec("eager", "idle", num=1)])
    pool.ensure("lazy")
    sup = supervisor_pid(pool)
    fds = _fds_of(sup)
    socks = []
    try:
        for i in range(200):
            sock = raw_connect(pool.address)
            if i % 2:
                sock.sendall(frame({"op": "ensure", "names": ["lazy"]})[:7])
            socks.append(sock)
        t0 = time.monotonic()
        pool.restart_workers()
        pool.ensure("lazy", timeout=5)
        pool.diagnostics("lazy")
        assert time.monotonic() - t0 < 2.0
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: _fds_of(sup) <= fds, timeout=5, what="idle connections released")


def test_a_client_that_never_reads_its_replies(make_pool: Any) -> None:
    """Requests pipelined on one connection whose client never reads: the
    supervisor queues the replies without blocking, keeps serving others, and
    forgets the connection when it closes."""
    pool = make_pool([spec("eager", "idle", num=1)])
    sup = supervisor_pid(pool)
    fds = _fds_of(sup)
    sock = raw_connect(pool.address)
    request = frame({"op": "diagnostics", "name": "eager"})
    try:
        sock.settimeout(0.0)
        for _ in range(20_000):
            try:
                sock.send(request)
            except BlockingIOError:
                break
        t0 = time.monotonic()
        pool.diagnostics("eager")
        assert time.monotonic() - t0 < 2.0, "a stalled client blocked the supervisor"
    finally:
        sock.close()
    wait_for(lambda: _fds_of(sup) <= fds, timeout=5, what="the stalled connection released")
    assert json.dumps(pool.diagnostics("eager").model_dump(mode="json"))

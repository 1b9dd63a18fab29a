"""Pure building blocks: timers, message framing, failure texts, immortal objects."""

from __future__ import annotations

import json
import socket
import struct
import sys
from typing import Any

import pytest

from bgpool import _heap, protocol, texts
from bgpool.supervisor.timers import Timers


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_timers_run_in_deadline_order_and_skip_cancelled() -> None:
    clock = FakeClock()
    timers = Timers(clock)
    ran: list[str] = []
    timers.call_later(2.0, lambda: ran.append("b"))
    timers.call_later(1.0, lambda: ran.append("a"))
    dropped = timers.call_later(1.5, lambda: ran.append("x"))
    dropped.cancel()
    assert timers.next_timeout() == pytest.approx(1.0)
    clock.now += 1.0
    timers.run_due()
    assert ran == ["a"]
    assert timers.next_timeout() == pytest.approx(1.0)  # the cancelled one is skipped
    clock.now += 5
    timers.run_due()
    assert ran == ["a", "b"]
    assert timers.next_timeout() is None


def test_frames_round_trip_in_pieces() -> None:
    messages: list[dict[str, Any]] = [
        {"op": "ensure", "names": ["a", "ü"], "timeout": 1.5},
        {"ok": True},
    ]
    data = b"".join(protocol.encode(m) for m in messages)
    decoder = protocol.FrameDecoder()
    received = []
    for byte in data:
        received += decoder.feed(bytes([byte]))
    assert received == messages


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe", b"[1, 2]", b"not json", b'"a string"', b"{" * 100000],
)
def test_malformed_frames_are_protocol_errors(payload: bytes) -> None:
    frame = struct.pack(">I", len(payload)) + payload
    with pytest.raises(protocol.ProtocolError):
        protocol.FrameDecoder().feed(frame)


def test_oversized_frame_is_rejected_before_it_is_buffered() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.FrameDecoder().feed(struct.pack(">I", protocol.MAX_FRAME + 1))


def test_blocking_request_and_reply_over_a_socket_pair() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.sendall(protocol.encode({"ok": True, "n": 1}))
        assert protocol.request(left, {"op": "hello"}) == {"ok": True, "n": 1}
        assert protocol.receive(right) == {"op": "hello"}


def test_nan_cannot_be_sent() -> None:
    with pytest.raises(ValueError):
        protocol.encode({"timeout": float("nan")})
    assert json.loads(protocol.encode({"a": 1})[4:]) == {"a": 1}


ERROR = {"type": "RuntimeError", "message": "boom", "filename": "/abs/x.py", "lineno": 12}


def test_exit_words_name_signals() -> None:
    assert texts.exit_words(1) == "exit status 1"
    assert texts.exit_words(0) == "exit status 0"
    assert texts.exit_words(-9) == "killed by SIGKILL"
    assert texts.signal_name(-15) == "SIGTERM"
    assert texts.signal_name(3) is None


def test_timeout_texts_follow_spec() -> None:
    failure = texts.Failure(3, 1, "myapp/x.py", ERROR)
    assert texts.not_ready("x", 5, failure, "call get_worker_handle()") == (
        'background worker "x" did not become ready within 5s; last attempt 3 failed '
        "(exit status 1, target myapp/x.py): RuntimeError: boom (/abs/x.py, line 12)"
    )
    assert texts.not_ready("x", 0.5, None, "call get_worker_handle()") == (
        'background worker "x" did not call get_worker_handle() within 0.5s'
    )


def test_abort_and_boot_texts_follow_spec() -> None:
    failure = texts.Failure(1, 1, "t.py", None)
    assert texts.aborted("x", 6, failure) == (
        'background worker "x" failed to start: 6 consecutive failures '
        "(last exit status 1, target t.py)"
    )
    assert texts.boot_failed("x", texts.Failure(1, -9, "t.py", None)) == (
        'background worker "x" failed to boot: attempt 1 failed (killed by SIGKILL, target t.py)'
    )
    assert texts.limit_reached("x", 16) == (
        'cannot start background worker "x": limit of 16 reached '
        "(raise max_instances or declare it as a named worker)"
    )
    assert texts.not_declared("x") == 'no background worker configured for name "x"'


def _graph() -> dict[str, Any]:
    """Objects that reach nothing global: a dict holding a list and a code
    object, whose constants are fresh objects of their own."""
    code = compile("x = ('a', 'b' * 3, 12345678901)", "<graph>", "exec")
    return {"list": [object()], "code": code}


def _immortal(obj: object) -> bool:
    return sys.getrefcount(obj) == sys.getrefcount(None)


@pytest.mark.skipif(not _heap.IMMORTAL_OBJECTS, reason="immortal objects: Python 3.12 and later")
def test_immortalize_reaches_containers_and_code_constants() -> None:
    graph = _graph()
    code = graph["code"]
    constants = code.co_consts[0]
    reached = [graph, graph["list"], graph["list"][0], code, constants, constants[2]]
    assert not any(_immortal(o) for o in reached)
    assert _heap.immortalize([graph]) >= len(reached)
    assert all(_immortal(o) for o in reached)
    assert _heap.immortalize([graph]) == 0
    graph["later"] = [object()]  # into a container made immortal before
    assert _heap.immortalize([graph]) == 2
    assert _immortal(graph["later"]) and _immortal(graph["later"][0])


@pytest.mark.skipif(_heap.IMMORTAL_OBJECTS, reason="Python 3.12 and later have immortal objects")
def test_immortalize_does_nothing_without_immortal_objects() -> None:
    graph = _graph()
    before = sys.getrefcount(graph["list"])
    assert _heap.immortalize([graph]) == 0
    after = sys.getrefcount(graph["list"])
    assert after == before


def test_immortalize_takes_a_list() -> None:
    with pytest.raises(TypeError, match="list"):
        _heap.immortalize((object(),))  # type: ignore[arg-type]

"""How the benchmark hears back from other processes: polling for a condition,
FIFOs (a worker's first line, a crash trigger), files written whole (a worker's or a
reader's results), and forked children that run one function and send back what it
returns. Every child here is forked (multiprocessing's fork context), so it shares
this process's imports and objects and costs no interpreter start-up."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import select
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FORK = multiprocessing.get_context("fork")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.01) -> Any:
    """`predicate()`'s first true value, polled every `poll` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def make_fifo(path: Path) -> int:
    """A FIFO at `path`, opened read-write and non-blocking (never EOF, never
    blocks a writer's open)."""
    os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK)


def drain_fd(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def wait_readable(fd: int, timeout: float, what: str) -> None:
    """Wait for a byte on `fd` (a FIFO of first lines), reading what is there."""
    wait_bytes(fd, 1, timeout, what)


def wait_bytes(fd: int, count: int, timeout: float, what: str) -> None:
    """Read `fd` until `count` bytes came (one a worker's first line)."""
    deadline = time.monotonic() + timeout
    got = 0
    while got < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} ({got} of {count})")
        got += len(os.read(fd, 65536))


def wait_file(path: Path, timeout: float) -> Any:
    """The JSON in `path`, once it exists (its writer replaces it whole)."""
    wait_until(path.exists, timeout, f"{path.name}", poll=0.005)
    return json.loads(path.read_text())


def in_child(function: Callable[..., Any], *args: Any, timeout: float = 300) -> Any:
    """Run `function(*args)` in a forked child; return what it returns."""
    parent, child = FORK.Pipe(duplex=False)

    def main() -> None:
        try:
            child.send(("ok", function(*args)))
        except BaseException as exc:
            child.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))

    proc = FORK.Process(target=main, daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"child {function.__name__} did not answer in {timeout}s")
        status, value = parent.recv()
    finally:
        proc.join(10)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        parent.close()
    if status != "ok":
        raise RuntimeError(f"child {function.__name__} failed: {value}")
    return value


@contextlib.contextmanager
def polling_reader(
    target: Callable[..., None], args: tuple[Any, ...], seen_path: Path
) -> Iterator[None]:
    """For a block: a forked child running `target(*args, seen_path)`, which polls
    for publications and writes what it saw to `seen_path`. The block starts once
    the child wrote `<seen_path>.ready` (it has its first value); afterwards the
    child is joined, and killed if it is still running."""
    reader = FORK.Process(target=target, args=(*args, seen_path), daemon=True)
    reader.start()
    try:
        wait_file(Path(f"{seen_path}.ready"), 30)
        yield
        reader.join(10)
    finally:
        if reader.is_alive():
            reader.kill()
        reader.join()

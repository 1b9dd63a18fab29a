"""The program of the bare floors' helper processes (floors.py runs this file's
source with `python -c`, never imports it): the physical limit of what a
supervisor does for each case, done with os.fork() and pipes by a process of a
chosen size, and timed inside it so that asking costs the figure nothing.

    python -c SOURCE sized ROOT   first import what a running bgpool supervisor
                                  has loaded (bgpool.supervisor.main, the modules
                                  its main() imports, psutil), ROOT on sys.path
    python -c SOURCE clean        nothing imported beyond os, sys and time

It reads one request a line on stdin and writes one line back: "ok" once it is
ready, then the milliseconds of each request ("error ..." when one failed).

    cold            fork a child, read its one-byte handshake
    crash           a ready child stamps CLOCK_MONOTONIC and exits 1; from that
                    stamp: read it, reap the child, fork anew, read the handshake
    start N         fork N children one after the other, read every handshake
    drain N         (N ready children, not timed) close their N stop pipes,
                    reap all N

Every child keeps only its two pipes (os.closerange, one close_range() call a
range, so closing costs the same for the 1st child and the 1,000th), writes its
handshake and blocks reading its stop pipe: EOF means exit 0, a byte means
crash. Children are stopped (stop pipes closed, reaped) after every timed
request, untimed; if this process dies, their stop pipes close and they exit.
"""

import os
import sys
import time

MAX_FD = os.sysconf("SC_OPEN_MAX")


def child(ready_w: int, stop_r: int) -> None:
    """A forked child's whole life: its handshake, then wait on the stop pipe."""
    code = 0
    try:
        low, high = sorted((ready_w, stop_r))
        os.closerange(0, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, MAX_FD)
        os.write(ready_w, b"r")
        if os.read(stop_r, 1):  # a byte, not EOF: crash, saying when
            os.write(ready_w, str(time.monotonic_ns()).encode())
            code = 1
    finally:
        os._exit(code)


def spawn() -> tuple[int, int, int]:
    """Fork one child; return its pid, the read end of its handshake pipe and
    the write end of its stop pipe."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        child(ready_w, stop_r)
    os.close(ready_w)
    os.close(stop_r)
    return pid, ready_r, stop_w


def start_ready(n: int) -> list[tuple[int, int]]:
    """Fork `n` children, then read every handshake; their (pid, stop pipe)."""
    spawned = [spawn() for _ in range(n)]
    for _, ready_r, _ in spawned:
        if os.read(ready_r, 1) != b"r":
            raise RuntimeError("a child exited before its handshake")
        os.close(ready_r)
    return [(pid, stop_w) for pid, _, stop_w in spawned]


def stop(children: list[tuple[int, int]]) -> None:
    """Close every stop pipe (EOF), then reap every child."""
    for _, stop_w in children:
        os.close(stop_w)
    for pid, _ in children:
        os.waitpid(pid, 0)


def ms_since(t0: int) -> float:
    return (time.monotonic_ns() - t0) / 1e6


def op_start(n: int) -> float:
    t0 = time.monotonic_ns()
    children = start_ready(n)
    elapsed = ms_since(t0)
    stop(children)
    return elapsed


def op_cold() -> float:
    return op_start(1)


def op_drain(n: int) -> float:
    children = start_ready(n)
    t0 = time.monotonic_ns()
    stop(children)
    return ms_since(t0)


def op_crash() -> float:
    pid, ready_r, stop_w = spawn()
    os.read(ready_r, 1)
    os.write(stop_w, b"c")
    crashed_at = int(os.read(ready_r, 64))
    os.waitpid(pid, 0)
    os.close(ready_r)
    os.close(stop_w)
    again = start_ready(1)
    elapsed = ms_since(crashed_at)
    stop(again)
    return elapsed


OPS = {"cold": op_cold, "crash": op_crash, "start": op_start, "drain": op_drain}


def load_supervisor() -> None:
    """What a running supervisor has imported (its size is the point): its
    entry point, the modules main() imports before it runs, and psutil, which
    bgpool.platform imports on first use (a running supervisor has it mapped)."""
    import psutil

    import bgpool.supervisor.main
    from bgpool.supervisor import core, loop, registry

    del bgpool, core, loop, registry, psutil


def main() -> None:
    if sys.argv[1] == "sized":
        sys.path.insert(0, sys.argv[2])
        load_supervisor()
    sys.stdout.write("ok\n")
    sys.stdout.flush()
    for line in sys.stdin:
        op, *args = line.split()
        try:
            reply = str(OPS[op](*map(int, args)))
        except Exception as exc:
            reply = f"error {type(exc).__name__}: {exc}"
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

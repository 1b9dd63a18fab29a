"""Worker fixtures for the benchmark (scripts/bench.py, scripts/benchmark/).

Deliberately trivial, so the benchmark measures bgpool (or the peer), not the
worker. The bgpool targets are `bench_workers:<function>`: the supervisor
inherits the benchmark's sys.path (scripts/ is on it) and preloads this module.
The module imports only the standard library at the top, because the peers'
workers run it as a script (`python bench_workers.py peer FIFO`), where every
import before the first line would be charged to the peer. bgpool runs it as a
script target too (`args=["idle"]`: `idle()`), for the reload_cold_ensure case.

Channels back to the benchmark are FIFOs and files; clocks are CLOCK_MONOTONIC
(`time.monotonic_ns()`), which is system-wide on Linux, so a timestamp taken in
a worker can be compared with one taken in the benchmark process.
"""

from __future__ import annotations

import os
import select
import sys
import time

SHAPES = ("structured", "wide", "flat")


def snapshot(seq: int, shape: str = "structured") -> dict[str, object]:
    """A vars snapshot of about 10 kB once encoded (bgpool's format: 10.2 to
    10.3 kB); `seq` tells them apart. "structured": what a routing table with
    feature flags looks like (188 small dicts, about 1,700 objects with the
    keys, 379 containers to check and rebuild); "wide": one mapping of 1,030
    counters keyed by name (every key new, the costliest per byte); "flat":
    one 10 kB string."""
    if shape == "flat":
        return {"seq": seq, "blob": "x" * 10_220}
    if shape == "wide":
        return {"seq": seq, "counts": {f"key{i}": i * 7 for i in range(1030)}}
    return {
        "seq": seq,
        "version": "2025.1",
        "flags": {f"flag_{i}": i % 2 == 0 for i in range(40)},
        "routes": [
            {
                "path": f"/api/v1/resource_{i}",
                "weight": i / 10,
                "backend": f"pool-{i % 7}",
                "tags": ["a", "b"],
            }
            for i in range(188)
        ],
    }


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Write `path` so that a reader never sees it partly written (the
    benchmark's readers use it too)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------- bgpool targets


def idle() -> None:
    """Take the handle (ready), wait for the stop signal."""
    import bgpool

    bgpool.get_worker_handle().wait()


def crash_on_trigger() -> None:
    """Take the handle, then wait for a byte on the FIFO `$BENCH_DIR/<name>.fifo`
    (or for the stop signal). On the byte: append
    `crash <pid> <monotonic_ns> <time_ns>` to `$BENCH_DIR/<name>.log` and exit
    with status 1 (a crash after readiness, so the supervisor restarts it at
    once). Each run first appends `ready <pid> <monotonic_ns> <time_ns>` right
    after get_worker_handle() returned."""
    import bgpool

    handle = bgpool.get_worker_handle()
    info = bgpool.current_worker()
    assert info is not None
    base = os.path.join(os.environ["BENCH_DIR"], info.name)
    _append(base + ".log", f"ready {os.getpid()} {time.monotonic_ns()} {time.time_ns()}")
    trigger = os.open(base + ".fifo", os.O_RDWR | os.O_NONBLOCK)
    readable, _, _ = select.select([handle.fileno(), trigger], [], [])
    if trigger in readable:
        os.read(trigger, 64)
        _append(base + ".log", f"crash {os.getpid()} {time.monotonic_ns()} {time.time_ns()}")
        os._exit(1)  # the crash: exit status 1 after readiness


def publisher() -> None:
    """Publish `snapshot(0)`, take the handle, then serve commands, one line each,
    read from the FIFO `$BENCH_DIR/publisher.fifo`:

    `set N GAP_US SHAPE OUT`: N publications of distinct 10 kB snapshots of
        SHAPE, GAP_US microseconds apart; each `set_vars()` is timed here
        (perf_counter_ns) and the N durations (ns) go to OUT as a JSON list.
    `vis N GAP_US SEQ0 SHAPE OUT`: N publications with seq SEQ0, SEQ0+1, ...;
        right after each `set_vars()` returns, `time.monotonic_ns()` is recorded;
        OUT gets a JSON object {seq: monotonic_ns}.
    """
    import json

    import bgpool

    bgpool.set_vars(snapshot(0))
    handle = bgpool.get_worker_handle()
    fifo = os.open(os.path.join(os.environ["BENCH_DIR"], "publisher.fifo"), os.O_RDWR)
    bases = {shape: snapshot(0, shape) for shape in SHAPES}
    seq = 1
    pending = b""
    while True:
        readable, _, _ = select.select([handle.fileno(), fifo], [], [])
        if handle.fileno() in readable:
            return
        pending += os.read(fifo, 4096)
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            command, *args = line.decode().split()
            if command == "set":
                count, gap, base, out = int(args[0]), int(args[1]) / 1e6, bases[args[2]], args[3]
                durations = []
                for _ in range(count):
                    snap = dict(base)  # a shallow copy: the nested data is shared
                    snap["seq"] = seq
                    seq += 1
                    if gap:
                        time.sleep(gap)
                    t0 = time.perf_counter_ns()
                    bgpool.set_vars(snap)
                    durations.append(time.perf_counter_ns() - t0)
                write_atomic(out, json.dumps(durations))
            elif command == "vis":
                count, gap, first = int(args[0]), int(args[1]) / 1e6, int(args[2])
                base, out = bases[args[3]], args[4]
                returned = {}
                for k in range(first, first + count):
                    snap = dict(base)
                    snap["seq"] = k
                    time.sleep(gap)
                    bgpool.set_vars(snap)
                    returned[k] = time.monotonic_ns()
                seq = first + count
                write_atomic(out, json.dumps(returned))


# ------------------------------------------------------------ the peers' worker


def peer_main(argv: list[str]) -> None:
    """`bench_workers.py peer [FIFO [TRIGGER]]`: the worker supervisord, circus
    and pm2 run. Its first line writes one byte to FIFO (the benchmark holds it
    open). Without TRIGGER it then idles until it is signalled (SIGTERM or
    SIGINT, the peers' stop signals, end it); with TRIGGER (a FIFO it opened
    before its first line, so a byte written once that line ran is never
    missed) it exits with status 1 on a byte there: a crash after its first
    line, which its peer restarts."""
    trigger = os.open(argv[3], os.O_RDWR | os.O_NONBLOCK) if len(argv) > 3 else None
    if len(argv) > 2:
        fd = os.open(argv[2], os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"x")
        os.close(fd)
    if trigger is not None:
        select.select([trigger], [], [])
        os.read(trigger, 64)  # (left there, it would crash the restarted process too)
        os._exit(1)  # the crash
    import signal

    while True:
        signal.pause()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        peer_main(sys.argv)
    elif sys.argv[1:] == ["idle"]:  # bgpool's script target (reload_cold_ensure)
        idle()
    else:
        usage = "bench_workers.py peer [FIFO [TRIGGER]] | bench_workers.py idle (a bgpool script)"
        sys.exit(f"usage: {usage}")


def ticking() -> None:
    """Take the handle (ready), then `tick(1.0)` until the stop signal: a worker
    that heartbeats (WorkerSpec.heartbeat_timeout) while it has nothing to do."""
    import bgpool

    handle = bgpool.get_worker_handle()
    while handle.tick(1.0):
        pass

"""bgpool's shared-state cases: get_vars() of an unchanged snapshot in the owner
and in another process, set_vars() timed inside the publishing worker, the time
from set_vars() returning to get_vars() seeing the snapshot in another process,
and decoding a new snapshot in one process (vars_read, beside its baseline,
pickle.loads). The publisher is the steady pool's "pub" worker
(bench_workers.publisher), which takes its commands, one line each, from a FIFO
and writes its results to a file."""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import bench_workers

import bgpool
from bgpool.shm import snapshot  # encode() and decode(): no public API does them alone

from .cases import add_client_per_call, add_owner_per_call
from .channels import polling_reader, wait_file
from .harness import Bench, add_visibility, per_call_us


def get_vars_owner(bench: Bench, steady: bgpool.Pool) -> None:
    assert steady.get_vars("pub")["seq"] == 0
    subject = "bgpool Pool.get_vars()"
    add_owner_per_call(bench, "get_vars_owner", subject, steady.get_vars, "pub")


def get_vars_client(bench: Bench, steady: bgpool.Pool) -> None:
    subject = "bgpool connect().get_vars()"
    add_client_per_call(bench, "get_vars_client", subject, steady.address, "get_vars", "pub")


def _command(fifo: int, line: str, out: Path) -> Any:
    """Send the publisher one command; what it wrote to `out` when done."""
    os.write(fifo, f"{line}\n".encode())
    return wait_file(out, 120)


def set_vars(bench: Bench, fifo: int, vars_dir: Path) -> None:
    """Per shape, 1 ms apart, as a worker that publishes now and then does (after
    a sleep, caches are cold: see machine.wakeup_penalty), then back to back."""
    count = bench.config.vars_count
    for shape in bench_workers.SHAPES:
        for gap_us, how in ((1000, "1 ms apart"), (0, "back to back")):
            out = vars_dir / f"set-{shape}-{gap_us}.json"
            samples = [d / 1000 for d in _command(fifo, f"set {count} {gap_us} {shape} {out}", out)]
            subject = f"bgpool set_vars() ({shape}, {how})"
            params = {"gap_ms": gap_us / 1000, "shape": shape}
            note = "timed in the worker"
            bench.add("set_vars", subject, "bgpool", samples, params, note=note)


def _bgpool_reader(address: str, first: int, count: int, out: Path) -> None:
    """Runs in a forked child: poll get_vars("pub") until publication
    `first + count - 1`, stamping each new snapshot when it is first seen (a new
    snapshot is a new object; an unchanged one is the same object)."""
    client = bgpool.connect(address)
    try:
        get = client.get_vars
        seen: dict[int, int] = {}
        last = get("pub")
        bench_workers.write_atomic(f"{out}.ready", "1")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            value = get("pub")
            if value is not last:
                seen[value["seq"]] = time.monotonic_ns()
                last = value
                if value["seq"] == first + count - 1:
                    break
        bench_workers.write_atomic(str(out), json.dumps(seen))
    finally:
        client.close()


def visibility(bench: Bench, steady: bgpool.Pool, fifo: int, vars_dir: Path) -> None:
    """Per shape: the publisher publishes 5 ms apart, a forked child polls."""
    count = bench.config.vis_count
    for index, shape in enumerate(bench_workers.SHAPES):
        first = 2_000_000 + index * 1_000_000
        out = vars_dir / f"vis-{shape}.json"
        seen_path = vars_dir / f"vis-{shape}-seen.json"
        with polling_reader(_bgpool_reader, (steady.address, first, count), seen_path):
            stamps = _command(fifo, f"vis {count} 5000 {first} {shape} {out}", out)
            returned = {int(k): v for k, v in stamps.items()}
            seen = {int(k): v for k, v in wait_file(seen_path, 60).items()}
        subject = f"bgpool set_vars() -> get_vars() elsewhere ({shape})"
        add_visibility(bench, subject, "bgpool", returned, seen, {"gap_ms": 5, "shape": shape})


# ------------------------------------------------------------------- vars_read


def _load_and_read(loads: Callable[[bytes], Any], blob: bytes, read: Callable[[Any], Any]) -> None:
    read(loads(blob))


def _read_one_key(value: Mapping[str, Any]) -> None:
    value["seq"]


_MAPPINGS = (dict, bgpool.Vars)
_SEQUENCES = (list, tuple)


def _read_all(value: Any) -> None:
    """Read every value of a snapshot: a dict's or a Vars' through values()
    (exact type checks: an ABC check would cost more than the reads)."""
    if type(value) in _MAPPINGS:
        for item in value.values():
            _read_all(item)
    elif type(value) in _SEQUENCES:
        for item in value:
            _read_all(item)


def vars_read(bench: Bench) -> None:
    """Per shape and per read (one key, every value): pickle.loads, then bgpool's
    decoding, of the same snapshot with the same reads."""
    c = bench.config
    calls = c.calls // 1000
    for shape in bench_workers.SHAPES:
        value = bench_workers.snapshot(1, shape)
        data, pickled = snapshot.encode(value), pickle.dumps(value)
        for read, what in ((_read_one_key, "one key"), (_read_all, "every value")):
            for kind, subject, loads, blob in (
                ("baseline", "baseline: pickle.loads()", pickle.loads, pickled),
                ("bgpool", "bgpool decode", snapshot.decode, data),
            ):
                samples = per_call_us(_load_and_read, (loads, blob, read), calls, c.batches)
                params = {"calls_per_sample": calls, "shape": shape, "read": what}
                bench.add("vars_read", f"{subject}, {what} ({shape})", kind, samples, params)

"""bgpool's benchmark: every case of issues 6 and 5 ("Speed"), side by side with
its baseline and the tools a Python user would pick instead, in one run on one
machine. Run it with ./scripts/bench (which installs the `bench` extra first).

    ./scripts/bench                 the full run (a few minutes)
    ./scripts/bench --quick         a small version (well under a minute)
    ./scripts/bench --json PATH     also write the results as JSON
    ./scripts/bench --only cold_ensure,crash_to_ready --no-peers

Each case is measured several times; the table shows the median, the 90th
percentile (nearest rank), the ratio of the median to the case's baseline
measured in the same run, and the target of issue 6 / 5 with whether it is met.

What each case measures, exactly:

hot_ensure_owner   `pool.ensure(name)` of a ready worker, in the process that
                   owns the pool; per call, as the mean of a batch of calls in a
                   loop (one sample per batch). Baseline: `dict.get(name)`.
hot_ensure_client  The same through `bgpool.connect()` in another process (a
                   child forked before it connects). Baseline:
                   `multiprocessing.Event.is_set()` in that process. Peers:
                   supervisord's XML-RPC `getProcessInfo(name)` over its unix
                   socket and circus's `status` command over its ZeroMQ socket,
                   each on a running process.
cold_ensure        `pool.ensure(name)` of a lazy worker that is not running,
                   until it returns (the worker took its handle and the
                   supervisor answered); a fresh pool for every sample. Baseline:
                   `multiprocessing` (fork) starting a process whose function
                   writes one byte to a pipe, until the parent has read it.
                   Peers: supervisord `startProcess(name, wait=True)` with
                   startsecs=0, and circus `start` (waiting), each until the
                   worker's first line ran (it writes a byte to a FIFO the
                   benchmark waits on) and the call returned.
batch_ensure       `pool.ensure([64 catch-all names])`, fresh pool per sample.
                   Baseline: 64 such forks started one after the other, until
                   all 64 handshakes arrived.
crash_to_ready     A ready worker is told (a byte on a FIFO) to crash: it stamps
                   the wall clock and calls os._exit(1). Measured: from that
                   stamp to the `ready_at` the supervisor stamps (wall clock)
                   when it marks the restarted run ready in the table, read
                   afterwards from `pool.status()`. A new catch-all name per
                   sample, so each crash is a first crash (no backoff).
                   Baseline: the same with a bare fork: the parent reads the
                   stamp, reaps the child, forks a new one and reads its
                   handshake.
drain              `pool.shutdown()` of N idle ready workers until it returns
                   (the supervisor reaped every worker and exited). Baseline: N
                   bare forked children: close their stop pipes, join them all.
                   Peer: supervisord `stopAllProcesses(wait=True)`.
idle_cpu           The supervisor's CPU (psutil cpu_times user+system) over a
                   quiet window with N idle ready workers, as % of one core.
supervisor_rss     The supervisor's RSS then. worker_uss: the USS
                   (memory_full_info) of idle workers (median of a few).
scale              Pool.start() plus ensure() of N catch-all names until all are
                   ready (RLIMIT_NOFILE soft limit raised to the hard one
                   first); success means every one was ready. Baseline: N bare
                   forks with handshakes.
get_vars_owner     `pool.get_vars(name)` of an unchanged 10 kB snapshot (the
                   cached object), per call. Baseline: a
                   `multiprocessing.Manager().dict()` read of the same snapshot.
get_vars_client    The same from another process via connect().
set_vars           `bgpool.set_vars()` of a distinct 10 kB snapshot, timed
                   inside the worker (perf_counter_ns around the call), 1 ms
                   apart (as a worker publishing now and then: caches are cold
                   after a sleep, see machine.wakeup_penalty in the JSON) and
                   back to back. Baseline: a Manager dict write of the same
                   data, 1 ms apart.
vars_visibility    From `set_vars()` returning in the worker (monotonic clock
                   stamped right after) to `get_vars()` returning the new
                   snapshot in another process that polls it in a loop
                   (monotonic clock stamped right after), publications 5 ms
                   apart. CLOCK_MONOTONIC is system-wide on Linux, so the two
                   stamps compare. Negative: the reader had the snapshot before
                   `set_vars()` returned (it is visible from the header flip
                   on; set_vars() then still unlocks and returns). Baseline:
                   the same with a Manager dict written by this process and
                   polled by another.
vars_read          In one process, no IPC: decoding a new 10 kB snapshot and
                   reading one key, then decoding it and reading every value
                   (what a reader pays, at most once per snapshot, for the
                   mappings it leaves unread until it reads them). Baseline:
                   `pickle.loads` of the same snapshot with the same reads.

The vars cases run with three 10 kB snapshots (10.2 to 10.3 kB in bgpool's
format): "structured" (a routing table with flags: 188 small dicts, 379
containers to check and rebuild), "wide" (one mapping of 1,030 counters, every
key a new string for the reader) and "flat" (one 10 kB string).

Other processes on the machine inflate every number: the run prints the load
average before it starts and how much CPU other processes used during it (also
in the JSON's `machine`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import http.client
import json
import marshal
import math
import multiprocessing
import os
import pickle
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # bgpool, then bench_workers (for the supervisor too)
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_workers  # noqa: E402
import psutil  # noqa: E402

import bgpool  # noqa: E402
from bgpool.shm import snapshot  # noqa: E402

FORK = multiprocessing.get_context("fork")
MIB = 1024 * 1024
WORKERS_SCRIPT = str(HERE / "bench_workers.py")


# ------------------------------------------------------------------ configuration


@dataclass
class Config:
    quick: bool
    reps: int  # samples of the per-start cases (cold ensure, crash to ready)
    batch_reps: int  # samples of the batch case
    batches: int  # samples of the per-call cases (one per batch of calls)
    calls: int  # calls per batch on the in-process fast paths
    rpc_calls: int  # calls per batch for round trips (peers, Manager dict)
    batch: int  # names in the batch case
    workers: int  # idle workers for drain and idle cost
    drain_reps: int
    peer_drain_reps: int
    idle_seconds: float
    scale: int
    scale_reps: int
    vars_count: int  # set_vars() publications per shape
    vis_count: int  # visibility publications per shape
    peers: bool


def make_config(args: argparse.Namespace) -> Config:
    if args.quick:
        config = Config(
            quick=True,
            reps=5,
            batch_reps=3,
            batches=5,
            calls=20_000,
            rpc_calls=40,
            batch=64,
            workers=16,
            drain_reps=2,
            peer_drain_reps=1,
            idle_seconds=2.0,
            scale=100,
            scale_reps=1,
            vars_count=100,
            vis_count=50,
            peers=not args.no_peers,
        )
    else:
        config = Config(
            quick=False,
            reps=20,
            batch_reps=10,
            batches=15,
            calls=200_000,
            rpc_calls=100,
            batch=64,
            workers=256,
            drain_reps=5,
            peer_drain_reps=3,
            idle_seconds=10.0,
            scale=1000,
            scale_reps=2,
            vars_count=500,
            vis_count=200,
            peers=not args.no_peers,
        )
    for name in ("reps", "workers", "scale", "batch", "idle_seconds"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if args.reps is not None:
        config.batch_reps = config.drain_reps = config.batches = max(2, args.reps)
        config.peer_drain_reps = config.scale_reps = 1
    return config


# ---------------------------------------------------------------------- results


@dataclass
class Row:
    case: str
    subject: str
    kind: str  # "baseline", "bgpool" or "peer"
    unit: str
    samples: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    ratio_to_baseline: float | None = None
    target: str | None = None
    met: bool | None = None

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def p90(self) -> float:
        ordered = sorted(self.samples)
        return float(ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)])

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["median"] = self.median
        data["p90"] = self.p90
        return data


@dataclass
class Case:
    title: str
    unit: str
    target: str | None
    check: Callable[[Row, list[Row]], bool] | None


def _peer(rows: list[Row], prefix: str) -> Row | None:
    return next((r for r in rows if r.kind == "peer" and r.subject.startswith(prefix)), None)


def _cold_check(row: Row, rows: list[Row]) -> bool:
    within = row.ratio_to_baseline is not None and row.ratio_to_baseline <= 2.0
    supervisord = _peer(rows, "supervisord")
    if supervisord is None:
        row.note = (row.note + "; " if row.note else "") + "supervisord not measured"
        return within
    return within and supervisord.median >= 5 * row.median


CASES: dict[str, Case] = {
    "hot_ensure_owner": Case("hot ensure(), owner", "us", "<= 1 us", lambda r, _: r.median <= 1),
    "hot_ensure_client": Case(
        "hot ensure(), other process", "us", "<= 1 us", lambda r, _: r.median <= 1
    ),
    "cold_ensure": Case(
        "cold ensure() of a lazy worker",
        "ms",
        "<= 2x baseline, >= 5x faster than supervisord",
        _cold_check,
    ),
    "batch_ensure": Case(
        "batch ensure() of catch-all names",
        "ms",
        "<= 2x baseline",
        lambda r, _: r.ratio_to_baseline is not None and r.ratio_to_baseline <= 2,
    ),
    "crash_to_ready": Case("crash to ready again", "ms", "< 10 ms", lambda r, _: r.median < 10),
    "drain": Case(
        "drain: shutdown() of idle workers", "ms", "< 500 ms", lambda r, _: r.median < 500
    ),
    "idle_cpu": Case("idle supervisor CPU", "% core", "< 1% of a core", lambda r, _: r.median < 1),
    "supervisor_rss": Case("supervisor RSS", "MiB", None, None),
    "worker_uss": Case("idle worker USS", "MiB", None, None),
    "scale": Case(
        "start N workers, all ready", "s", "succeeds", lambda r, _: bool(r.extra.get("success"))
    ),
    "get_vars_owner": Case(
        "get_vars() unchanged 10 kB, owner", "us", "<= 1 us", lambda r, _: r.median <= 1
    ),
    "get_vars_client": Case(
        "get_vars() unchanged 10 kB, other process", "us", "<= 1 us", lambda r, _: r.median <= 1
    ),
    "set_vars": Case("set_vars() of 10 kB", "us", "<= 50 us", lambda r, _: r.median <= 50),
    "vars_visibility": Case(
        "set_vars() returned -> seen elsewhere", "us", "<= 100 us", lambda r, _: r.median <= 100
    ),
    "vars_read": Case("decode a new 10 kB snapshot and read it", "us", None, None),
}


class Bench:
    def __init__(self, config: Config, tmp: Path) -> None:
        self.config = config
        self.tmp = tmp
        self.rows: list[Row] = []
        self.skipped: list[str] = []
        self.errors: list[str] = []

    def add(
        self,
        case: str,
        subject: str,
        kind: str,
        samples: list[float],
        params: dict[str, Any] | None = None,
        *,
        note: str = "",
        extra: dict[str, Any] | None = None,
    ) -> Row:
        """Record one subject of a case (the unit is the case's)."""
        if not samples:
            raise RuntimeError(f"{case}: {subject}: no samples")
        row = Row(case, subject, kind, CASES[case].unit, samples, params or {}, note, extra or {})
        self.rows.append(row)
        print(
            f"  {row.case:<18} {row.subject:<50} median {fmt(row.median)} {row.unit}"
            f"  p90 {fmt(row.p90)}  (n={len(row.samples)})",
            flush=True,
        )
        return row

    def skip(self, what: str, why: str) -> None:
        message = f"skipped {what}: {why}"
        print(f"  {message}", flush=True)
        self.skipped.append(message)

    def finish(self) -> None:
        """Ratios to the case's baseline (the last one recorded before the
        row, where a case has one per variant), then the targets."""
        for case_id, case in CASES.items():
            rows = [r for r in self.rows if r.case == case_id]
            baseline = None
            for row in rows:
                if row.kind == "baseline":
                    baseline = row
                if baseline is not None and baseline.median > 0:
                    row.ratio_to_baseline = row.median / baseline.median
                if row.kind == "bgpool" and case.check is not None:
                    row.target = case.target
                    row.met = bool(case.check(row, rows))


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


# --------------------------------------------------------------------- helpers


def per_call_us(
    fn: Callable[..., Any], args: tuple[Any, ...], calls: int, batches: int
) -> list[float]:
    """Mean microseconds per `fn(*args)` over `calls` calls, once per batch
    (after a warm-up batch). The loop is the same for every subject."""
    samples = []
    for batch in range(batches + 1):
        t0 = time.perf_counter_ns()
        for _ in repeat(None, calls):
            fn(*args)
        elapsed = time.perf_counter_ns() - t0
        if batch:
            samples.append(elapsed / calls / 1000)
    return samples


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def ready_count(pool: bgpool.PoolClient, name: str | None = None) -> int:
    return sum(1 for s in pool.status() if s.state == "ready" and (name is None or s.name == name))


def supervisor_process(pool: bgpool.PoolClient) -> psutil.Process:
    """The supervisor of `pool`: the parent of its workers."""
    pid = next(s.pid for s in pool.status() if s.pid)
    return psutil.Process(psutil.Process(pid).ppid())


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def schedstat_ns(pid: int) -> int | None:
    """Time on CPU in ns from /proc/PID/schedstat (finer than cpu_times' ticks)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def idle_cost(proc: psutil.Process, seconds: float) -> tuple[float, dict[str, Any]]:
    """% of one core `proc` used over `seconds`, and the details."""
    cpu0, sched0, t0 = cpu_seconds(proc), schedstat_ns(proc.pid), time.monotonic()
    time.sleep(seconds)
    cpu1, sched1, t1 = cpu_seconds(proc), schedstat_ns(proc.pid), time.monotonic()
    extra: dict[str, Any] = {"window_s": round(t1 - t0, 3), "cpu_s": round(cpu1 - cpu0, 4)}
    if sched0 is not None and sched1 is not None:
        extra["schedstat_pct"] = round((sched1 - sched0) / 1e9 / (t1 - t0) * 100, 4)
    return (cpu1 - cpu0) / (t1 - t0) * 100, extra


def uss_mib(pids: list[int]) -> list[float]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid).memory_full_info().uss / MIB)
    return found


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
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
    os.read(fd, 4096)


def write_atomic(path: Path, text: str) -> None:
    """Write `path` so that a reader never sees it partly written."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_file(path: Path, timeout: float) -> Any:
    wait_until(path.exists, timeout, f"{path.name}", poll=0.005)
    return json.loads(path.read_text())


def pool_of(workers: list[bgpool.WorkerSpec], **kwargs: Any) -> bgpool.Pool:
    kwargs.setdefault("ensure_timeout", 120.0)
    kwargs.setdefault("grace_period", 10.0)
    return bgpool.Pool(bgpool.PoolConfig(workers=workers, **kwargs))


# ------------------------------------------------------------ bare-fork baseline


def _bare_child(ready_w: int, stop_r: int, inherited: list[int], report_w: int | None) -> None:
    """The baseline's trivial function: handshake, then wait on the stop pipe.
    A byte (not EOF) on it means "crash": stamp the wall clock and exit 1."""
    for fd in inherited:  # our own and older siblings' stop pipes' write ends
        os.close(fd)
    os.write(ready_w, b"r")
    if os.read(stop_r, 1) and report_w is not None:
        os.write(report_w, str(time.time_ns()).encode())
        os._exit(1)


class Bare:
    """Children forked with multiprocessing, each with a handshake pipe and a
    stop pipe, like a supervisor's workers."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.stops: list[int] = []
        self.readies: list[int] = []

    def start(self, report_w: int | None = None) -> int:
        """Start one child; return the read end of its handshake pipe."""
        ready_r, ready_w = os.pipe()
        stop_r, stop_w = os.pipe()
        self.stops.append(stop_w)
        proc = FORK.Process(
            target=_bare_child, args=(ready_w, stop_r, list(self.stops), report_w), daemon=True
        )
        proc.start()
        os.close(ready_w)
        os.close(stop_r)
        self.procs.append(proc)
        self.readies.append(ready_r)
        return ready_r

    def stop(self) -> None:
        """Close every stop pipe (EOF), join every child."""
        for fd in self.stops:
            os.close(fd)
        for proc in self.procs:
            proc.join(30)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        for fd in self.readies:
            os.close(fd)
        self.procs, self.stops, self.readies = [], [], []


def bare_start_ms(count: int) -> float:
    """Fork `count` children, read every handshake; ms from the first fork to the
    last handshake. The children are stopped afterwards (not timed)."""
    bare = Bare()
    try:
        t0 = time.perf_counter_ns()
        readers = [bare.start() for _ in range(count)]
        for fd in readers:
            os.read(fd, 1)
        return (time.perf_counter_ns() - t0) / 1e6
    finally:
        bare.stop()


# ------------------------------------------------------------------------ peers


class Supervisord:
    """A private supervisord: its own config, socket and logs in a temp dir."""

    def __init__(self, tmp: Path, *, idle: int = 0, hot_and_lazy: bool = True) -> None:
        from supervisor.xmlrpc import SupervisorTransport  # the bench extra

        self.dir = Path(tempfile.mkdtemp(prefix="sd-", dir=tmp))
        self.sock = self.dir / "supervisor.sock"
        self.fifo_path = self.dir / "first-line.fifo"
        self.fifo = make_fifo(self.fifo_path)
        worker = f"{sys.executable} {WORKERS_SCRIPT} peer"
        program = "startsecs=0\nautorestart=false\nstopwaitsecs=10\nstdout_logfile=NONE\n"
        program += "stderr_logfile=NONE\n"
        parts = [
            f"[unix_http_server]\nfile={self.sock}\nchmod=0700\n",
            f"[supervisord]\nnodaemon=true\nlogfile={self.dir}/supervisord.log\n"
            f"pidfile={self.dir}/supervisord.pid\nchildlogdir={self.dir}\nloglevel=warn\n"
            f"minfds=8192\nminprocs=2048\n",
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        ]
        if hot_and_lazy:
            parts.append(f"[program:hot]\ncommand={worker}\nautostart=true\n{program}")
            parts.append(
                f"[program:lazy]\ncommand={worker} {self.fifo_path}\nautostart=false\n{program}"
            )
        if idle:
            parts.append(
                f"[program:idle]\ncommand={worker}\nprocess_name=%(program_name)s_%(process_num)04d"
                f"\nnumprocs={idle}\nautostart=false\n{program}"
            )
        conf = self.dir / "supervisord.conf"
        conf.write_text("\n".join(parts))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._transport = SupervisorTransport(None, None, f"unix://{self.sock}")
        import xmlrpc.client

        self.rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=self._transport)

        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"supervisord exited: see {self.dir}/supervisord.log")
            try:
                return bool(self.rpc.supervisor.getState()["statename"] == "RUNNING")
            except (OSError, http.client.HTTPException):
                self._transport.close()  # not listening yet: reconnect next time
                return False

        try:
            wait_until(up, 30, "supervisord to answer")
            if hot_and_lazy:
                wait_until(
                    lambda: self.rpc.supervisor.getProcessInfo("hot")["statename"] == "RUNNING",
                    30,
                    "supervisord's hot process",
                )
        except BaseException:
            self.close()
            raise

    @property
    def version(self) -> str:
        return str(self.rpc.supervisor.getSupervisorVersion())

    def close(self) -> None:
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        with contextlib.suppress(Exception):
            self.rpc.supervisor.shutdown()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._transport.close()
        _kill_leftovers(tree)
        os.close(self.fifo)
        shutil.rmtree(self.dir, ignore_errors=True)


class Circusd:
    """A private circusd: its own ini, ipc endpoints and log in a temp dir."""

    def __init__(self, tmp: Path) -> None:
        from circus.client import CircusClient  # the bench extra

        self.dir = Path(tempfile.mkdtemp(prefix="cd-", dir=tmp))
        self.fifo_path = self.dir / "first-line.fifo"
        self.fifo = make_fifo(self.fifo_path)
        endpoint = f"ipc://{self.dir}/endpoint"
        ini = self.dir / "circus.ini"
        ini.write_text(
            f"[circus]\nendpoint = {endpoint}\npubsub_endpoint = ipc://{self.dir}/pubsub\n"
            f"statsd = False\nloglevel = WARNING\nlogoutput = {self.dir}/circus.log\n\n"
            f"[watcher:hot]\ncmd = {sys.executable}\nargs = {WORKERS_SCRIPT} peer\n"
            "numprocesses = 1\nautostart = True\ncopy_env = True\n\n"
            f"[watcher:lazy]\ncmd = {sys.executable}\nargs = {WORKERS_SCRIPT} peer "
            f"{self.fifo_path}\nnumprocesses = 1\nautostart = False\ncopy_env = True\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from circus.circusd import main; main()", str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.client = CircusClient(endpoint=endpoint, timeout=30)

        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"circusd exited: see {self.dir}/circus.log")
            try:
                return self.call("status", name="hot").get("status") == "active"
            except Exception:  # not listening yet
                return False

        try:
            wait_until(up, 30, "circusd to answer", poll=0.05)
        except BaseException:
            self.close()
            raise

    def call(self, command: str, **properties: Any) -> dict[str, Any]:
        reply: dict[str, Any] = self.client.call({"command": command, "properties": properties})
        if reply.get("status") == "error":
            raise RuntimeError(f"circus {command}: {reply}")
        return reply

    def close(self) -> None:
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        with contextlib.suppress(Exception):
            self.call("quit", waiting=True)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(Exception):
            self.client.stop()
        _kill_leftovers(tree)
        os.close(self.fifo)
        shutil.rmtree(self.dir, ignore_errors=True)


def _kill_leftovers(procs: list[psutil.Process]) -> None:
    alive = [p for p in procs if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def peer_available(bench: Bench, module: str, what: str) -> bool:
    if not bench.config.peers:
        bench.skip(what, "--no-peers")
        return False
    try:
        __import__(module)
    except ImportError as exc:
        bench.skip(
            what,
            f"{exc.name or module} is not installed in this environment "
            "(./scripts/bench installs the bench extra: pip install -e '.[bench]')",
        )
        return False
    return True


@contextlib.contextmanager
def peer(bench: Bench, kind: type, what: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
    """Start a peer daemon for a block, or yield None (skipped, with the reason
    printed) when it is not installed or cannot run here."""
    module = "supervisor.xmlrpc" if kind is Supervisord else "circus.client"
    if not peer_available(bench, module, what):
        yield None
        return
    try:
        daemon = kind(bench.tmp, *args, **kwargs)
    except Exception as exc:
        bench.skip(what, f"it could not be started here: {type(exc).__name__}: {exc}")
        yield None
        return
    try:
        yield daemon
    finally:
        daemon.close()


# ------------------------------------------------------------- other processes


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


def _client_per_call(address: str, what: str, name: str, calls: int, batches: int) -> list[float]:
    client = bgpool.connect(address)
    try:
        fn = client.ensure if what == "ensure" else client.get_vars
        fn(name)
        return per_call_us(fn, (name,), calls, batches)
    finally:
        client.close()


def _event_per_call(event: Any, calls: int, batches: int) -> list[float]:
    return per_call_us(event.is_set, (), calls, batches)


def _manager_per_call(shared: Any, calls: int, batches: int) -> list[float]:
    return per_call_us(shared.__getitem__, ("snap",), calls, batches)


# ------------------------------------------------------------------------ cases


def case_hot_ensure(bench: Bench, steady: bgpool.Pool) -> None:
    c = bench.config
    calls = {"calls_per_sample": c.calls}
    table = {"hot": True}
    samples = per_call_us(table.get, ("hot",), c.calls, c.batches)
    bench.add("hot_ensure_owner", "baseline: dict.get()", "baseline", samples, calls)
    samples = per_call_us(steady.ensure, ("hot",), c.calls, c.batches)
    bench.add("hot_ensure_owner", "bgpool Pool.ensure()", "bgpool", samples, calls)
    event = FORK.Event()
    event.set()
    samples = in_child(_event_per_call, event, c.calls, c.batches)
    subject = "baseline: multiprocessing Event.is_set()"
    bench.add("hot_ensure_client", subject, "baseline", samples, calls)
    samples = in_child(_client_per_call, steady.address, "ensure", "hot", c.calls, c.batches)
    bench.add("hot_ensure_client", "bgpool connect().ensure()", "bgpool", samples, calls)


def case_hot_ensure_peers(bench: Bench, sd: Supervisord | None, cd: Circusd | None) -> None:
    c = bench.config
    calls = {"calls_per_sample": c.rpc_calls}
    if sd is not None:
        info = sd.rpc.supervisor.getProcessInfo
        assert info("hot")["statename"] == "RUNNING"
        samples = per_call_us(info, ("hot",), c.rpc_calls, c.batches)
        subject = "supervisord getProcessInfo() (XML-RPC, unix socket)"
        bench.add("hot_ensure_client", subject, "peer", samples, calls)
    if cd is not None:
        status = functools.partial(cd.call, "status", name="hot")
        assert status()["status"] == "active"
        samples = per_call_us(status, (), c.rpc_calls, c.batches)
        bench.add("hot_ensure_client", "circus status (ZeroMQ, ipc)", "peer", samples, calls)


def case_cold_ensure(bench: Bench, sd: Supervisord | None, cd: Circusd | None) -> None:
    reps = bench.config.reps
    samples = []
    for _ in range(reps + 1):  # the first of every series is a warm-up
        bare = Bare()
        try:
            t0 = time.perf_counter_ns()
            os.read(bare.start(), 1)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        finally:
            bare.stop()
    subject = "baseline: multiprocessing fork + pipe handshake"
    bench.add("cold_ensure", subject, "baseline", samples[1:])

    samples = []
    for _ in range(reps + 1):
        pool = pool_of([bgpool.WorkerSpec(name="lazy", target="bench_workers:idle")])
        pool.start()
        try:
            t0 = time.perf_counter_ns()
            pool.ensure("lazy")
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        finally:
            pool.shutdown()
    subject = "bgpool Pool.ensure() (a fresh pool each time)"
    bench.add("cold_ensure", subject, "bgpool", samples[1:])

    if sd is not None:
        samples = []
        rpc = sd.rpc.supervisor
        for _ in range(reps + 1):
            drain_fd(sd.fifo)
            t0 = time.perf_counter_ns()
            rpc.startProcess("lazy", True)
            wait_readable(sd.fifo, 30, "the supervisord worker's first line")
            samples.append((time.perf_counter_ns() - t0) / 1e6)
            rpc.stopProcess("lazy", True)
        subject = "supervisord startProcess(wait) + first line"
        bench.add("cold_ensure", subject, "peer", samples[1:], {"startsecs": 0})
    if cd is not None:
        samples = []
        for _ in range(reps + 1):
            drain_fd(cd.fifo)
            t0 = time.perf_counter_ns()
            cd.call("start", name="lazy", waiting=True)
            wait_readable(cd.fifo, 30, "the circus worker's first line")
            samples.append((time.perf_counter_ns() - t0) / 1e6)
            cd.call("stop", name="lazy", waiting=True)
        bench.add("cold_ensure", "circus start(waiting) + first line", "peer", samples[1:])


def case_batch(bench: Bench) -> None:
    c = bench.config
    params = {"names": c.batch}
    samples = [bare_start_ms(c.batch) for _ in range(c.batch_reps + 1)]
    subject = f"baseline: {c.batch} forks + handshakes"
    bench.add("batch_ensure", subject, "baseline", samples[1:], params)
    samples = []
    names = [f"tenant-{i}" for i in range(c.batch)]
    for _ in range(c.batch_reps + 1):
        pool = pool_of([bgpool.WorkerSpec(target="bench_workers:idle", max_instances=c.batch)])
        pool.start()
        try:
            t0 = time.perf_counter_ns()
            pool.ensure(names)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        finally:
            pool.shutdown()
    subject = f"bgpool Pool.ensure([{c.batch} catch-all names])"
    bench.add("batch_ensure", subject, "bgpool", samples[1:], params)


def case_crash(bench: Bench) -> None:
    reps = bench.config.reps
    # The baseline: the parent reads the crash stamp, reaps, forks anew, reads
    # the new child's handshake.
    samples = []
    for _ in range(reps + 1):
        report_r, report_w = os.pipe()
        bare = Bare()
        try:
            os.read(bare.start(report_w), 1)
            os.write(bare.stops[0], b"c")  # crash now
            crashed_at = int(os.read(report_r, 64))
            bare.procs[0].join()
            os.read(bare.start(), 1)
            samples.append((time.time_ns() - crashed_at) / 1e6)
        finally:
            bare.stop()
            os.close(report_r)
            os.close(report_w)
    bench.add("crash_to_ready", "baseline: reap + fork + handshake", "baseline", samples[1:])

    directory = Path(tempfile.mkdtemp(prefix="crash-", dir=bench.tmp))
    spec = bgpool.WorkerSpec(
        target="bench_workers:crash_on_trigger",
        max_instances=reps + 1,
        env={"BENCH_DIR": str(directory)},
    )
    pool = pool_of([spec])
    pool.start()
    samples, to_handle, to_spawn = [], [], []
    try:
        for rep in range(reps + 1):
            name = f"crash-{rep}"
            trigger = make_fifo(directory / f"{name}.fifo")
            try:
                pool.ensure(name)
                (old,) = [s for s in pool.status() if s.name == name]

                def restarted(name: str = name, old_pid: int | None = old.pid) -> Any:
                    return next(
                        (s for s in pool.status()
                         if s.name == name and s.state == "ready" and s.pid != old_pid),
                        None,
                    )  # fmt: skip

                os.write(trigger, b"c")
                new = wait_until(restarted, 30, f"{name} to be ready again", poll=0.001)
            finally:
                os.close(trigger)

            def logged(name: str = name, new_pid: int | None = new.pid) -> Any:
                found = {}
                for line in (directory / f"{name}.log").read_text().splitlines():
                    if len(fields := line.split()) == 4:  # (a line being written: later)
                        kind, pid, mono, wall = fields
                        found[(kind, int(pid))] = (int(mono), int(wall))
                # The new run logs its "ready" line after get_worker_handle()
                # returned, possibly after the supervisor marked it ready.
                return found if ("ready", new_pid) in found else None

            stamps = wait_until(logged, 10, f"{name}'s log")
            crash_mono, crash_wall = stamps[("crash", old.pid)]
            ready_mono, _ = stamps[("ready", new.pid)]
            samples.append((new.ready_at.timestamp() * 1e9 - crash_wall) / 1e6)
            to_handle.append((ready_mono - crash_mono) / 1e6)
            to_spawn.append((new.started_at.timestamp() * 1e9 - crash_wall) / 1e6)
    finally:
        pool.shutdown()
        shutil.rmtree(directory, ignore_errors=True)
    bench.add(
        "crash_to_ready",
        "bgpool: crash -> restarted run ready in the table",
        "bgpool",
        samples[1:],
        note="to the supervisor's ready_at stamp (wall clock)",
        extra={
            # the supervisor's started_at stamp (wall clock, right after the fork)
            "crash_to_respawn_ms": to_spawn[1:],
            # the new run's own stamp right after get_worker_handle() returned
            "crash_to_new_run_handle_ms": to_handle[1:],
        },
    )


def case_vars(bench: Bench, steady: bgpool.Pool, vars_dir: Path) -> None:
    c = bench.config
    manager = FORK.Manager()
    fifo = os.open(vars_dir / "publisher.fifo", os.O_WRONLY)
    readers: list[Any] = []  # the children polling in the visibility cases
    try:
        shared = manager.dict()
        shared["snap"] = bench_workers.snapshot(0)
        rpc_calls, calls = {"calls_per_sample": c.rpc_calls}, {"calls_per_sample": c.calls}
        mgr_read = "baseline: Manager().dict() read"

        samples = per_call_us(shared.__getitem__, ("snap",), c.rpc_calls, c.batches)
        bench.add("get_vars_owner", mgr_read, "baseline", samples, rpc_calls)
        assert steady.get_vars("pub")["seq"] == 0
        samples = per_call_us(steady.get_vars, ("pub",), c.calls, c.batches)
        bench.add("get_vars_owner", "bgpool Pool.get_vars()", "bgpool", samples, calls)
        samples = in_child(_manager_per_call, shared, c.rpc_calls, c.batches)
        bench.add("get_vars_client", mgr_read, "baseline", samples, rpc_calls)
        samples = in_child(_client_per_call, steady.address, "get_vars", "pub", c.calls, c.batches)
        bench.add("get_vars_client", "bgpool connect().get_vars()", "bgpool", samples, calls)

        # set_vars(): timed inside the worker; the baseline: Manager dict writes here.
        samples = []
        base = bench_workers.snapshot(0)
        for seq in range(1, c.vars_count + 1):
            snap = dict(base)
            snap["seq"] = seq
            time.sleep(0.001)
            t0 = time.perf_counter_ns()
            shared["snap"] = snap
            samples.append((time.perf_counter_ns() - t0) / 1000)
        subject = "baseline: Manager().dict() write (1 ms apart)"
        bench.add("set_vars", subject, "baseline", samples, {"gap_ms": 1})
        for shape in bench_workers.SHAPES:
            # 1 ms apart, as a worker that publishes now and then does (after a
            # sleep, caches are cold: see machine.wakeup_penalty), then back to back.
            for gap_us, how in ((1000, "1 ms apart"), (0, "back to back")):
                out = vars_dir / f"set-{shape}-{gap_us}.json"
                os.write(fifo, f"set {c.vars_count} {gap_us} {shape} {out}\n".encode())
                samples = [d / 1000 for d in wait_file(out, 120)]
                subject = f"bgpool set_vars() ({shape}, {how})"
                params = {"gap_ms": gap_us / 1000, "shape": shape}
                note = "timed in the worker"
                bench.add("set_vars", subject, "bgpool", samples, params, note=note)

        # Visibility: the baseline (this process writes, a child polls), then
        # each shape (the worker writes, a child polls).
        first = 1_000_000
        seen_path = vars_dir / "mgr-seen.json"
        args = (shared, first, c.vis_count, seen_path)
        reader = FORK.Process(target=_manager_reader, args=args, daemon=True)
        readers.append(reader)
        reader.start()
        wait_file(Path(f"{seen_path}.ready"), 30)
        returned = {}
        for seq in range(first, first + c.vis_count):
            snap = dict(base)
            snap["seq"] = seq
            time.sleep(0.005)
            shared["snap"] = snap
            returned[seq] = time.monotonic_ns()
        seen = {int(k): v for k, v in wait_file(seen_path, 60).items()}
        reader.join(10)
        subject = "baseline: Manager().dict() write -> read elsewhere"
        visibility(bench, subject, "baseline", returned, seen, {"gap_ms": 5})
        for index, shape in enumerate(bench_workers.SHAPES):
            first = 2_000_000 + index * 1_000_000
            out = vars_dir / f"vis-{shape}.json"
            seen_path = vars_dir / f"vis-{shape}-seen.json"
            args = (steady.address, first, c.vis_count, seen_path)
            reader = FORK.Process(target=_bgpool_reader, args=args, daemon=True)
            readers.append(reader)
            reader.start()
            wait_file(Path(f"{seen_path}.ready"), 30)
            os.write(fifo, f"vis {c.vis_count} 5000 {first} {shape} {out}\n".encode())
            returned = {int(k): v for k, v in wait_file(out, 120).items()}
            seen = {int(k): v for k, v in wait_file(seen_path, 60).items()}
            reader.join(10)
            subject = f"bgpool set_vars() -> get_vars() elsewhere ({shape})"
            visibility(bench, subject, "bgpool", returned, seen, {"gap_ms": 5, "shape": shape})
    finally:
        for reader in readers:
            if reader.is_alive():
                reader.kill()
            reader.join()
        os.close(fifo)
        manager.shutdown()


def case_vars_read(bench: Bench) -> None:
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


def _load_and_read(loads: Callable[[bytes], Any], blob: bytes, read: Callable[[Any], Any]) -> None:
    read(loads(blob))


def _read_one_key(value: Mapping[str, Any]) -> None:
    value["seq"]


_MAPPINGS = (dict, snapshot.Vars)
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


def visibility(
    bench: Bench,
    subject: str,
    kind: str,
    returned: dict[int, int],
    seen: dict[int, int],
    params: dict[str, Any],
) -> None:
    samples = [(seen[k] - t) / 1000 for k, t in returned.items() if k in seen]
    missed = len(returned) - len(samples)
    params = {**params, "publications": len(returned), "not_seen": missed}
    note = f"{missed} publications never seen (overwritten first)" if missed else ""
    bench.add("vars_visibility", subject, kind, samples, params, note=note)


def _manager_reader(shared: Any, first: int, count: int, out: Path) -> None:
    seen: dict[int, int] = {}
    last = shared["snap"]["seq"]
    write_atomic(Path(f"{out}.ready"), "1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seq = shared["snap"]["seq"]
        if seq != last:
            seen[seq] = time.monotonic_ns()
            last = seq
            if seq == first + count - 1:
                break
    write_atomic(out, json.dumps(seen))


def _bgpool_reader(address: str, first: int, count: int, out: Path) -> None:
    client = bgpool.connect(address)
    try:
        get = client.get_vars
        seen: dict[int, int] = {}
        last = get("pub")
        write_atomic(Path(f"{out}.ready"), "1")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            value = get("pub")
            if value is not last:
                seen[value["seq"]] = time.monotonic_ns()
                last = value
                if value["seq"] == first + count - 1:
                    break
        write_atomic(out, json.dumps(seen))
    finally:
        client.close()


def case_idle_and_drain(bench: Bench) -> None:
    c = bench.config
    n = c.workers
    params = {"workers": n}
    samples = []
    for _ in range(c.drain_reps):
        bare = Bare()
        try:
            for fd in [bare.start() for _ in range(n)]:
                os.read(fd, 1)
        except BaseException:
            bare.stop()
            raise
        t0 = time.perf_counter_ns()
        bare.stop()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    bench.add("drain", f"baseline: close {n} stop pipes, join all", "baseline", samples, params)

    samples = []
    for rep in range(c.drain_reps):
        pool = pool_of([bgpool.WorkerSpec(name="idle", target="bench_workers:idle", num=n)])
        pool.start()
        try:
            wait_until(lambda pool=pool: ready_count(pool) == n, 120, f"{n} ready workers")
            if rep == 0:
                supervisor = supervisor_process(pool)
                time.sleep(0.5)  # let start-up settle
                cpu, extra = idle_cost(supervisor, c.idle_seconds)
                subject = f"bgpool supervisor, {n} idle workers"
                bench.add("idle_cpu", subject, "bgpool", [cpu], params, extra=extra)
                rss = supervisor.memory_info().rss / MIB
                bench.add("supervisor_rss", subject, "bgpool", [rss], params)
                pids = [s.pid for s in pool.status() if s.pid][:5]
                bench.add("worker_uss", "bgpool idle worker (forked)", "bgpool", uss_mib(pids))
        finally:
            t0 = time.perf_counter_ns()
            pool.shutdown()
            samples.append((time.perf_counter_ns() - t0) / 1e6)
    bench.add("drain", f"bgpool Pool.shutdown() of {n} idle workers", "bgpool", samples, params)

    what = "supervisord (drain, idle cost)"
    with peer(bench, Supervisord, what, idle=n, hot_and_lazy=False) as sd:
        if sd is None:
            return
        rpc = sd.rpc.supervisor
        samples = []
        for rep in range(c.peer_drain_reps):
            rpc.startProcessGroup("idle", True)
            wait_until(
                lambda: sum(p["statename"] == "RUNNING" for p in rpc.getAllProcessInfo()) == n,
                120,
                f"{n} supervisord processes",
            )
            time.sleep(1.0 if rep == 0 else 0.2)  # let the interpreters finish starting
            if rep == 0:
                daemon = psutil.Process(rpc.getPID())
                cpu, extra = idle_cost(daemon, c.idle_seconds)
                subject = f"supervisord, {n} idle processes"
                bench.add("idle_cpu", subject, "peer", [cpu], params, extra=extra)
                rss = daemon.memory_info().rss / MIB
                bench.add("supervisor_rss", subject, "peer", [rss], params)
                pids = [p["pid"] for p in rpc.getAllProcessInfo() if p["pid"]][:5]
                subject = "supervisord idle worker (python)"
                bench.add("worker_uss", subject, "peer", uss_mib(pids))
            t0 = time.perf_counter_ns()
            rpc.stopAllProcesses(True)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        bench.add("drain", f"supervisord stopAllProcesses() of {n}", "peer", samples, params)


def case_scale(bench: Bench) -> None:
    c = bench.config
    n = c.scale
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    params = {"workers": n, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
    samples = [bare_start_ms(n) / 1000 for _ in range(c.scale_reps)]
    bench.add("scale", f"baseline: {n} forks + handshakes", "baseline", samples, params)
    samples, runs = [], []
    names = [f"w{i}" for i in range(n)]
    for _ in range(c.scale_reps):
        spec = bgpool.WorkerSpec(target="bench_workers:idle", max_instances=n)
        pool = pool_of([spec], ensure_timeout=600.0, grace_period=30.0)
        run: dict[str, Any] = {"success": False}
        t0 = time.perf_counter_ns()
        try:
            pool.start()
            t1 = time.perf_counter_ns()
            pool.ensure(names, timeout=600)
            t2 = time.perf_counter_ns()
            ready = ready_count(pool)
            run.update(success=ready == n, ready=ready, start_s=(t1 - t0) / 1e9)
            run["ensure_s"] = (t2 - t1) / 1e9
            samples.append((t2 - t0) / 1e9)
        except Exception as exc:
            run["error"] = f"{type(exc).__name__}: {exc}"
            samples.append((time.perf_counter_ns() - t0) / 1e9)
        finally:
            t3 = time.perf_counter_ns()
            pool.shutdown()
            run["shutdown_s"] = (time.perf_counter_ns() - t3) / 1e9
        runs.append(run)
    success = all(r["success"] for r in runs)
    failures = "; ".join(str(r.get("error", r)) for r in runs if not r["success"])
    bench.add(
        "scale",
        f"bgpool start() + ensure({n} names)",
        "bgpool",
        samples,
        params,
        note="" if success else f"FAILED: {failures}",
        extra={"success": success, "runs": runs},
    )


# --------------------------------------------------------------------- the run


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "loadavg_at_start": os.getloadavg(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "bgpool": version_of("bgpool"),
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        info["cpu"] = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?"
        )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "bgpool"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["git"] = commit + (" (bgpool/ has uncommitted changes)" if dirty else "")
    for package in ("supervisor", "circus"):
        info[package] = version_of(package)
    info["wakeup_penalty"] = wakeup_penalty()
    return info


def wakeup_penalty() -> dict[str, float]:
    """How much slower this machine runs a small job (about 5 us: encode a
    10 kB string snapshot, a short loop) right after a sleep than back to back:
    cold caches and, in a VM, a vCPU that was descheduled. It weighs on every
    microsecond-scale case that runs after a pause (set_vars 1 ms apart)."""
    snap = bench_workers.snapshot(1, "flat")

    def job() -> None:
        marshal.dumps(dict(snap))
        total = 0
        for i in range(200):
            total += i

    result = {}
    for label, gap in (("back_to_back_us", 0.0), ("after_1ms_sleep_us", 0.001)):
        samples = []
        for _ in range(200):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter_ns()
            job()
            samples.append((time.perf_counter_ns() - t0) / 1000)
        result[label] = round(statistics.median(samples), 2)
    return result


def version_of(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def print_table(bench: Bench) -> None:
    header = ("case", "subject", "median", "p90", "unit", "x baseline", "target", "met")
    lines = []
    for case_id in CASES:
        for row in (r for r in bench.rows if r.case == case_id):
            params = row.params.get("workers") or row.params.get("names")
            label = f"{case_id} ({params})" if params else case_id
            ratio = "-" if row.ratio_to_baseline is None else fmt(row.ratio_to_baseline)
            met = "-" if row.met is None else ("yes" if row.met else "NO")
            lines.append(
                (
                    label,
                    row.subject,
                    fmt(row.median),
                    fmt(row.p90),
                    row.unit,
                    ratio,
                    row.target or "",
                    met,
                )
            )
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=False)]
    right = {2, 3, 5}

    def render(cells: tuple[str, ...]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print()
    print(render(header))
    print(render(tuple("-" * w for w in widths)))
    previous = None
    for line in lines:
        if previous is not None and line[0] != previous:
            print()
        previous = line[0]
        print(render(line))


class ForeignCpu:
    """How busy the machine was with processes that are not this benchmark's:
    system-wide busy CPU time minus this process's and its reaped descendants'
    (every process the benchmark starts is reaped by it or by a supervisor it
    reaps), as % of one core over the run."""

    def __init__(self) -> None:
        self.start = time.monotonic(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()  # guest time is already in user: leave it out
        busy = ("user", "nice", "system", "irq", "softirq", "steal")
        return float(sum(getattr(times, name, 0.0) for name in busy))

    @staticmethod
    def _own() -> float:
        times = psutil.Process().cpu_times()
        return float(times.user + times.system + times.children_user + times.children_system)

    def pct(self) -> float:
        t0, busy0, own0 = self.start
        elapsed = time.monotonic() - t0
        foreign = (self._busy() - busy0) - (self._own() - own0)
        return round(max(0.0, foreign) / elapsed * 100, 1)


def leftover_children() -> list[psutil.Process]:
    """Every live process this one started, directly or not, still running."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def run(config: Config, only: set[str] | None) -> tuple[Bench, dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="bgbench-"))
    bench = Bench(config, tmp)
    started = time.monotonic()

    def wanted(*cases: str) -> bool:
        return only is None or bool(only & set(cases))

    def phase(title: str, function: Callable[..., None], *args: Any) -> None:
        print(f"== {title}", flush=True)
        try:
            function(*args)
        except Exception as exc:
            bench.errors.append(f"{title}: {type(exc).__name__}: {exc}")
            print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()

    try:
        vars_dir = Path(tempfile.mkdtemp(prefix="vars-", dir=tmp))
        os.mkfifo(vars_dir / "publisher.fifo", 0o600)
        if wanted(
            "hot_ensure_owner",
            "hot_ensure_client",
            "get_vars_owner",
            "get_vars_client",
            "set_vars",
            "vars_visibility",
        ):
            steady = pool_of(
                [
                    bgpool.WorkerSpec(name="hot", target="bench_workers:idle", num=1),
                    bgpool.WorkerSpec(
                        name="pub",
                        target="bench_workers:publisher",
                        num=1,
                        ready_on="vars",
                        env={"BENCH_DIR": str(vars_dir)},
                    ),
                ]
            )
            steady.start()
            try:
                if wanted("hot_ensure_owner", "hot_ensure_client"):
                    phase("hot ensure()", case_hot_ensure, bench, steady)
                if wanted("get_vars_owner", "get_vars_client", "set_vars", "vars_visibility"):
                    phase(
                        "get_vars() / set_vars() / visibility", case_vars, bench, steady, vars_dir
                    )
            finally:
                steady.shutdown()
        if wanted("hot_ensure_client", "cold_ensure"):
            with (
                peer(bench, Supervisord, "supervisord (hot, cold)") as sd,
                peer(bench, Circusd, "circus (hot, cold)") as cd,
            ):
                if wanted("hot_ensure_client") and (sd or cd):
                    phase("hot ensure(): peers", case_hot_ensure_peers, bench, sd, cd)
                if wanted("cold_ensure"):
                    phase("cold ensure()", case_cold_ensure, bench, sd, cd)
        if wanted("vars_read"):
            phase("decode and read a new snapshot", case_vars_read, bench)
        if wanted("batch_ensure"):
            phase(f"batch ensure() of {config.batch} names", case_batch, bench)
        if wanted("crash_to_ready"):
            phase("crash to ready again", case_crash, bench)
        if wanted("drain", "idle_cpu", "supervisor_rss", "worker_uss"):
            phase(f"idle cost and drain, {config.workers} workers", case_idle_and_drain, bench)
        if wanted("scale"):
            phase(f"scale: {config.scale} workers", case_scale, bench)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bench.finish()
    return bench, {"duration_s": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small version (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-peers", action="store_true", help="skip supervisord and circus")
    parser.add_argument("--only", help="comma-separated case ids (see the module docstring)")
    parser.add_argument("--reps", type=int, help="samples per case (overrides the preset)")
    parser.add_argument("--workers", type=int, help="idle workers for drain and idle cost")
    parser.add_argument("--scale", type=int, help="workers for the scale case")
    parser.add_argument("--batch", type=int, help="names in the batch case")
    parser.add_argument("--idle-seconds", type=float, help="idle cost window")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if only and (unknown := only - set(CASES)):
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    config = make_config(args)
    os.environ.setdefault("BGPOOL_LOG_LEVEL", "ERROR")  # the crash case's restarts are expected
    machine = machine_info()
    load = machine["loadavg_at_start"][0]
    if load > 0.5:
        print(
            f"warning: the 1-minute load average is {load:.2f} before the benchmark starts: "
            "other processes are using the CPU and will inflate the numbers",
            flush=True,
        )
    print(
        f"bgpool benchmark ({'quick' if config.quick else 'full'}): {machine.get('cpu', '?')}, "
        f"{machine['affinity']} cores, Python {machine['python']}, bgpool {machine.get('git')}",
        flush=True,
    )
    foreign = ForeignCpu()
    bench, timing = run(config, only)
    machine["other_processes_cpu_pct"] = foreign.pct()
    if machine["other_processes_cpu_pct"] > 5:
        print(
            f"warning: other processes used {machine['other_processes_cpu_pct']:.0f}% of one "
            "core on average during the run: the numbers are inflated by that much contention",
            flush=True,
        )
    print_table(bench)
    left = leftover_children()
    leftovers = [describe(proc) for proc in left]
    if leftovers:
        bench.errors.append("processes left behind: " + "; ".join(leftovers))
        _kill_leftovers(left)
    print(
        f"\n{len(bench.rows)} rows in {timing['duration_s']} s; child processes left: "
        f"{len(leftovers)}"
    )
    for message in bench.skipped:
        print(message)
    missed = [f"{r.case}: {r.subject}" for r in bench.rows if r.met is False]
    if missed:
        print("targets missed: " + "; ".join(missed))
    for error in bench.errors:
        print(f"ERROR {error}")
    if args.json:
        machine["loadavg_at_end"] = os.getloadavg()
        data = {
            "machine": machine,
            "quick": config.quick,
            "config": asdict(config),
            "duration_s": timing["duration_s"],
            "skipped": bench.skipped,
            "errors": bench.errors,
            "leftover_processes": leftovers,
            "cases": [row.as_json() for row in bench.rows],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    sys.exit(main())

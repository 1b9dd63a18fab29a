"""bgpool's benchmark: every speed target bgpool sets itself, side by side with
its baseline and the tools a Python user would pick instead, in one run on one
machine. Run it with ./scripts/bench (which installs the `bench` extra first).

    ./scripts/bench                 the full run (a quarter of an hour: the peers start
                                    and stop 1,000 processes)
    ./scripts/bench --quick         a small version (two minutes or so; under one with
                                    --no-peers)
    ./scripts/bench --json PATH     also write the results as JSON
    ./scripts/bench --only cold_ensure,crash_to_ready --no-peers
    ./scripts/bench --quick --no-peers \
        --only edit_to_new_code,reload_cold_ensure,rolling_ready,worker_uss

Each case is measured several times; the table shows the median, the 90th
percentile (nearest rank), the ratio of the median to the case's baseline
measured in the same run ("x baseline"), its ratios to the case's two bare
floors ("x sized", "x clean"; ratio_to_bare_sized and ratio_to_bare_clean in
the JSON), a peer's ratio to bgpool's row ("x bgpool", ratio_to_bgpool), and
the case's target with whether it is met. A case measured at several N (drain,
start_scaling) has its rows and ratios per N: each row's ratios are to the rows
of its own N.

The bare floors are the physical limit of what a case asks of a supervisor,
measured in the same run by two helper processes (scripts/benchmark/
floor_helper.py, run with `python -c`) with os.fork() and one-byte pipe
handshakes and nothing else, timed inside the helper: "sized" first imports what
a running bgpool supervisor has loaded (bgpool.supervisor.main, the modules its
main() imports, psutil: about a supervisor's RSS; both helpers' RSS are reference
rows of supervisor_rss, and the run prints a real supervisor's beside them),
"clean" is a plain python with nothing imported. Every floor child closes all but
its two pipes (one close_range() a range), writes its handshake and blocks
reading its stop pipe. cold_ensure and reload_cold_ensure: fork + handshake.
crash_to_ready: the child stamps CLOCK_MONOTONIC and exits 1; from the stamp:
reap, fork, handshake. batch_ensure, scale, start_scaling: N forks one after the
other, then every handshake. drain: close N stop pipes, reap N.

The peers are supervisord, circus and pm2, each a private daemon of its own (its
config, sockets and logs in the run's temp dir; pm2's PM2_HOME there too, so a
user's pm2 is never touched), supervising `bench_workers.py peer` processes: a
fresh Python interpreter each, whose first line writes a byte to a FIFO the
benchmark waits on. supervisord is driven over XML-RPC and circus over ZeroMQ
from this process; pm2 through its programmatic API from one node process
(scripts/benchmark/pm2_driver.js) that reads JSON requests on a pipe, so no
request pays node's start-up. pm2 (pm2@5) is installed from the npm registry
into .bench-node/ by ./scripts/bench (node and npm needed; --no-peers needs neither).
The peers run with their defaults but: startsecs=0 (supervisord); pm2's apps in
fork mode with treekill off (the workers have no children) and out/err to
/dev/null. A peer that is missing, fails, or exceeds the run's bound on any
request or wait (60 s quick, 180 s full) is skipped with the reason, never
failed; groups of more than 100 processes (quick) or 1,000 (full) are not
started under a peer, nor a start_scaling size its smaller size predicts beyond
the bound. Every daemon and everything it started is killed at the end of its
phase, on failure too.

What each case measures, exactly:

hot_ensure_owner   `pool.ensure(name)` of a ready worker, in the process that
                   owns the pool; per call, as the mean of a batch of calls in a
                   loop (one sample per batch). Baseline: `dict.get(name)`.
hot_ensure_client  The same through `bgpool.connect()` in another process (a
                   child forked before it connects). Baseline:
                   `multiprocessing.Event.is_set()` in that process. Peers:
                   supervisord's XML-RPC `getProcessInfo(name)` over its unix
                   socket, circus's `status` command over its ZeroMQ socket,
                   each on a running process; pm2's `describe(name)`, timed in
                   its node client (10 calls a batch: each takes milliseconds).
cold_ensure        `pool.ensure(name)` of a lazy worker that is not running,
                   until it returns (the worker took its handle and the
                   supervisor answered); a fresh pool for every sample. Baseline:
                   `multiprocessing` (fork) starting a process whose function
                   writes one byte to a pipe, until the parent has read it.
                   Peers: supervisord `startProcess(name, wait=True)` with
                   startsecs=0, circus `start` (waiting), and pm2 `start(name)`
                   of a stopped app, each until the worker's first line ran (it
                   writes a byte to a FIFO the benchmark waits on) and the call
                   returned.
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
                   handshake. Peers: a worker that exits 1 on a byte written to
                   a FIFO it opened before its first line, restarted by its
                   peer (supervisord autorestart=true, startsecs=0; circus's
                   respawn; pm2 autorestart, restart_delay 0, min_uptime 0):
                   from writing the byte until the new worker's first line.
drain              `pool.shutdown()` of N idle ready workers until it returns
                   (the supervisor reaped every worker and exited), at N =
                   --workers and at N = --scale. Baseline: N bare forked
                   children: close their stop pipes, join them all. Peers, N
                   processes that all ran their first line: supervisord
                   `stopAllProcesses(wait=True)`, circus `stop` (waiting) of a
                   watcher of N, pm2 `stop()` of an app of N instances.
edit_to_new_code   A ready worker of a small generated module (ready_on="vars":
                   it publishes its VERSION with set_vars(), then takes its
                   handle). Measured: from rewriting the module's source with
                   a new VERSION until `restart_workers([name])` returned and
                   `get_vars(name)` showed the new VERSION; the same pool for
                   every sample. Beside it: a cold ensure() of that module as a
                   lazy worker (fresh pool; the baseline of the ratios), the
                   module's import in a fresh interpreter (`-X importtime`,
                   cumulative, compiled from source with no .pyc; `python -c
                   "import mod"` minus `python -c pass` is printed and in the
                   JSON), and the budget row: import + 2 x cold ensure().
reload_cold_ensure cold ensure() of a lazy module target (bench_workers:idle)
                   and of a lazy script target (bench_workers.py run as a
                   script, args ["idle"]) in a fresh pool, before and after a
                   `restart_workers()` (the pool runs one eager worker of each
                   target, so there is a new code generation to fork from; the
                   case checks a bgpool-gen2 process exists). Baseline: the
                   bare fork + pipe handshake of cold_ensure.
rolling_ready      A pool of 8 idle instances (num=8); a thread counts those in
                   state "ready" in `pool.status()` (shared memory, no round
                   trip) every millisecond during `restart_workers([name])`.
                   A sample is the fewest it saw during one restart. Baseline:
                   the same sampler over 100 ms with nothing happening.
idle_cpu           The supervisor's CPU (psutil cpu_times user+system) over a
                   quiet window with N idle ready workers, as % of one core.
                   Peers: each daemon with N idle processes (pm2: its God
                   daemon), in the drain phase at --workers.
supervisor_rss     The supervisor's RSS then (and the peers' daemons').
idle_cost_policies The supervisor's CPU, as idle_cpu, over the idle window with N
                   idle ready workers of one pool (num=N): a row with no policy
                   (workers wait on their handle), and a row with every
                   lifecycle policy on (boot_timeout, heartbeat_timeout=5 with
                   workers that loop on tick(1.0), max_restarts, max_memory,
                   so memory is sampled, and max_lifetime, never due).
worker_uss         The USS (psutil memory_full_info) of each of 16 idle ready
                   workers of one pool, read after they idled 0.5 s; a row of
                   the largest. Baseline (the floor): the child a plain `python
                   -c` process forked with os.fork(), waiting on a pipe (five
                   of them). Peers: five of each peer's idle workers (in the
                   drain phase): a fresh interpreter each.
scale              Pool.start() plus ensure() of N catch-all names until all are
                   ready (RLIMIT_NOFILE soft limit raised to the hard one
                   first); success means every one was ready. Baseline: N bare
                   forks with handshakes. Peers: from asking for a group of N
                   until every one's first line ran: supervisord
                   `startProcessGroup(wait=True)` of numprocs=N, circus `start`
                   (waiting) of a watcher of numprocesses=N, pm2 `start()` of
                   an app of N instances; stopped again for the drain rows.
start_scaling      Pool.start() of a pool of N eager idle instances (num=N)
                   until all N are ready in pool.status() (polled every 2 ms),
                   for N = 100, 500, 1000 (--start-sizes), a fresh pool each
                   time (after one unrecorded start of the smallest N); in ms
                   per worker. Target: per worker at most 1.1x the smallest
                   N's, so 1,000 cost at most 11x what 100 do (each row's note
                   and extra.total_x_smallest: its total as a multiple of the
                   smallest N's). No multiprocessing baseline: the floors.
                   Peers: the start of a group of each N as in scale, per
                   process, one sample each (a daemon per N).
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

asgi_requests      Requests per second of fixtures/asgiapp (Starlette, `uvicorn
                   --workers 2` under `bgpool run fixtures/asgiapp/config.py
                   --`) from a forked child holding 8
                   keep-alive connections, each sending its next GET as soon as
                   the last is answered, 0.25 s a sample; one sample of each
                   route per round (in turn first), 4 rounds per --reps, over
                   the same connections, after one unrecorded round. bgpool:
                   `/`, whose handler awaits `client.aensure("flags")` and
                   returns `dict(get_vars("flags"))` as JSON. Baseline: `/bare`,
                   the same handler without the two calls (it returns
                   `dict()` of the snapshot read at start-up). The overhead
                   (printed, and extra.overhead_pct) is the ratio of the two
                   server processes' CPU time per request (psutil, summed over
                   each route's samples): in a CPU-bound server that is the
                   throughput's loss, and other processes on a shared
                   machine move it less than they move the req/s. Target:
                   under 2%.

The vars cases run with three 10 kB snapshots (10.2 to 10.3 kB in bgpool's
format): "structured" (a routing table with flags: 188 small dicts, 379
containers to check and rebuild), "wide" (one mapping of 1,030 counters, every
key a new string for the reader) and "flat" (one 10 kB string).

Other processes on the machine inflate every number: the run prints the load
average before it starts and how much CPU other processes used during it (also
in the JSON's `machine`).

This file is the entry point and the manual; the code is the package
scripts/benchmark/, whose __init__ says which module owns what.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # bgpool, then bench_workers (for the supervisor too)
    if _path not in sys.path:
        sys.path.insert(0, _path)

from benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM too
    sys.exit(main(description=__doc__.split("\n\n")[0]))

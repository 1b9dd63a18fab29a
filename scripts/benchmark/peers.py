"""What the cases measure of the peers, supervisord and circus (see daemons): a
status round trip (hot_ensure_client), starting a process until the call returned
and its first line ran (cold_ensure), and supervisord's idle cost and drain of N
idle processes (those two cases have no circus row)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import psutil

from .channels import drain_fd, wait_readable, wait_until
from .costs import add_idle_costs
from .daemons import Circusd, Daemon, Supervisord, peer
from .harness import Bench, after_warmup, per_call_us


def hot_ensure_client(bench: Bench, sd: Supervisord | None, cd: Circusd | None) -> None:
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


def _first_line_ms(
    daemon: Daemon, start: Callable[[], Any], stop: Callable[[], Any], what: str
) -> float:
    """ms from asking `daemon` to start its lazy process until the call returned
    and the process's first line ran; then it is stopped (not timed)."""
    drain_fd(daemon.fifo)
    t0 = time.perf_counter_ns()
    start()
    wait_readable(daemon.fifo, 30, what)
    elapsed = (time.perf_counter_ns() - t0) / 1e6
    stop()
    return elapsed


def cold_ensure(bench: Bench, sd: Supervisord | None, cd: Circusd | None) -> None:
    reps = bench.config.reps
    if sd is not None:
        rpc = sd.rpc.supervisor
        samples = after_warmup(
            reps,
            lambda: _first_line_ms(
                sd,
                lambda: rpc.startProcess("lazy", True),
                lambda: rpc.stopProcess("lazy", True),
                "the supervisord worker's first line",
            ),
        )
        subject = "supervisord startProcess(wait) + first line"
        bench.add("cold_ensure", subject, "peer", samples, {"startsecs": 0})
    if cd is not None:
        samples = after_warmup(
            reps,
            lambda: _first_line_ms(
                cd,
                lambda: cd.call("start", name="lazy", waiting=True),
                lambda: cd.call("stop", name="lazy", waiting=True),
                "the circus worker's first line",
            ),
        )
        bench.add("cold_ensure", "circus start(waiting) + first line", "peer", samples)


def idle_and_drain(bench: Bench, params: dict[str, Any]) -> None:
    """supervisord with N idle processes: its idle cost (the first time only),
    then stopAllProcesses(), started again for every sample."""
    c = bench.config
    n = c.workers
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
                add_idle_costs(
                    bench,
                    "peer",
                    psutil.Process(rpc.getPID()),
                    f"supervisord, {n} idle processes",
                    lambda: [p["pid"] for p in rpc.getAllProcessInfo() if p["pid"]],
                    "supervisord idle worker (python)",
                    params,
                )
            t0 = time.perf_counter_ns()
            rpc.stopAllProcesses(True)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        bench.add("drain", f"supervisord stopAllProcesses() of {n}", "peer", samples, params)

"""The command line of ./scripts/bench: the options, then the run between its
header (the machine, a warning when it is already loaded) and its end (the table,
the summary, the JSON, the leftovers check). Exits 1 when a phase failed or a
process was left behind."""

from __future__ import annotations

import argparse
import os

from .config import make_config
from .machine import (
    ForeignCpu,
    describe,
    kill_leftovers,
    leftover_children,
    machine_info,
    pm2_version,
)
from .report import print_summary, print_table, write_json
from .run import run
from .targets import CASES


def parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small version (two minutes or so; --no-peers: under one)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-peers", action="store_true", help="skip supervisord, circus and pm2")
    parser.add_argument("--only", help="comma-separated case ids (see the module docstring)")
    parser.add_argument("--reps", type=int, help="samples per case (overrides the preset)")
    parser.add_argument("--workers", type=int, help="idle workers for drain and idle cost")
    parser.add_argument("--scale", type=int, help="workers for the scale case")
    parser.add_argument("--batch", type=int, help="names in the batch case")
    parser.add_argument(
        "--start-sizes", metavar="N,N,...", help="worker counts of start_scaling (e.g. 100,1000)"
    )
    parser.add_argument("--idle-seconds", type=float, help="idle cost window")
    return parser


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """`description`: the --help text above the options (the entry point's)."""
    options = parser(description)
    args = options.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if only and (unknown := only - set(CASES)):
        options.error(f"unknown case(s): {', '.join(sorted(unknown))}")
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
    machine["pm2"] = pm2_version()
    if machine["other_processes_cpu_pct"] > 5:
        print(
            f"warning: other processes used {machine['other_processes_cpu_pct']:.0f}% of one "
            "core on average during the run: the numbers are inflated by that much contention",
            flush=True,
        )
    print_table(bench.rows)
    left = leftover_children()
    leftovers = [describe(proc) for proc in left]
    if leftovers:
        bench.errors.append("processes left behind: " + "; ".join(leftovers))
        kill_leftovers(left)
    print_summary(bench, timing["duration_s"], leftovers)
    if args.json:
        machine["loadavg_at_end"] = os.getloadavg()
        write_json(args.json, bench, config, machine, timing["duration_s"], leftovers)
    return 1 if bench.errors else 0

"""The run's sizes: the two presets (the full run and --quick) and the command-line
options that override them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any


@dataclass
class Config:
    quick: bool
    reps: int  # samples of the per-start cases (cold ensure, crash to ready)
    reload_reps: int  # samples of the reload cases (edit to new code, cold after, rolling)
    batch_reps: int  # samples of the batch case
    batches: int  # samples of the per-call cases (one per batch of calls)
    calls: int  # calls per batch on the in-process fast paths
    rpc_calls: int  # calls per batch for round trips (peers, Manager dict)
    batch: int  # names in the batch case
    workers: int  # idle workers for drain and idle cost
    drain_reps: int
    peer_drain_reps: int  # samples of a peer's drain of --workers (at --scale: scale_reps)
    peer_reps: int  # samples of a peer's crash to ready (a second or more each)
    peer_timeout_s: float  # the bound of every request to a peer and wait for one
    peer_max_workers: int  # the largest group of processes started under a peer
    idle_seconds: float
    scale: int
    scale_reps: int
    start_sizes: tuple[int, ...]  # the Ns of start_scaling (the smallest is the reference)
    start_reps: int  # samples of each of them
    vars_count: int  # set_vars() publications per shape
    vis_count: int  # visibility publications per shape
    peers: bool


# field: (--quick, the full run)
PRESETS: dict[str, tuple[Any, Any]] = {
    "reps": (5, 20),
    "reload_reps": (10, 20),
    "batch_reps": (3, 10),
    "batches": (5, 15),
    "calls": (20_000, 200_000),
    "rpc_calls": (40, 100),
    "batch": (64, 64),
    "workers": (16, 256),
    "drain_reps": (2, 5),
    "peer_drain_reps": (1, 3),
    "peer_reps": (3, 10),
    "peer_timeout_s": (60.0, 180.0),
    "peer_max_workers": (100, 1000),
    "idle_seconds": (2.0, 10.0),
    "scale": (100, 1000),
    "scale_reps": (1, 2),
    "start_sizes": ((100, 500, 1000), (100, 500, 1000)),
    "start_reps": (1, 2),
    "vars_count": (100, 500),
    "vis_count": (50, 200),
}


def make_config(args: argparse.Namespace) -> Config:
    """The preset `args` chose, with the sizes `args` sets. --reps sets every
    series' length (at least 2), and one sample for the slow series (the peer's
    drain, scale)."""
    column = 0 if args.quick else 1
    preset = {name: values[column] for name, values in PRESETS.items()}
    config = Config(quick=args.quick, peers=not args.no_peers, **preset)
    for name in ("reps", "workers", "scale", "batch", "idle_seconds"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if args.reps is not None:
        config.reload_reps = args.reps
    if args.start_sizes is not None:
        config.start_sizes = tuple(sorted(int(n) for n in args.start_sizes.split(",")))
    if args.reps is not None:
        config.batch_reps = config.drain_reps = config.batches = max(2, args.reps)
        config.peer_drain_reps = config.scale_reps = config.start_reps = 1
        config.peer_reps = max(2, args.reps)
    return config

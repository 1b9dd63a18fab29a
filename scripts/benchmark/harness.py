"""What every case shares: a `Row` (one subject of a case: its samples, median and
90th percentile), the `Bench` that records rows as the run goes and, once it is
over, sets each row's ratios to its case's baseline and to its two bare floors
(floors.py) and checks the case's target; and the timing loops the cases have in
common."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .report import progress
from .targets import CASES

FLOOR_KINDS = ("bare_sized", "bare_clean")  # the kinds of floors.py's rows

if TYPE_CHECKING:
    from .config import Config


@dataclass
class Row:
    case: str
    subject: str
    kind: str  # "baseline", "bgpool", "peer", "reference" or a FLOOR_KINDS floor
    unit: str
    samples: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    ratio_to_baseline: float | None = None
    ratio_to_bare_sized: float | None = None  # to the supervisor-sized floor
    ratio_to_bare_clean: float | None = None  # to the clean-interpreter floor
    ratio_to_bgpool: float | None = None  # a peer's, to bgpool's row
    target: str | None = None
    met: bool | None = None

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def p90(self) -> float:
        """The 90th percentile, nearest rank (a sample, never an interpolation)."""
        ordered = sorted(self.samples)
        return float(ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)])

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["median"] = self.median
        data["p90"] = self.p90
        return data


class Bench:
    """The run's record: its config and temp dir, the rows in the order they were
    measured, what was skipped and why, and the errors of failed phases."""

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
        progress(row)
        return row

    def skip(self, what: str, why: str, *, once: bool = False) -> None:
        """Say what was skipped and why (with `once`, only the first time)."""
        message = f"skipped {what}: {why}"
        if once and message in self.skipped:
            return
        print(f"  {message}", flush=True)
        self.skipped.append(message)

    def finish(self) -> None:
        """Each row's ratios to its case's baseline and two floors and, a peer's,
        to bgpool's row: to the last of each recorded before it with the same
        params["workers"] (a case measured at several N has them per N); a floor's
        own row has no ratio to a floor. Then the targets."""
        for case_id, case in CASES.items():
            rows = [r for r in self.rows if r.case == case_id]
            last: dict[tuple[Any, str], Row] = {}  # (workers, kind): the last such row
            for row in rows:
                n = row.params.get("workers")
                if row.kind == "baseline":
                    last[(n, "baseline")] = row
                refs = ["baseline"]
                if row.kind not in FLOOR_KINDS:
                    refs += FLOOR_KINDS
                if row.kind == "peer":
                    refs.append("bgpool")
                for ref_kind in refs:
                    ref = last.get((n, ref_kind))
                    if ref is not None and ref.median > 0:
                        setattr(row, f"ratio_to_{ref_kind}", row.median / ref.median)
                last[(n, row.kind)] = row
                if row.kind == "bgpool" and case.check is not None:
                    row.target = case.target
                    row.met = bool(case.check(row, rows))


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


def after_warmup(reps: int, measure: Callable[[], float]) -> list[float]:
    """`reps` samples of `measure()`: the first of every series is a warm-up,
    measured as the others are, then left out."""
    samples = [measure() for _ in range(reps + 1)]
    return samples[1:]


def add_visibility(
    bench: Bench,
    subject: str,
    kind: str,
    returned: dict[int, int],
    seen: dict[int, int],
    params: dict[str, Any],
) -> None:
    """A vars_visibility row from two processes' CLOCK_MONOTONIC stamps: when each
    publication's write returned, when the reader first saw it. A publication the
    reader never saw (overwritten before it looked) has no sample; the row says
    how many."""
    samples = [(seen[k] - t) / 1000 for k, t in returned.items() if k in seen]
    missed = len(returned) - len(samples)
    params = {**params, "publications": len(returned), "not_seen": missed}
    note = f"{missed} publications never seen (overwritten first)" if missed else ""
    bench.add("vars_visibility", subject, kind, samples, params, note=note)

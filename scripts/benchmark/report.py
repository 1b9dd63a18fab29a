"""What the run prints and writes: a progress line per row as it is measured, the
table at the end (the median, p90, ratios to the baseline and to the two bare
floors, "x sized" and "x clean", a peer's ratio to bgpool's row, "x bgpool", and
target of every row, in the cases' order),
the summary lines, and the JSON document of --json."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .targets import CASES

if TYPE_CHECKING:
    from .config import Config
    from .harness import Bench, Row

_HEADER = (
    "case",
    "subject",
    "median",
    "p90",
    "unit",
    "x baseline",
    "x sized",
    "x clean",
    "x bgpool",
    "target",
    "met",
)
_RIGHT = {2, 3, 5, 6, 7, 8}  # the numeric columns


def fmt(value: float) -> str:
    """Three significant digits or so, at most three decimals."""
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


def progress(row: Row) -> None:
    print(
        f"  {row.case:<18} {row.subject:<50} median {fmt(row.median)} {row.unit}"
        f"  p90 {fmt(row.p90)}  (n={len(row.samples)})",
        flush=True,
    )


def _cells(case_id: str, row: Row) -> tuple[str, ...]:
    params = row.params.get("workers") or row.params.get("names")
    label = f"{case_id} ({params})" if params else case_id
    ratios = (
        row.ratio_to_baseline,
        row.ratio_to_bare_sized,
        row.ratio_to_bare_clean,
        row.ratio_to_bgpool,
    )
    met = "-" if row.met is None else ("yes" if row.met else "NO")
    return (
        label,
        row.subject,
        fmt(row.median),
        fmt(row.p90),
        row.unit,
        *("-" if ratio is None else fmt(ratio) for ratio in ratios),
        row.target or "",
        met,
    )


def print_table(rows: list[Row]) -> None:
    """Every row, grouped by case in CASES' order and within a case by N (the
    rows of one N in the order they were measured), a blank line between groups."""

    def per_n(row: Row) -> int:
        return int(row.params.get("workers") or 0)

    lines = [
        _cells(case_id, row)
        for case_id in CASES
        for row in sorted((r for r in rows if r.case == case_id), key=per_n)
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(_HEADER, *lines, strict=False)]

    def render(cells: tuple[str, ...]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in _RIGHT else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print()
    print(render(_HEADER))
    print(render(tuple("-" * w for w in widths)))
    previous = None
    for line in lines:
        if previous is not None and line[0] != previous:
            print()
        previous = line[0]
        print(render(line))


def print_summary(bench: Bench, duration_s: float, leftovers: list[str]) -> None:
    print(f"\n{len(bench.rows)} rows in {duration_s} s; child processes left: {len(leftovers)}")
    for message in bench.skipped:
        print(message)
    missed = [f"{r.case}: {r.subject}" for r in bench.rows if r.met is False]
    if missed:
        print("targets missed: " + "; ".join(missed))
    for error in bench.errors:
        print(f"ERROR {error}")


def write_json(
    path: str,
    bench: Bench,
    config: Config,
    machine: dict[str, Any],
    duration_s: float,
    leftovers: list[str],
) -> None:
    data = {
        "machine": machine,
        "quick": config.quick,
        "config": asdict(config),
        "duration_s": duration_s,
        "skipped": bench.skipped,
        "errors": bench.errors,
        "leftover_processes": leftovers,
        "cases": [row.as_json() for row in bench.rows],
    }
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")

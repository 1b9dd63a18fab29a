"""The cases: every case id, its title and unit, and the target it must meet
with the check that decides it. The order here is the table's order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .harness import Row


@dataclass
class Case:
    title: str
    unit: str
    target: str | None
    check: Callable[[Row, list[Row]], bool] | None  # (bgpool's row, the case's rows)


def _peer(rows: list[Row], prefix: str) -> Row | None:
    return next((r for r in rows if r.kind == "peer" and r.subject.startswith(prefix)), None)


def _cold_check(row: Row, rows: list[Row]) -> bool:
    within = row.ratio_to_baseline is not None and row.ratio_to_baseline <= 2.0
    supervisord = _peer(rows, "supervisord")
    if supervisord is None:
        row.note = (row.note + "; " if row.note else "") + "supervisord not measured"
        return within
    return within and supervisord.median >= 5 * row.median


def _within_budget(row: Row, rows: list[Row]) -> bool:
    """edit_to_new_code: at most the budget row's figure (import + 2 x cold)."""
    budget = next((r for r in rows if r.subject.startswith("budget")), None)
    return budget is not None and row.median <= budget.median


def _at_most_one_down(row: Row, _rows: list[Row]) -> bool:
    """rolling_ready: the fewest ready seen, over every restart, is num - 1 or more."""
    return min(row.samples) >= row.params["workers"] - 1


def _within_2x(row: Row, _rows: list[Row]) -> bool:
    return row.ratio_to_baseline is not None and row.ratio_to_baseline <= 2


def _under_2_percent(row: Row, _rows: list[Row]) -> bool:
    """asgi_requests: the bgpool calls cost under 2% of the requests per second
    (from the server's CPU time per request, asgi_cases.py; in the row's note)."""
    overhead = float(row.extra["overhead_pct"])
    row.note = f"overhead {overhead:.1f}% (server CPU per request)"
    return overhead < 2


def _linear_start(row: Row, rows: list[Row]) -> bool:
    """start_scaling: per worker, at most 1.1x what the smallest N costs (so
    1,000 workers cost at most 11x what 100 do)."""
    first = min((r for r in rows if r.kind == "bgpool"), key=lambda r: r.params["workers"])
    return row.median <= 1.1 * first.median


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
    "batch_ensure": Case("batch ensure() of catch-all names", "ms", "<= 2x baseline", _within_2x),
    "crash_to_ready": Case("crash to ready again", "ms", "< 10 ms", lambda r, _: r.median < 10),
    "edit_to_new_code": Case(
        "edit a module -> restart_workers() -> new code ready",
        "ms",
        "<= import + 2x cold ensure",
        _within_budget,
    ),
    "reload_cold_ensure": Case(
        "cold ensure() before and after a new generation", "ms", "<= 2x baseline", _within_2x
    ),
    "rolling_ready": Case(
        "ready instances during a rolling restart",
        "ready",
        "min >= num - 1 (every restart)",
        _at_most_one_down,
    ),
    "drain": Case(
        "drain: shutdown() of idle workers", "ms", "< 500 ms", lambda r, _: r.median < 500
    ),
    "idle_cpu": Case("idle supervisor CPU", "% core", "< 1% of a core", lambda r, _: r.median < 1),
    "idle_cost_policies": Case(
        "idle supervisor CPU, without and with every lifecycle policy",
        "% core",
        "< 1% of a core",
        lambda r, _: r.median < 1,
    ),
    "supervisor_rss": Case("supervisor RSS", "MiB", None, None),
    "worker_uss": Case("idle worker USS", "MiB", "median <= 1.2 MiB", lambda r, _: r.median <= 1.2),
    "scale": Case(
        "start N workers, all ready", "s", "succeeds", lambda r, _: bool(r.extra.get("success"))
    ),
    "start_scaling": Case(
        "start N eager workers, cost per worker",
        "ms/worker",
        "<= 1.1x per worker of the smallest N",
        _linear_start,
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
    "asgi_requests": Case(
        "requests/s of a uvicorn app (2 processes) with aensure() + get_vars() per request",
        "req/s",
        "calls < 2% of req/s",
        _under_2_percent,
    ),
}

"""The status page of the metrics port: `GET /` (one HTML file with its CSS
and script inline, shipped in the package: nothing is fetched from another
host, so it works offline and inside a cluster) and the `/status.json` it
refreshes itself from.

`/status.json` is read-only and built in the owner's process:

- `pool`: its name, address, supervisor pid, and the probes' verdicts
  (`running` as `/healthz`, `live` as `/livez`, `ready` as `/readyz`);
- `status`: `status()`, one `WorkerStatus` per instance;
- `diagnostics`: `diagnostics()`, one `WorkerDiagnostics` per name hosted
  (asked of the supervisor with `/livez`'s deadline; left out, with
  `diagnostics_error` saying why, when it does not answer: the table part is
  still served, so a frozen supervisor shows as such instead of a blank page);
- `counters`: per name, what `/metrics` counts from the same table read
  (crashes, restarts, boots and their total seconds).
"""

from __future__ import annotations

import importlib.resources
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..errors import BgpoolError
from ..shm.table import BOOT_BUCKETS, Kind, Slot
from .client import status_of
from .probes import LIVENESS_DEADLINE, Probes

if TYPE_CHECKING:
    from .pool import Pool

PAGE = "status.html"
"""The page's file, package data of `bgpool.app`."""


def page() -> bytes:
    """The status page's HTML (read from the installed package)."""
    return importlib.resources.files(__package__).joinpath(PAGE).read_bytes()


def status_document(pool: Pool, probes: Probes) -> dict[str, Any]:
    """What `/status.json` serves (see the module's docstring)."""
    live, live_error = probes.heartbeat.check()
    ready_code, ready = probes.readyz()
    process = pool._process
    document: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(),
        "pool": {
            "name": pool.name,
            "address": pool.address,
            "supervisor_pid": process.pid if process is not None else None,
            "running": probes.running(),
            "live": live,
            "live_error": live_error,
            "ready": ready_code == 200,
            "waiting": ready.get("waiting", []),
        },
        "status": [],
        "diagnostics": [],
        "diagnostics_error": None if live else live_error,
        "counters": [],
    }
    try:
        slots = [s for s in pool._reader().slots() if s.kind != Kind.FREE]
    except BgpoolError as exc:  # not started yet, or gone
        document["diagnostics_error"] = str(exc)
        return document
    document["status"] = [status_of(s).model_dump(mode="json") for s in slots]
    names = _by_name(slots)
    document["counters"] = [_counters(group) for group in names.values()]
    if live:
        document["diagnostics"], document["diagnostics_error"] = _diagnostics(pool, names)
    return document


def _by_name(slots: list[Slot]) -> dict[tuple[int, str], list[Slot]]:
    """The slots of each name (scope id, name), in table order."""
    names: dict[tuple[int, str], list[Slot]] = {}
    for slot in slots:
        names.setdefault((slot.scope_id, slot.name), []).append(slot)
    return names


def _counters(slots: list[Slot]) -> dict[str, Any]:
    """A name's table counters, its instances summed (as `/metrics` does)."""
    return {
        "name": slots[0].name,
        "scope": slots[0].scope_label,
        "crashes": sum(s.crashes for s in slots),
        "restarts": sum(s.restarts for s in slots),
        "hangs": sum(s.hangs for s in slots),
        "recycles": sum(s.recycles_memory + s.recycles_lifetime for s in slots),
        "boots": sum(s.boot_buckets[i] for s in slots for i in range(len(BOOT_BUCKETS))),
        "boot_seconds_sum": sum(s.boot_sum for s in slots),
    }


def _diagnostics(
    pool: Pool, names: dict[tuple[int, str], list[Slot]]
) -> tuple[list[dict[str, Any]], str | None]:
    """Each name's diagnostics, and why some are missing (the first request
    that failed: the rest are not asked, so a supervisor that froze meanwhile
    holds this up for one deadline, not one per name)."""
    found: list[dict[str, Any]] = []
    for scope_id, name in names:
        try:
            model = pool._run(pool._diagnostics_in(scope_id, name, LIVENESS_DEADLINE))
        except LookupError:  # removed by a reload since the table was read
            continue
        except BgpoolError as exc:
            return found, str(exc)
        found.append(model.model_dump(mode="json"))
    return found, None

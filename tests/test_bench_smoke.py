"""Smoke test of scripts/bench.py, the benchmark behind README's "Performance" (its
code is the package scripts/benchmark/).

CI does not run the benchmark (its numbers mean nothing on a shared runner), but
this keeps the script from rotting: a tiny `--quick` run with this test
environment's Python, then the shape of the JSON it writes. Where the peers
(supervisord, circus: the `bench` extra; pm2: node, and pm2 from the npm
registry in .bench-node, which ./scripts/bench installs) are not installed,
the script must skip them and say why; where they are, each has a row in
every case it has an equivalent for, with its ratio to bgpool's row.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"

CASES = {
    "hot_ensure_owner",
    "hot_ensure_client",
    "cold_ensure",
    "batch_ensure",
    "crash_to_ready",
    "drain",
    "idle_cpu",
    "idle_cost_policies",
    "supervisor_rss",
    "worker_uss",
    "edit_to_new_code",
    "reload_cold_ensure",
    "rolling_ready",
    "scale",
    "start_scaling",
    "get_vars_owner",
    "get_vars_client",
    "set_vars",
    "vars_visibility",
    "vars_read",
    "asgi_requests",
}
WITH_BASELINE = CASES - {"idle_cpu", "idle_cost_policies", "supervisor_rss", "start_scaling"}
# the cases with rows of both bare floors (scripts/benchmark/floors.py)
WITH_FLOORS = {
    "cold_ensure",
    "batch_ensure",
    "crash_to_ready",
    "reload_cold_ensure",
    "drain",
    "scale",
    "start_scaling",
}
FLOOR_KINDS = {"bare_sized", "bare_clean"}
# the cases every peer has rows in (the drain at --workers and at --scale)
PEER_CASES = {
    "hot_ensure_client",
    "cold_ensure",
    "crash_to_ready",
    "drain",
    "scale",
    "start_scaling",
    "idle_cpu",
    "supervisor_rss",
    "worker_uss",
}
PM2 = ROOT / ".bench-node" / "node_modules" / "pm2" / "package.json"
WITH_TARGET = CASES - {"supervisor_rss", "vars_read"}
ROW_KEYS = {
    "case",
    "subject",
    "kind",
    "unit",
    "median",
    "p90",
    "samples",
    "ratio_to_baseline",
    "ratio_to_bare_sized",
    "ratio_to_bare_clean",
    "ratio_to_bgpool",
    "target",
    "met",
}
TINY = [
    *("--reps", "2", "--workers", "4", "--scale", "8", "--batch", "4", "--idle-seconds", "0.2"),
    *("--start-sizes", "4,8"),
]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.timeout(300)
def test_quick_run_writes_every_case(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *TINY, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    data = json.loads(out.read_text())

    assert {"machine", "quick", "cases"} <= set(data)
    assert data["quick"] is True
    assert data["machine"]["cpu_count"] >= 1
    assert data["leftover_processes"] == []
    assert data["errors"] == []

    rows = data["cases"]
    assert {row["case"] for row in rows} == CASES
    for row in rows:
        where = f"{row['case']}: {row['subject']}"
        assert set(row) >= ROW_KEYS, where
        assert row["kind"] in ("baseline", "bgpool", "peer", "reference", *FLOOR_KINDS), where
        assert row["samples"], where
        assert all(isinstance(x, int | float) and math.isfinite(x) for x in row["samples"]), where
        assert row["p90"] >= row["median"], where
        if row["case"] == "vars_visibility":
            continue  # a reader may see a snapshot before set_vars() has returned: < 0
        if row["case"] in ("idle_cpu", "idle_cost_policies"):  # an idle supervisor may measure 0
            assert row["median"] >= 0, where
        else:
            assert row["median"] > 0, where
        assert row["ratio_to_baseline"] is None or row["ratio_to_baseline"] >= 0, where
        if row["kind"] == "bgpool" and row["case"] in WITH_TARGET:
            assert isinstance(row["met"], bool) and row["target"], where
        if row["kind"] == "bgpool" and row["case"] in WITH_FLOORS:
            assert row["ratio_to_bare_sized"] > 0 and row["ratio_to_bare_clean"] > 0, where
    for case in CASES:
        kinds = {row["kind"] for row in rows if row["case"] == case}
        assert "bgpool" in kinds, case
        assert ("baseline" in kinds) == (case in WITH_BASELINE), case
        assert (kinds >= FLOOR_KINDS) == (case in WITH_FLOORS), case
    sizes = {r["params"]["workers"] for r in rows if r["case"] == "start_scaling"}
    assert sizes == {4, 8}, sizes
    scale = next(r for r in rows if r["case"] == "scale" and r["kind"] == "bgpool")
    assert scale["met"] is True, scale

    drains = {
        r["params"]["workers"] for r in rows if r["case"] == "drain" and r["kind"] == "bgpool"
    }
    assert drains == {4, 8}, drains  # at --workers and at --scale

    bgpool_medians = {
        (r["case"], r["params"].get("workers")): r["median"] for r in rows if r["kind"] == "bgpool"
    }
    peers: dict[str, set[tuple[str, int | None]]] = {}
    for row in rows:
        if row["kind"] != "peer":
            continue
        n = row["params"].get("workers")
        peers.setdefault(row["subject"].split()[0].rstrip(","), set()).add((row["case"], n))
        if bgpool_medians.get((row["case"], n), 0) > 0:  # (an idle CPU may measure 0)
            assert row["ratio_to_bgpool"] > 0, row["subject"]
    expected: set[tuple[str, int | None]] = {
        (case, None) for case in ("hot_ensure_client", "cold_ensure", "crash_to_ready")
    }
    expected |= {(c, 4) for c in ("drain", "idle_cpu", "supervisor_rss")} | {("drain", 8)}
    expected |= {("scale", 8), ("start_scaling", 4), ("start_scaling", 8), ("worker_uss", None)}
    assert {case for case, _ in expected} == PEER_CASES
    installed = {
        "supervisord": _installed("supervisor"),
        "circus": _installed("circus"),
        "pm2": shutil.which("node") is not None and PM2.exists(),
    }
    for name, present in installed.items():
        skips = [reason for reason in data["skipped"] if reason.startswith(f"skipped {name}")]
        if present:
            assert peers.get(name) == expected, (name, peers.get(name), data["skipped"])
            assert not skips, skips
        else:
            assert skips and name not in peers, data["skipped"]

"""What ``bgpool run`` shows a person: the live table in a real terminal (a pty of a
given size, its output played on the ``pyte`` terminal emulator to see the screen),
coloured worker labels, ``NO_COLOR`` and ``--timestamps``.

The config is ``fixtures/obs_run_config.py``: ``obs-eager`` (eager) and
``obs-crashy`` (lazy; crashes once right after it is ready, with a long error).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import BgpoolRun, wait_for
from test_cli_commands import cli, env_without_address

COLUMNS, ROWS = 60, 40
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
ROW = re.compile(r"^(obs-eager|obs-crashy) +- +0 +(\d+|-) +(\w+) +(\S+)")


@pytest.fixture
def run(sentinel_dir: Path) -> Iterator[Callable[..., BgpoolRun]]:
    runs: list[BgpoolRun] = []

    def start(*args: str, **kwargs: Any) -> BgpoolRun:
        runs.append(BgpoolRun("fixtures/obs_run_config.py", sentinel_dir, *args, **kwargs))
        return runs[-1]

    yield start
    for r in runs:
        r.close()


def rows(screen: list[str]) -> dict[str, re.Match[str]]:
    """The table's rows on the screen, by worker name."""
    return {m.group(1): m for line in screen if (m := ROW.match(line))}


def eager_ready(r: BgpoolRun) -> re.Match[str] | None:
    """obs-eager's row, once the table shows it ready."""
    row = rows(r.screen()).get("obs-eager")
    return row if row is not None and row.group(3) == "ready" else None


def crash_obs_crashy(r: BgpoolRun) -> None:
    """Start obs-crashy and wait for its crash and its second attempt's readiness
    on the screen."""
    proc = cli("ensure", "obs-crashy", "--address", r.address(), env=env_without_address())
    assert proc.returncode == 0, proc.stderr
    r.wait_line("obs-crashy.0", "hello from obs-crashy attempt 2")

    def ready_again() -> bool:
        shown = rows(r.screen())
        return "obs-crashy" in shown and shown["obs-crashy"].group(3) == "ready"

    wait_for(ready_again, timeout=15, what="obs-crashy ready again in the table")


def assert_one_table(screen: list[str]) -> None:
    """The screen ends with exactly one table: a header, then a row per instance,
    each whole on its line (a wrapped row would start a line with its tail)."""
    text = "\n".join(screen)
    headers = [i for i, line in enumerate(screen) if line.startswith("WORKER")]
    assert len(headers) == 1, f"{len(headers)} table headers on the screen:\n{text}"
    below = [line for line in screen[headers[0] + 1 :] if line]
    assert len(below) == 2, f"not just two rows below the header:\n{text}"
    assert set(rows(below)) == {"obs-eager", "obs-crashy"}, text


def test_live_table_fits_the_terminal_and_leaves_no_stray_line_after_a_crash(
    run: Callable[..., BgpoolRun],
) -> None:
    r = run(tty=True, size=(COLUMNS, ROWS))
    r.wait_line("obs-eager", "ready")
    crash_obs_crashy(r)
    screen = r.screen()
    assert_one_table(screen)
    # what was drawn: every line of every table fits the width, long LAST
    # CHANGE cells (the crash's, the handle's) cut with an ellipsis
    drawn = [ANSI.sub("", part) for part in re.split(r"\r\n|\r|\n", r.raw().decode())]
    table_lines = [
        line for line in drawn if line.startswith(("WORKER", "obs-eager  ", "obs-crashy  "))
    ]
    assert any(line.rstrip().endswith("…") for line in table_lines), table_lines
    too_wide = [line for line in table_lines if len(line.rstrip()) > COLUMNS]
    assert not too_wide
    assert r.stop() == 0, r.stderr()
    final = r.screen()
    assert_one_table(final)
    assert {m.group(3) for m in rows(final).values()} == {"stopped"}, final
    assert "obs-crashy.0 | RuntimeError: obs crash" in r.stderr().splitlines()


def test_live_table_uptime_ticks_on_a_quiet_pool(run: Callable[..., BgpoolRun]) -> None:
    r = run(tty=True, size=(COLUMNS, ROWS))
    first = wait_for(functools.partial(eager_ready, r), timeout=15, what="obs-eager ready")
    events = r.text().count("hello from")

    def ticked() -> bool:
        now = rows(r.screen()).get("obs-eager")
        return now is not None and now.group(4) != first.group(4)

    wait_for(ticked, timeout=10, what=f"obs-eager's uptime past {first.group(4)}")
    assert r.text().count("hello from") == events  # nothing else happened meanwhile
    assert r.stop() == 0, r.stderr()


def test_live_table_colours_states_unless_no_color(run: Callable[..., BgpoolRun]) -> None:
    coloured = run(tty=True, size=(COLUMNS, ROWS))
    plain = run(tty=True, size=(COLUMNS, ROWS), env={"NO_COLOR": "1"})
    for r in (coloured, plain):
        wait_for(functools.partial(eager_ready, r), timeout=15, what="obs-eager ready")
    assert "\x1b[32mready" in coloured.raw().decode()  # green
    assert not [c for c in COLOUR.findall(plain.raw().decode()) if re.search(r"\[(3|9)\d", c)]
    for r in (coloured, plain):
        assert r.stop() == 0, r.stderr()


def test_plain_view_colours_labels_on_a_terminal_unless_no_color(
    run: Callable[..., BgpoolRun],
) -> None:
    coloured = run("--plain", tty=True, stderr_tty=True)
    plain = run("--plain", tty=True, stderr_tty=True, env={"NO_COLOR": "1"})
    for r in (coloured, plain):
        r.wait_line("obs-eager.0", "hello from obs-eager attempt")
        r.wait_line("obs-eager.0", "ready")  # bgpool run's own line: its signals are set
    assert "\x1b[36mobs-eager.0 |\x1b[0m hello from obs-eager attempt " in coloured.text()
    assert "\x1b[" not in plain.text()
    for r in (coloured, plain):
        assert r.stop() == 0, r.stderr()
    assert "\x1b[" not in plain.text()


def test_timestamps_prefix_each_worker_line(run: Callable[..., BgpoolRun]) -> None:
    r = run("--timestamps")
    line = r.wait_line("obs-eager.0 | hello from obs-eager attempt 1")
    r.wait_line("obs-eager.0", "ready")
    assert re.fullmatch(r"\d\d:\d\d:\d\d obs-eager\.0 \| hello from obs-eager attempt 1", line)
    proc = cli("ensure", "obs-crashy", "--address", r.address(), env=env_without_address())
    assert proc.returncode == 0, proc.stderr
    r.wait_line("obs-crashy.0 | hello from obs-crashy attempt 2")
    assert r.stop() == 0, r.stderr()
    stamped = [
        x for x in r.stderr().splitlines() if x.endswith("obs-crashy.0 | RuntimeError: obs crash")
    ]
    assert len(stamped) == 1 and re.fullmatch(r"\d\d:\d\d:\d\d .*", stamped[0]), r.stderr()

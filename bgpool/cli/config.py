"""Loading `bgpool run`'s config file: a Python file that defines `config`."""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from pathlib import Path

from ..declarations import PoolConfig, default_root
from ..errors import BgpoolError


def load_config(path: str) -> PoolConfig:
    """Run the config file and return its `config`. Its directory and the current
    directory go first on sys.path (as `python CONFIG.py` and `python -m` would
    put them), so what the config file imports is found; its directory is the
    default `PoolConfig.root`, so its targets resolve the same from any
    current directory."""
    here = Path(path).resolve().parent
    for directory in (os.getcwd(), str(here)):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    with default_root(here):
        namespace = runpy.run_path(path, run_name="__bgpool_config__")
    config = namespace.get("config")
    if not isinstance(config, PoolConfig):
        raise BgpoolError(f"{path} must define config = PoolConfig(...)")
    return config


_NOT_YOURS = (str(Path(__file__).resolve().parent.parent), runpy.__file__, "<frozen runpy>")
"""Where the frames of loading a config come from that are not the config's:
bgpool's own package and runpy."""


def format_load_error(exc: BaseException) -> str:
    """`exc`, raised by `load_config()`, as the traceback Python would print
    for the config file run on its own: bgpool's frames and runpy's taken out
    (of chained exceptions too), so what is left starts at the user's code."""
    shown = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    pending = [shown]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.stack = traceback.StackSummary.from_list(
            [frame for frame in current.stack if not frame.filename.startswith(_NOT_YOURS)]
        )
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return "".join(shown.format())

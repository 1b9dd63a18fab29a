"""Loading `bgpool run`'s config file: a Python file that defines `config`."""

from __future__ import annotations

import os
import runpy
import sys
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

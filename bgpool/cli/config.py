"""Loading `bgpool run`'s config file: a Python file that defines `config`."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from ..declarations import PoolConfig
from ..errors import BgpoolError


def load_config(path: str) -> PoolConfig:
    """Run the config file and return its `config`. Its directory and the current
    directory go first on sys.path (as `python CONFIG.py` and `python -m` would
    put them), so module targets beside the config or the project import."""
    for directory in (os.getcwd(), str(Path(path).resolve().parent)):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    namespace = runpy.run_path(path, run_name="__bgpool_config__")
    config = namespace.get("config")
    if not isinstance(config, PoolConfig):
        raise BgpoolError(f"{path} must define config = PoolConfig(...)")
    return config

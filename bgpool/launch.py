"""How bgpool starts a fresh interpreter that runs one of its own entry points
(the supervisor, a spawned worker): the command line, with the directory that
holds this package first on `sys.path` so the same bgpool is imported even
where it is not installed.
"""

from __future__ import annotations

import os
import sys

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

TRANSITIONS_SHOWN = "BGPOOL_TRANSITIONS_SHOWN"
"""Set to 1 in the supervisor's environment by an owner that shows every state
transition itself (`bgpool run`): the supervisor then leaves them out of its log,
which would print each twice. The supervisor removes it before anything inherits it."""


def python_command(module: str, function: str, *args: str) -> list[str]:
    """`python -c "...; from <module> import <function>; <function>()" ARGS...`."""
    code = (
        f"import sys; sys.path.insert(0, {PACKAGE_ROOT!r}); "
        f"from {module} import {function}; {function}()"
    )
    return [sys.executable, "-c", code, *args]

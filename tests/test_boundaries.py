"""The process boundaries of bgpool's source tree, enforced (each folder is what one
kind of process runs: README, "How it is built"): every module under bgpool/ is
parsed with ``ast`` and each import is checked, wherever it is (module level, inside
a function, under ``if TYPE_CHECKING:``), relative or absolute, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.

- ``worker/`` never imports ``supervisor``, ``app`` or ``cli``;
- ``supervisor/`` never imports ``app`` or ``cli``;
- ``app/`` never imports ``supervisor``, ``worker`` or ``cli``;
- ``shm/`` imports none of ``app``, ``supervisor``, ``worker``, ``cli``;
- ``cli/`` never imports ``supervisor`` or ``worker``;
- ``coordinator/`` (the lease process) imports none of ``app``, ``supervisor``,
  ``worker``, ``cli``, ``shm``, and nothing else imports it (the supervisor
  starts it as a fresh interpreter, so it never loads redis), and nothing
  outside it imports ``redis``;
- the top-level modules (the shared vocabulary) import none of ``app``,
  ``supervisor``, ``worker``, ``cli``, ``shm``, except the public re-export points
  ``bgpool/__init__.py``, ``bgpool/metrics.py`` and ``bgpool/__main__.py``;
- only ``bgpool/platform.py`` imports ``ctypes`` or ``resource``, or uses
  ``pidfd_open``, ``pidfd_send_signal``, ``prctl`` or ``SO_PEERCRED`` of another
  module (attribute names in the AST; bgpool.platform's own wrappers are fine).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "bgpool"
SIDES = ("app", "supervisor", "worker", "shm", "cli", "coordinator")
REEXPORTS = {"bgpool", "bgpool.metrics", "bgpool.__main__"}
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "worker": ("supervisor", "app", "cli", "coordinator"),
    "supervisor": ("app", "cli", "coordinator"),
    "app": ("supervisor", "worker", "cli", "coordinator"),
    "shm": ("app", "supervisor", "worker", "cli", "coordinator"),
    "cli": ("supervisor", "worker", "coordinator"),
    "coordinator": ("app", "supervisor", "worker", "cli", "shm"),
    "": ("app", "supervisor", "worker", "cli", "shm", "coordinator"),  # the top-level modules
}
PLATFORM = "bgpool.platform"
PLATFORM_MODULES = {"ctypes", "resource"}
PLATFORM_NAMES = {"pidfd_open", "pidfd_send_signal", "prctl", "SO_PEERCRED"}
COORDINATOR_MODULES = {"redis"}  # blocking client code: only the coordinator process runs it


def module_name(path: Path) -> str:
    """``bgpool/app/pool.py`` -> ``bgpool.app.pool``; a package's ``__init__`` is the
    package itself."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _side(module: str) -> str:
    """``app``, ``supervisor``, ... for a module in a side's folder, ``""`` for a
    top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in SIDES) else ""


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


class _Imports(ast.NodeVisitor):
    """Every import of one module: ``(line, imported name)``, and what each local
    name is bound to (for the attribute rule)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.found: list[tuple[int, str]] = []
        self.bound: dict[str, str] = {}
        self.attributes: list[tuple[int, str, str]] = []  # (line, base, attribute)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((node.lineno, alias.name))
            if alias.asname:
                self.bound[alias.asname] = alias.name
            else:
                self.bound[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.module, self.is_package, node.level, node.module)
        for alias in node.names:
            name = base if alias.name == "*" else f"{base}.{alias.name}"
            self.found.append((node.lineno, name))
            self.bound[alias.asname or alias.name] = name

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        first = node.args[0] if node.args else None
        literal = first.value if isinstance(first, ast.Constant) else None
        if called in ("import_module", "__import__") and isinstance(literal, str):
            level = len(literal) - len(literal.lstrip("."))
            name = _resolve(self.module, self.is_package, level, literal[level:] or None)
            self.found.append((node.lineno, name))
        if called in ("getattr", "hasattr") and len(node.args) >= 2:
            attribute = node.args[1]
            if isinstance(attribute, ast.Constant) and isinstance(attribute.value, str):
                self.attributes.append((node.lineno, ast.unparse(node.args[0]), attribute.value))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attributes.append((node.lineno, ast.unparse(node.value), node.attr))
        self.generic_visit(node)

    def dotted(self, expression: str) -> str:
        """An attribute's base as an absolute name (``platform`` -> ``bgpool.platform``
        after ``from .. import platform``)."""
        head, _, rest = expression.partition(".")
        head = self.bound.get(head, head)
        return f"{head}.{rest}" if rest else head


def check_source(module: str, source: str, path: str, is_package: bool = False) -> list[str]:
    """The boundary violations of one module's source: ``path:line: what``."""
    imports = _Imports(module, is_package)
    imports.visit(ast.parse(source, path))
    problems = []
    side = _side(module)
    if side not in FORBIDDEN:
        return [f"{path}:1: {module}: bgpool/{side}/ is a folder the boundary rules do not know"]
    forbidden = () if module in REEXPORTS else FORBIDDEN[side]
    where = f"bgpool/{side}/" if side else "a top-level module"
    for line, name in imports.found:
        for other in forbidden:
            if _within(name, f"bgpool.{other}"):
                rule = f"{where} must not import bgpool.{other}"
                problems.append(f"{path}:{line}: {module} imports {name}: {rule}")
        if module != PLATFORM and name.split(".")[0] in PLATFORM_MODULES:
            problems.append(f"{path}:{line}: {module} imports {name}: only {PLATFORM} may")
        if side != "coordinator" and name.split(".")[0] in COORDINATOR_MODULES:
            rule = "only bgpool/coordinator/ may (the supervisor never loads redis)"
            problems.append(f"{path}:{line}: {module} imports {name}: {rule}")
        if (
            module != PLATFORM
            and name.rsplit(".", 1)[-1] in PLATFORM_NAMES
            and not _within(name, PLATFORM)
        ):
            problems.append(f"{path}:{line}: {module} imports {name}: only {PLATFORM} may")
    if module != PLATFORM:
        for line, base, attribute in imports.attributes:
            if attribute in PLATFORM_NAMES and imports.dotted(base) != PLATFORM:
                problems.append(
                    f"{path}:{line}: {module} uses {base}.{attribute}: only {PLATFORM} may "
                    f"(call its wrapper, {PLATFORM}.{attribute})"
                )
    return problems


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py*") if p.suffix in (".py", ".pyi"))


def check_tree() -> list[str]:
    problems = []
    for path in package_modules():
        problems += check_source(
            module_name(path),
            path.read_text(encoding="utf-8"),
            str(path.relative_to(ROOT)),
            is_package=path.stem == "__init__",
        )
    return problems


def test_the_tree_keeps_its_process_boundaries() -> None:
    sides = {_side(module_name(p)) for p in package_modules()}
    assert sides == {"", *SIDES}, sides  # every side's folder is there, and checked
    problems = check_tree()
    assert not problems, "process boundaries crossed:\n" + "\n".join(problems)


# ------------------------------------------------------------- the checker itself


def _check(module: str, source: str, is_package: bool = False) -> list[str]:
    return check_source(module, textwrap.dedent(source), "<synthetic>", is_package)


@pytest.mark.parametrize(
    ("module", "source", "line", "named"),
    [
        pytest.param(
            "bgpool.worker.runtime",
            """
            import os

            def later():
                from bgpool.supervisor import loop
            """,
            5,
            "bgpool.supervisor.loop",
            id="worker-imports-supervisor-in-a-function",
        ),
        pytest.param(
            "bgpool.app.pool",
            """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from ..worker.handle import Handle
            """,
            4,
            "bgpool.worker.handle.Handle",
            id="app-imports-worker-under-type-checking",
        ),
        pytest.param(
            "bgpool.shm.table", "from .. import cli\n", 1, "bgpool.cli", id="shm-relative-cli"
        ),
        pytest.param(
            "bgpool.supervisor.loop",
            "import bgpool.app.client as c\n",
            1,
            "bgpool.app.client",
            id="supervisor-imports-app",
        ),
        pytest.param(
            "bgpool.cli.main",
            "from ..worker import runtime\n",
            1,
            "bgpool.worker.runtime",
            id="cli-imports-worker",
        ),
        pytest.param(
            "bgpool.errors", "from .shm import table\n", 1, "bgpool.shm.table", id="top-level-shm"
        ),
        pytest.param(
            "bgpool.worker.runtime",
            "import importlib\nimportlib.import_module('bgpool.cli.main')\n",
            2,
            "bgpool.cli.main",
            id="worker-import-module-literal",
        ),
        pytest.param("bgpool.app.pool", "import ctypes\n", 1, "ctypes", id="ctypes-off-platform"),
        pytest.param(
            "bgpool.supervisor.main",
            "from resource import getrlimit\n",
            1,
            "resource.getrlimit",
            id="resource-off-platform",
        ),
        pytest.param(
            "bgpool.supervisor.loop",
            "import os\n\n\ndef f(pid):\n    return os.pidfd_open(pid)\n",
            5,
            "os.pidfd_open",
            id="os-pidfd-open-off-platform",
        ),
        pytest.param(
            "bgpool.supervisor.listener",
            "import socket as s\nOPT = s.SO_PEERCRED\n",
            2,
            "s.SO_PEERCRED",
            id="so-peercred-off-platform",
        ),
        pytest.param(
            "bgpool.app.pool",
            "import signal\nsend = getattr(signal, 'pidfd_send_signal')\n",
            2,
            "signal.pidfd_send_signal",
            id="getattr-pidfd-send-signal",
        ),
        pytest.param(
            "bgpool.worker.runtime",
            "from os import prctl\n",
            1,
            "os.prctl",
            id="from-import-prctl",
        ),
        pytest.param(
            "bgpool.supervisor.leases", "import redis\n", 1, "redis", id="redis-off-coordinator"
        ),
        pytest.param(
            "bgpool.supervisor.leases",
            "from ..coordinator import store\n",
            1,
            "bgpool.coordinator.store",
            id="supervisor-imports-coordinator",
        ),
    ],
)
def test_the_checker_names_module_line_and_import(
    module: str, source: str, line: int, named: str
) -> None:
    problems = _check(module, source)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"<synthetic>:{line}: {module} "), problems[0]
    assert named in problems[0], problems[0]


def test_the_checker_allows_what_the_rules_allow() -> None:
    allowed = {
        "bgpool.app.pool": """
            from .. import platform, texts
            from ..shm.table import Kind
            from .client import PoolClient
            import bgpool.platform

            def f(pid):
                platform.pidfd_send_signal(platform.pidfd_open(pid), 9)
                bgpool.platform.prctl(1, 2)
            """,
        "bgpool.worker.runtime": "from ..shm import varstore\nfrom .. import identity\n",
        "bgpool.supervisor.loop": "from ..worker import runtime\nfrom ..platform import prctl\n",
        "bgpool.cli.main": "from ..app.client import PoolClient\n",
        "bgpool.metrics": "from .app.metrics import collector\n",
        "bgpool.__main__": "from .cli.main import main\n",
        "bgpool.platform": "import ctypes, resource, os\nfd = os.pidfd_open(1)\n",
        "bgpool.errors": "from . import texts\n",
        "bgpool.coordinator.store": "import redis\nfrom ..leases import Keys\n",
    }
    for module, source in allowed.items():
        assert _check(module, source) == [], module
    assert _check("bgpool", "from .app.pool import Pool\n", is_package=True) == []
    # in a package's __init__, one dot is the package itself
    assert _check("bgpool.worker", "from . import handle\n", is_package=True) == []
    assert len(_check("bgpool.worker", "from ..app import pool\n", is_package=True)) == 1


def test_a_folder_without_rules_is_a_violation() -> None:
    (problem,) = _check("bgpool.plugins.x", "import os\n")
    assert "bgpool/plugins/ is a folder the boundary rules do not know" in problem

"""The dependency rules of docs/architecture.md, checked on the source (an AST walk, no import).

Which package may import which::

    core       -> nothing of ternbench
    methods    -> core
    schedules  -> core, methods (public API)
    reports    -> core, methods (public API, lazily: the registry's order and paper numbers)
    bench      -> core, methods, schedules, reports

and no module imports another package's private module or name (``ternbench.methods._base``,
``from ternbench.schedules import _tvm``, ``from ..methods._base import X``): what other packages
use is exported by the package's ``__init__``. Imports inside functions count as well. Not seen:
``importlib.import_module`` with a computed name (the method plugins load that way by design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "ternbench"
#: package -> the packages it may import (itself always)
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "methods": frozenset({"core"}),
    "schedules": frozenset({"core", "methods"}),
    "reports": frozenset({"core", "methods"}),
    "bench": frozenset({"core", "methods", "schedules", "reports"}),
}
#: folders inside the packages that are not part of them: the asv benchmarks run against older
#: commits too (installed one after another), so they keep importing what those had
EXCLUDED = (ROOT / "bench" / "asv",)


def _module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package ``__init__``) of a file under ROOT."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_init = parts[-1] == "__init__"
    if is_init:
        parts = parts[:-1]
    return ".".join([NAMESPACE, *parts]), is_init


def _imported(tree: ast.AST, module: str, is_init: bool) -> list[tuple[int, str]]:
    """(line, full dotted name) of every ternbench import in ``tree``: ``from X import a, b``
    gives ``X.a`` and ``X.b`` (a name or a submodule: both are checked alike)."""
    package = module.split(".") if is_init else module.split(".")[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                src = ".".join([*base, *([node.module] if node.module else [])])
            else:
                src = node.module or ""
            out += [(node.lineno, f"{src}.{a.name}") for a in node.names if a.name != "*"]
            if any(a.name == "*" for a in node.names):
                out.append((node.lineno, src))
    return [(line, name) for line, name in out if name.split(".")[0] == NAMESPACE]


def violations(source: str, module: str, is_init: bool = False) -> list[str]:
    """The dependency-rule violations of one module's ``source`` (``module``: its dotted name,
    e.g. ``ternbench.schedules.measure``)."""
    own = module.split(".")[1]
    tree = ast.parse(source)
    found = []
    for line, name in _imported(tree, module, is_init):
        parts = name.split(".")
        if len(parts) < 2 or parts[1] == own:
            continue  # the namespace itself, or this package's own modules
        other = parts[1]
        if other not in ALLOWED.get(own, frozenset()):
            found.append(f"{module}:{line}: {own} may not import {other} ({name})")
        elif any(p.startswith("_") for p in parts[2:]):
            found.append(f"{module}:{line}: private {name} of {other}; import what "
                         f"ternbench.{other} exports")
    return found


def _sources() -> list[Path]:
    files = []
    for pkg in ALLOWED:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if not any(path.is_relative_to(ex) for ex in EXCLUDED):
                files.append(path)
    return files


def test_every_package_is_checked() -> None:
    files = _sources()
    assert {p.relative_to(ROOT).parts[0] for p in files} == set(ALLOWED)
    assert len(files) > 40


def test_packages_follow_the_dependency_rules() -> None:
    found = []
    for path in _sources():
        module, is_init = _module_name(path)
        found += violations(path.read_text(encoding="utf-8"), module, is_init)
    assert not found, "dependency rules broken (docs/architecture.md):\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        # an import upwards, absolute and lazy (inside a function)
        ("ternbench.methods.rtn", "def f():\n    from ternbench.bench.train import train\n",
         "methods may not import bench"),
        ("ternbench.reports.tables", "import ternbench.schedules\n",
         "reports may not import schedules"),
        ("ternbench.core.files", "from ternbench import schedules\n",
         "core may not import schedules"),
        # relative imports that climb out of the package
        ("ternbench.schedules.x86", "from ..bench.results import COLUMNS\n",
         "schedules may not import bench"),
        # another package's private module or name, although the package itself is allowed
        ("ternbench.schedules.x86", "from ..methods._base import LayerExport\n",
         "private ternbench.methods._base.LayerExport"),
        ("ternbench.bench.runner", "from ternbench.schedules import _tvm\n",
         "private ternbench.schedules._tvm"),
        ("ternbench.bench.runner", "import ternbench.methods._deploy\n",
         "private ternbench.methods._deploy"),
    ],
)
def test_checker_catches_a_violation(module: str, source: str, expected: str) -> None:
    found = violations(source, module)
    assert len(found) == 1 and expected in found[0], found


def test_checker_allows_what_the_rules_allow() -> None:
    ok = {
        "ternbench.schedules.measure": "from ternbench.core.export import LayerExport\n"
                                       "from ternbench.methods import swap_layers\n"
                                       "from . import _tvm\nfrom .tuning_cache import _MEMO\n",
        "ternbench.bench.runner": "from ternbench import schedules\n"
                                  "from ternbench.reports import build_report\n"
                                  "from ..core.files import atomic_write\n",
        "ternbench.methods.rtn": "from ._base import _check\nfrom ternbench.core import train\n",
    }
    for module, source in ok.items():
        assert violations(source, module) == [], module
    # an __init__ resolves relative imports against itself
    assert violations("from ._base import X\n", "ternbench.methods", is_init=True) == []

"""Layers, not a web (docs/architecture.md): no import cycle inside resnet_cli, imports inside
functions included, and the error vocabulary at the bottom."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resnet_cli"


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folder `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's own modules that one import statement loads (explicitly named ones: a
    submodule's implicit import of its parent package is not an edge, or every package that
    re-exports its submodules would be a cycle)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if node.level:  # relative: from the module's package, one level up per extra dot
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = {target} if target in known else set()
    found |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}  # from pkg import submodule
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (functions included)."""
    files = module_files(root)
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[module] = set().union(*(_imported(n, module, is_package, known) for n in ast.walk(tree)
                                      if isinstance(n, (ast.Import, ast.ImportFrom))))
        graph[module].discard(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        return e.args[1]
    return None


def test_no_import_cycle_in_resnet_cli():
    graph = import_graph(PACKAGE)
    # the parser sees top-level, relative and in-function imports (a broken parser finds no cycle either)
    assert "resnet_cli.cli" in graph["resnet_cli.train"]  # inside main()
    assert "resnet_cli.sweep" in graph["resnet_cli.cli"]  # inside a function, relative
    assert "resnet_cli.distributed" in graph["resnet_cli.cli"]  # `from . import distributed`
    assert "resnet_cli.errors" in graph["resnet_cli.sweep.jobs"]  # `from ..errors import ...`
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(reversed(cycle))


def test_errors_sit_at_the_bottom():
    """Every layer raises these and every command reports them, so they import nothing of ours."""
    graph = import_graph(PACKAGE)
    assert graph["resnet_cli.errors"] == set()
    users = {m for m, deps in graph.items() if "resnet_cli.errors" in deps}
    assert {"resnet_cli.cli", "resnet_cli.config", "resnet_cli.models.resnet", "resnet_cli.sweep.jobs"} <= users


@pytest.mark.parametrize("a_body, b_body", [
    ("from . import b\n", "from .a import f\n"),
    ("def f():\n    from .b import g\n", "def g():\n    from . import a\n"),  # only inside functions
    ("import pkg.b\n", "from .sub import c\n"),  # through a subpackage
])
def test_the_cycle_check_sees_cycles(tmp_path: Path, a_body: str, b_body: str):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(a_body)
    (pkg / "b.py").write_text(b_body)
    (pkg / "sub" / "__init__.py").write_text("from .c import x\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\nx = 1\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and {"pkg.a"} <= set(cycle)

"""No module of either package imports another that (directly or through others) imports it back.

Every import statement counts wherever it stands (module level, inside a function, under
``TYPE_CHECKING``): a lazy import hides a cycle from the interpreter, not from a reader. A package's
``__init__``, which Python runs before any of its submodules, is an edge only where a module imports a
name it defines (``from . import __version__``); ``from . import trainer`` is an edge to ``trainer``.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

import carve3d_reward
import carve3d_trainer

PACKAGES = {pkg.__name__: Path(pkg.__file__).parent for pkg in (carve3d_reward, carve3d_trainer)}


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package's name is its ``__init__``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the package its import statements run."""
    modules = package_modules(root, package)

    def resolve(name: str) -> str | None:  # the innermost module of the package that ``name`` runs
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]  # relative imports start here
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # ``from base import n``: the submodule ``base.n`` if there is one, else ``base`` (which defines n)
                targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        graph[name] = {t for t in map(resolve, targets) if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import path back to itself for each module that has one (each cycle once)."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in sorted(graph):
        parents: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    cycle = [start, *reversed(path[:-1]), start]
                    if frozenset(cycle) not in seen:
                        seen.add(frozenset(cycle))
                        found.append(cycle)
                    queue.clear()
                    break
                if nxt not in parents and nxt != start:
                    parents[nxt] = node
                    queue.append(nxt)
    return found


#: Edges that must be seen (a lazy import inside a function; a relative import two levels up).
KNOWN_EDGES = {
    "carve3d_trainer": ("carve3d_trainer.cli", "carve3d_trainer.trainer"),
    "carve3d_reward": ("carve3d_reward.tools.validate", "carve3d_reward.metric"),
}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_the_package_has_no_import_cycle(package: str) -> None:
    graph = import_graph(PACKAGES[package], package)
    source, target = KNOWN_EDGES[package]
    assert target in graph[source]
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_walker_sees_relative_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    """A cycle through ``from . import x`` in a function and a ``TYPE_CHECKING`` import is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("VERSION = 1\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.c import C\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import os\nfrom .. import VERSION\nfrom ..a import f\n")
    (pkg / "d.py").write_text("import pkg.sub.c\nfrom pkg import a\n")
    graph = import_graph(pkg, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg", "pkg.a"},
        "pkg.d": {"pkg.a", "pkg.sub.c"},
    }
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]

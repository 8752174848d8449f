"""The mmn modules import each other without cycles, counting function-level (lazy) imports.

A lazy import inside a function hides a cycle from Python's import machinery but not from the
design: two modules that need each other are one module in two files. The graph is read from
the source with :mod:`ast` (every ``import`` / ``from ... import`` anywhere in a module, except
under ``if TYPE_CHECKING:``), with edges to the named mmn module (a submodule when
``from pkg import sub`` names one, else the package).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    mods = {}
    for p in sorted((root / "mmn").rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: {mmn modules it imports anywhere in its source}}`` for the package under ``root/mmn``."""
    mods = _modules(root)

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for m, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for node in ast.walk(tree)
                       if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                       for n in ast.walk(node)}
        edges: set[str | None] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                edges |= {known(a.name) for a in node.names if a.name.split(".")[0] == "mmn"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod.split(".")[0] != "mmn":
                    continue
                edges |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else known(mod) for a in node.names}
        graph[m] = {e for e in edges if e is not None and e != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_cycle_hidden_by_lazy_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "mmn" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "mmn" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from mmn.sub.b import g\n    return g()\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mmn.sub import c\n"
                              "def g():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("from mmn.sub.b import g\n")
    g = import_graph(tmp_path)
    assert g["mmn.sub.a"] == {"mmn.sub.b"} and g["mmn.sub.b"] == {"mmn.sub.a"}  # TYPE_CHECKING import: no edge
    assert cycles(g) == [["mmn.sub.a", "mmn.sub.b"]]


def test_mmn_modules_import_each_other_without_cycles() -> None:
    g = import_graph(REPO)
    assert "mmn.neurons.attribution" in g and "mmn.neurons.methods" in g["mmn.neurons.attribution"]
    found = cycles(g)
    assert not found, "import cycles among mmn modules (lazy imports included): " + "; ".join(
        " <-> ".join(c) for c in found)

"""The shape of the code: no import cycles among the installed modules, no module of
store/ reaching into another's private names, no module grown past 600 lines.

Imports are read with `ast`, not by importing: a cycle through an import inside a
function (made to dodge the import-time failure) counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The installed packages (pyproject's package-dir): their top-level modules only, a
# folder inside one (tools/bench/) is not installed.
PACKAGES = {"store": "ferryfs.store", "fs": "ferryfs.fs", "tools": "ferryfs.tools"}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for p in sorted((REPO / folder).glob("*.py")):
            name = pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"
            mods[name] = p
    return mods


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that module `name` imports, anywhere in its body."""
    pkg = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                base = f"{up}.{base}" if base else up
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def test_import_cycles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_among_store_fs_and_tools() -> None:
    mods = _modules()
    assert "ferryfs.store.store" in mods
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    assert "ferryfs.store.kv" in graph["ferryfs.store.store"]
    assert import_cycles(graph) == []


def _private_defined(tree: ast.AST) -> set[str]:
    """The `_names` a module defines: functions, classes, methods, module globals
    and `self._attributes`."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.id if isinstance(node, ast.Name) else node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute):
            out.add(node.target.attr)
    return {n for n in out if n.startswith("_") and not n.startswith("__")}


def test_no_store_module_uses_another_ones_private_names() -> None:
    trees = {p.name: ast.parse(p.read_text()) for p in sorted((REPO / "store").glob("*.py"))}
    defined = {name: _private_defined(tree) for name, tree in trees.items()}
    found = []
    for name, tree in trees.items():
        others = set().union(*(d for n, d in defined.items() if n != name)) - defined[name]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                found += [f"{name}: from .{node.module} import {a.name}"
                          for a in node.names if a.name.startswith("_")]  # fmt: skip
            elif isinstance(node, ast.Attribute) and node.attr in others:
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_no_store_module_is_over_600_lines() -> None:
    long = {
        p.name: n
        for p in (REPO / "store").glob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}

"""The shape of the tools/ tree, checked from the source (no mount, no store):
the benchmark stays out of the installed package and has no import cycle,
commands share code through common modules rather than importing each other,
no private name crosses a module boundary, and one module reads mountinfo."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
BENCH = TOOLS / "bench"
MAX_LINES = 600


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, level) of every import in `path`: `import a.b` gives
    ("a.b", [], 0), `from .x import y` gives ("x", ["y"], 1)."""
    out: list[tuple[str, list[str], int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", [a.name for a in node.names], node.level))
    return out


def packaged_files() -> list[str]:
    """The module files a wheel built from pyproject.toml holds, as setuptools'
    build_py finds them (the step of `pip wheel` that picks them)."""
    from setuptools import Distribution
    from setuptools.command.build_py import build_py

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dist = Distribution(
        {
            "packages": cfg["packages"],
            "package_dir": cfg["package-dir"],
            "script_name": "setup.py",
        }
    )
    cmd = build_py(dist)
    cmd.ensure_finalized()
    return [f for _pkg, _mod, f in cmd.find_all_modules()]


def assert_acyclic(graph: dict[str, set[str]]) -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_the_wheel_holds_no_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark drives borg, restic and fuse-overlayfs: it is a developer tool
    in tools/bench/, not part of what `pip install ferryfs` installs."""
    monkeypatch.chdir(REPO)  # package-dir paths are relative to the project
    files = packaged_files()
    assert "tools/cli.py" in files and "store/store.py" in files, files
    assert not [f for f in files if "bench" in f], files
    assert (BENCH / "run.py").is_file()
    assert not (BENCH / "__init__.py").exists()


def test_bench_modules_form_no_cycle() -> None:
    """Each section imports the common module (and the mounts module), the entry
    point imports the sections; nothing imports back up, so no re-import trick."""
    mods = {p.stem: p for p in BENCH.glob("*.py")}
    assert {"run", "bench_common", "bench_migrate", "bench_read", "bench_sweep"} <= set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        found = imports(path)
        assert not [m for m, _n, level in found if level], f"{name}: relative import"
        assert not [m for m, _n, _l in found if m.startswith("ferryfs.tools.bench")], name
        graph[name] = {m for m, _n, _l in found if m in mods}
    assert not any("run" in deps for deps in graph.values()), graph
    assert_acyclic(graph)


def tools_modules() -> list[Path]:
    return sorted(TOOLS.glob("*.py"))


def test_tools_modules_form_no_import_cycle() -> None:
    """Counting imports inside functions too: a lazy import that closes a cycle
    (cli -> mount_helper -> cli, once) is still a cycle."""
    names = {p.stem for p in tools_modules()}
    graph: dict[str, set[str]] = {}
    for path in tools_modules():
        deps: set[str] = set()
        for module, imported, level in imports(path):
            if level == 1 and not module:  # from . import x, y
                deps |= set(imported)
            elif level == 1:  # from .x import y
                deps.add(module.split(".")[0])
            elif module == "ferryfs.tools":
                deps |= set(imported)
            elif module.startswith("ferryfs.tools."):
                deps.add(module.split(".")[2])
        graph[path.stem] = (deps & names) - {path.stem}
    assert graph["cli"], "the parse found no imports at all"
    assert_acyclic(graph)


def test_commands_do_not_import_each_other() -> None:
    """What two commands share lives in a common module (_common.py, daemons.py,
    mounts.py), so a command's module can change without breaking another."""
    bad = []
    for path in tools_modules():
        if not path.stem.endswith("_cmd"):
            continue
        for module, names, level in imports(path):
            targets = [module] if module else names
            if level and any(t.endswith("_cmd") for t in targets):
                bad.append(f"{path.name}: from {'.' * level}{module} import {', '.join(names)}")
            if module.startswith("ferryfs.tools.") and module.endswith("_cmd"):
                bad.append(f"{path.name}: {module}")
    assert not bad, bad


def test_no_private_name_crosses_a_module_in_tools() -> None:
    bad = []
    for path in [*tools_modules(), *BENCH.glob("*.py")]:
        for module, names, level in imports(path):
            ours = level or module.startswith("ferryfs") or (BENCH / f"{module}.py").exists()
            private = [n for n in names if n.startswith("_") and n != "__future__"]
            if ours and private and module != "__future__":
                bad.append(f"{path.relative_to(REPO)}: from {module} import {', '.join(private)}")
    assert not bad, bad


def test_one_module_reads_mountinfo() -> None:
    """fs/ and tools/ parse the mount table through fs/mountinfo.py alone."""
    readers = [
        str(p.relative_to(REPO))
        for d in ("store", "fs", "tools")
        for p in sorted((REPO / d).rglob("*.py"))
        if "/proc/self/mountinfo" in p.read_text()
    ]
    assert readers == ["fs/mountinfo.py"], readers


def test_no_tools_module_is_over_600_lines() -> None:
    long = {
        str(p.relative_to(REPO)): n
        for p in [*tools_modules(), *BENCH.glob("*.py")]
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long

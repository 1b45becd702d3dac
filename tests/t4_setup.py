"""What a newcomer runs first: the Makefile's targets, the demo, and the CLI's start.

The demo runs end to end on a small tree (a real mount); the Makefile is checked
through `make -n`, which prints the recipes without running them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ferryfs.tools import cli
from helpers.mount import is_mounted, require_fuse

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# A pipe into a reader that may exit before its writer is done: under `set -o
# pipefail` the writer's SIGPIPE fails the whole pipeline (make's "Error 141").
EARLY_EXIT_READER = re.compile(r"(?<!\|)\|(?!\|)\s*(head\b|grep\s+(-\w*[qm]|--quiet|--max-count))")


def _script_lines(path: Path) -> list[str]:
    """Logical lines: backslash continuations joined, comments dropped."""
    text = path.read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def test_no_pipeline_in_demo_or_makefile_dies_of_sigpipe() -> None:
    for name in ("tools/demo.sh", "Makefile", ".ci/run"):
        for line in _script_lines(REPO / name):
            assert not EARLY_EXIT_READER.search(line), (
                f"{name}: a pipe into a reader that stops early fails under pipefail "
                f"(SIGPIPE, exit 141): {line.strip()}"
            )


def test_make_deps_installs_what_pyfuse3_builds_with() -> None:
    """pyfuse3 is compiled at `pip install`: it needs Python.h (python3-dev) and a
    C compiler, which a fresh Debian does not have."""
    r = subprocess.run(["make", "-n", "deps"], cwd=REPO, capture_output=True, text=True, check=True)
    for pkg in ("python3-dev", "python3-venv", "gcc", "libc6-dev", "libfuse3-dev"):
        assert re.search(rf"for p in [^;]*\b{re.escape(pkg)}\b", r.stdout), (
            f"make deps does not install {pkg}"
        )
    assert "Python.h" in r.stdout, "make deps does not check for the Python headers"


def test_make_help_says_clean_gives_a_fresh_demo() -> None:
    r = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, check=True)
    assert re.search(r"make clean .*fresh", r.stdout)


def _imported_commands(*argv: str) -> list[str]:
    """The ferryfs.tools.*_cmd modules that `ferryfs ARGV` imports."""
    code = (
        "import sys\n"
        "from ferryfs.tools import cli\n"
        "try:\n"
        f"    cli.main({list(argv)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('imported:', *sorted(m for m in sys.modules if m.endswith('_cmd')))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return r.stdout.rsplit("imported:", 1)[1].split()


def test_help_imports_no_command_module() -> None:
    assert _imported_commands("--help") == []


def test_a_command_imports_only_its_own_module(tmp_path: Path) -> None:
    assert _imported_commands("status", str(tmp_path), "--json") == ["ferryfs.tools.status_cmd"]
    # stats says "saved" the way status does, through tools/_common.py, not status_cmd
    assert _imported_commands("stats", "--help") == ["ferryfs.tools.stats_cmd"]


def test_help_lists_every_built_command() -> None:
    r = subprocess.run(
        [str(BIN / "ferryfs"), "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    for name, (module, _) in cli.COMMANDS.items():
        built = (REPO / "tools" / f"{module}.py").exists()
        assert (re.search(rf"^\s+{name}\s", r.stdout, re.M) is not None) == built, name


def test_demo_runs_and_shows_the_first_open_migrating(tmp_path: Path) -> None:
    """`make demo`'s script on a small tree: the first open's state goes from legacy
    to migrated, the tree is unchanged, and fsck finds nothing."""
    require_fuse()
    demo = tmp_path / "demo"
    env = {**os.environ, "BIN": str(BIN), "DEMO": str(demo), "SESSIONS": "20"}
    try:
        r = subprocess.run(
            ["bash", str(REPO / "tools/demo.sh")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    finally:
        if is_mounted(demo / "phase3"):  # the script's trap should have done it
            subprocess.run(["fusermount3", "-u", "-z", str(demo / "phase3")], check=False)
    out = r.stdout
    assert r.returncode == 0, f"demo exited {r.returncode}\n{out}\n{r.stderr}"
    assert "state before: legacy" in out
    assert re.search(r"state after:\s+migrated", out), out
    assert out.count("identical") == 2
    assert re.search(r"fsck done: 0 problems", out)
    # One vocabulary for the savings: "saved", in plan, status and stats alike.
    assert len(re.findall(r"^\s*saved\s", out, re.M)) >= 3, out
    assert "dedup+compression save" not in out and "savings" not in out


def test_bench_times_the_cli_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's `cli` section: whole-process time of `ferryfs --help` and
    `ferryfs status MNT --json`, median of several runs, against 0.1 s. (A figure,
    not a timed test: PASS or SHORT are both fine here.) The benchmark is not
    installed: its modules are found as `make bench` finds them, in tools/bench/."""
    require_fuse()
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools" / "bench"))
    import run
    from bench_cli import cli_section
    from ferryfs.tools.sampletree import generate

    assert run.parse_only("cli") == ["cli"]
    tree = tmp_path / "tree"
    generate(tree, 3, seed=2, attachment_mb=None)
    (tmp_path / "work").mkdir()
    lines = cli_section(tmp_path / "work", tree, quick=True)
    text = "\n".join(lines)
    for shown in ("ferryfs --help", "ferryfs status MNT --json"):
        assert re.search(rf"^\| {re.escape(shown)} +\| +\d+\.\d{{3}} \|", text, re.M), text
        assert re.search(rf"^- `{re.escape(shown)}` under 0.1 s: (PASS|SHORT)", text, re.M)
    assert not is_mounted(tmp_path / "work" / "cli-mnt")

"""Running the ferryfs CLI as another, unprivileged user (uid 65534) from root's tests.

The checkout and its .venv may live where that user cannot reach them (a clone
under /root, 0700), and an editable install points into the checkout. So the
first use builds, once per test session, a copy that any user may read: the
package's own folders laid out as `ferryfs/{fs,store,tools}` and the files of
every distribution ferryfs needs at run time, under a 0755 directory in /tmp.
The interpreter is one of the same version that any user may run.
"""

from __future__ import annotations

import atexit
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]

_site: Path | None = None


def _runtime_dists() -> set[str]:
    """ferryfs's run-time requirements, transitively (no extras)."""
    seen: set[str] = set()
    todo = ["ferryfs"]
    while todo:
        name = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional or platform-only requirement not installed here
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            m = re.match(r"[A-Za-z0-9_.\-]+", req)
            if m:
                todo.append(m.group(0))
    seen.discard("ferryfs")
    return seen


def shared_site() -> Path:
    """A directory any user may read that holds ferryfs and what it imports."""
    global _site
    if _site is not None:
        return _site
    home = Path(tempfile.mkdtemp(prefix="ferryfs-asuser-", dir="/tmp"))
    atexit.register(shutil.rmtree, home, True)
    site = home / "site"
    for part in ("fs", "store", "tools"):
        shutil.copytree(
            REPO / part, site / "ferryfs" / part, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in _runtime_dists():
        dist = md.distribution(name)
        for f in dist.files or []:
            src = Path(dist.locate_file(f))
            if f.parts[0].startswith("..") or not src.is_file():
                continue  # scripts outside site-packages
            dst = site / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for dirpath, dirs, files in os.walk(home):
        for n in dirs:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in files:
            os.chmod(os.path.join(dirpath, n), 0o644)
    home.chmod(0o755)
    _site = site
    return site


def python() -> str:
    """An interpreter of this one's version that any user may run: the one behind
    the venv (a venv's python links to it), or else the system's (this one may be
    a pyenv build under /root)."""
    real = Path(os.path.realpath(sys.executable))
    if all(os.stat(p).st_mode & 0o001 for p in (real, *real.parents)):
        return str(real)
    system = Path("/usr/bin") / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert system.exists(), f"no Python {sys.version_info[:2]} that another user may run"
    return str(system)


def run_as_nobody(
    argv: list[str | os.PathLike[str]],
    cwd: str | os.PathLike[str] = "/",
    home: str = "/nonexistent",
) -> subprocess.CompletedProcess[str]:
    """`ferryfs ARGV...` as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            python(),
            "-s",
            "-m",
            "ferryfs.tools.cli",
            *map(os.fspath, argv),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": str(shared_site()),
            "HOME": home,
        },
        cwd=cwd,
    )

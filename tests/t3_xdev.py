"""Another filesystem mounted inside SRC (proc, a tmpfs) is not crossed, as
`find -xdev` and `borg create --one-file-system`: the mount shows its mount
point as an empty directory and says so in its log, `plan` names it, and no
unreadable entry there ends a walk or the daemon.

Needs root (to mount proc and a tmpfs inside a scratch SRC) and FUSE.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ferryfs.store.phase3 import Phase3Tree
from helpers.mount import ferry, mounted, require_fuse, wait_for

FAST = ("--idle-ms", "50", "--max-load", "64", "--batch-delay-ms", "0")


@contextlib.contextmanager
def inner_mounts(src: Path) -> Iterator[None]:
    """proc on SRC/proc and a tmpfs holding a file on SRC/sessions/tmp; always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting proc and a tmpfs needs root")
    done: list[Path] = []
    try:
        for fstype, where in (("proc", src / "proc"), ("tmpfs", src / "sessions" / "tmp")):
            where.mkdir(parents=True, exist_ok=True)
            r = subprocess.run(
                [
                    "mount",
                    "-t",
                    fstype,
                    "-o",
                    "size=1m" if fstype == "tmpfs" else "defaults",
                    fstype,
                    str(where),
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                pytest.skip(f"cannot mount {fstype} here: {r.stderr.strip()}")
            done.append(where)
        (src / "sessions" / "tmp" / "secret.txt").write_bytes(b"on another filesystem")
        yield
    finally:
        for where in reversed(done):
            r = subprocess.run(["umount", str(where)], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)


def make_src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sessions").mkdir(parents=True)
    (src / "sessions" / "a.json").write_bytes(b'{"a": 1}\n' * 100)
    (src / "top.txt").write_bytes(b"top\n")
    return src


def test_a_filesystem_mounted_inside_src_is_shown_empty(tmp_path: Path) -> None:
    require_fuse()
    src = make_src(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with inner_mounts(src):
        # The rollback point's walk met /proc's unreadable entries: the daemon died
        # on a PermissionError and the mount answered ENOTCONN.
        with mounted(src, mnt, tmp_path / "store", args=FAST) as m:
            wait_for(lambda: m.status()["sweep_state"] == "done", 60, "the sweep to finish")
            assert sorted(os.listdir(mnt)) == ["proc", "sessions", "top.txt"]
            assert os.listdir(mnt / "proc") == []
            assert os.listdir(mnt / "sessions" / "tmp") == []
            assert (mnt / "sessions" / "a.json").read_bytes() == b'{"a": 1}\n' * 100
            s = m.status()
            assert s["files_total"] == 2 and s["files_migrated"] == 2
            assert s["errors"] == 0
            log = m.new_log()
            assert "not crossing into another filesystem mounted at b'proc'" in log
            assert "b'sessions/tmp'" in log
        r = ferry("points", "list", tmp_path / "store", "--json")
        assert r.returncode == 0, r.stderr
        assert "true" in r.stdout.lower()  # the point is complete
        # What happens inside the other filesystems is not the tree's drift.
        (src / "sessions" / "tmp" / "new.txt").write_bytes(b"x")
        r = ferry("points", "verify", tmp_path / "store")
        assert r.returncode == 0, r.stdout + r.stderr


def test_plan_does_not_cross_and_says_so(tmp_path: Path) -> None:
    src = make_src(tmp_path)
    with inner_mounts(src):
        r = ferry("plan", src, "--json", "--store", tmp_path / "store")
        assert r.returncode == 0, r.stderr
        p = json.loads(r.stdout)
        assert p["files"] == 2  # not /proc's thousands, not the tmpfs's file
        assert sorted(p["other_filesystems"]) == ["proc", "sessions/tmp"]
        text = ferry("plan", src, "--store", tmp_path / "store")
        assert text.returncode == 0
        assert "not crossed" in text.stdout and "proc" in text.stdout
        assert not (tmp_path / "store").exists()


def test_the_tree_lists_another_filesystem_as_empty(tmp_path: Path) -> None:
    src = make_src(tmp_path)
    with inner_mounts(src):
        tree = Phase3Tree.open(str(src))
        try:
            top = {e.name: e for e in tree.listdir(b"")}
            assert tree.other_fs(top[b"proc"].st)
            assert not tree.other_fs(top[b"sessions"].st)
            assert list(tree.listdir(b"proc")) == []
            assert list(tree.listdir(b"sessions/tmp")) == []
        finally:
            tree.close()

"""`ferryfs mount` and `migrate` refuse unsafe layouts and busy sources, with one
line and the documented exit code, writing nothing where they refused:

- a mountpoint inside SRC (the daemon would read its own mount and hang), or one
  that contains SRC; a store inside SRC or inside the mountpoint; a SRC that is,
  or lies inside, a live ferryfs mount: exit 2, whatever the spelling of the
  paths (symlinks, `..`);
- an in-place mount while a process has a file open, its cwd or a mapping under
  SRC (it would keep using the hidden Phase 3 copy): exit 1 naming the process,
  unless `--force`;
- a user who cannot mount sees libfuse's reason, not "fuse_session_mount failed".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.asuser import run_as_nobody
from helpers.mount import ferry, is_mounted, mounted, require_fuse, wait_for


def tiny(tmp_path: Path) -> Path:
    src = tmp_path / "phase3"
    (src / "sessions").mkdir(parents=True)
    (src / "sessions" / "a.jsonl").write_text('{"n": 1}\n')
    (src / "index.json").write_text("{}\n")
    return src


@pytest.fixture
def unmount_after() -> Iterator[list[Path]]:
    """Paths to unmount at the end whatever happened: a command that should have been
    refused (on the old code, say) must not leave a mount behind. Its daemon exits by
    itself once the lazy unmount ends the FUSE connection."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        if is_mounted(p):
            subprocess.run(["fusermount3", "-u", "-z", str(p)], capture_output=True, timeout=30)
            wait_for(lambda p=p: not is_mounted(p), 30, f"{p} to be unmounted")


def refused(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, f"exit {r.returncode}, want {code}: {r.stdout}{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferryfs: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"


# -- layouts -------------------------------------------------------------------------


def linked_tree(tmp_path: Path, unmount_after: list[Path], watch: Path) -> Path:
    """A tiny SRC with a symlink `link` to it beside, for spelling paths through it;
    `watch` is unmounted at the end should a refusal fail to happen."""
    src = tiny(tmp_path)
    unmount_after.append(watch)
    (tmp_path / "link").symlink_to(src)
    return src


@pytest.mark.parametrize("spelling", ["plain", "symlink", "dotdot"])
def test_mountpoint_inside_src_is_refused_however_spelled(
    tmp_path: Path, spelling: str, unmount_after: list[Path]
) -> None:
    src = linked_tree(tmp_path, unmount_after, tmp_path / "phase3" / "inner")
    (src / "inner").mkdir()
    mnt = {
        "plain": src / "inner",
        "symlink": tmp_path / "link" / "inner",
        "dotdot": tmp_path / "elsewhere" / ".." / "phase3" / "inner",
    }[spelling]
    (tmp_path / "elsewhere").mkdir()
    store = tmp_path / "store"
    r = ferry("mount", src, mnt, "--store", store)
    refused(r, 2, "inside the source")
    assert not store.exists(), "a refused mount created its store"
    assert not is_mounted(src / "inner")


def test_mountpoint_containing_src_is_refused(tmp_path: Path, unmount_after: list[Path]) -> None:
    src = tiny(tmp_path)
    unmount_after.append(tmp_path)
    store = tmp_path.parent / f"{tmp_path.name}-store"
    try:
        refused(ferry("mount", src, tmp_path, "--store", store), 2, "contains the source")
        assert not store.exists()
    finally:
        shutil.rmtree(store, ignore_errors=True)


@pytest.mark.parametrize("spelling", ["plain", "symlink", "is-src"])
def test_store_inside_src_is_refused_by_mount_and_migrate(
    tmp_path: Path, spelling: str, unmount_after: list[Path]
) -> None:
    src = linked_tree(tmp_path, unmount_after, tmp_path / "mnt")
    store = {
        "plain": src / ".ferry",
        "symlink": tmp_path / "link" / "store",
        "is-src": tmp_path / "link",
    }[spelling]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = sorted(os.listdir(src))
    refused(ferry("mount", src, mnt, "--store", store), 2, "inside the source")
    refused(ferry("migrate", src, "--store", store), 2, "inside the source")
    assert sorted(os.listdir(src)) == before, "a refused command wrote into SRC"
    assert not is_mounted(mnt)


def test_store_inside_the_mountpoint_is_refused(tmp_path: Path, unmount_after: list[Path]) -> None:
    src = tiny(tmp_path)
    unmount_after.append(tmp_path / "mnt")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    refused(ferry("mount", src, mnt, "--store", mnt / "store"), 2, "inside the mountpoint")
    assert os.listdir(mnt) == []


def test_the_default_store_beside_src_and_mnt_equal_src_through_a_symlink_are_fine(
    tmp_path: Path, unmount_after: list[Path]
) -> None:
    require_fuse()
    src = tiny(tmp_path)
    (tmp_path / "link").symlink_to(src)
    unmount_after.append(src)
    r = ferry("mount", src, tmp_path / "link", "--no-sweep")  # in place, spelled another way
    assert r.returncode == 0, r.stderr
    assert is_mounted(src)
    assert (tmp_path / "phase3.ferry" / "daemon.log").exists()
    assert os.getxattr(src, "user.ferryfs.status")
    r = ferry("umount", tmp_path / "link")
    assert r.returncode == 0, r.stderr
    assert not is_mounted(src)


def test_a_ferryfs_mount_as_src_is_refused_by_mount_and_migrate(
    tmp_path: Path, unmount_after: list[Path]
) -> None:
    src = tiny(tmp_path)
    unmount_after.append(tmp_path / "other")
    first = tmp_path / "first"
    first.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    with mounted(src, first, tmp_path / "store1"):
        for given in (first, first / "sessions"):
            store = tmp_path / "store2"
            refused(ferry("mount", given, other, "--store", store), 2, "ferryfs mount")
            refused(ferry("migrate", given, "--store", store), 2, "ferryfs mount")
            assert not store.exists()
            assert not is_mounted(other)


# -- an in-place mount over files in use -----------------------------------------------


@contextlib.contextmanager
def app(code: str, cwd: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """A process that runs `code`, prints "ready" and waits for stdin to close."""
    p = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield p
    finally:
        p.kill()  # the process this test started, by its handle
        p.wait(timeout=30)


@pytest.mark.parametrize("use", ["fd", "cwd", "mmap"])
def test_in_place_mount_refuses_while_a_process_uses_files_under_src(
    tmp_path: Path, use: str, unmount_after: list[Path]
) -> None:
    require_fuse()
    src = tiny(tmp_path)
    f = src / "sessions" / "a.jsonl"
    code = {
        "fd": f"f = open({str(f)!r}, 'a')",
        "cwd": "",
        # The fd is closed: only the mapping keeps the file.
        "mmap": f"import mmap\nf = open({str(f)!r}, 'r+b')\n"
        "m = mmap.mmap(f.fileno(), 0)\nf.close()",
    }[use]
    store = tmp_path / "store"
    unmount_after.append(src)
    with app(code, cwd=src / "sessions" if use == "cwd" else None) as p:
        r = ferry("mount", src, src, "--store", store)
        refused(r, 1, f"pid {p.pid}", str(src))
        assert not is_mounted(src) and not store.exists()
        # --force mounts anyway (the operator's call).
        with mounted(src, src, store, args=("--no-sweep", "--force")) as m:
            assert (m.mnt / "index.json").read_text() == "{}\n"


def test_mount_beside_src_does_not_care_about_processes_in_src(tmp_path: Path) -> None:
    src = tiny(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with app("", cwd=src), mounted(src, mnt) as m:
        assert (m.mnt / "index.json").read_text() == "{}\n"


# -- a user who may not mount ------------------------------------------------------


def test_a_user_who_may_not_mount_is_told_libfuses_reason(tmp_path: Path) -> None:
    """As nobody: where /dev/fuse is 0600 root (as here) libfuse cannot open it; where
    it is open to all, fusermount3 refuses a mountpoint nobody may not write. Either
    way the one line gives that reason, not pyfuse3's "fuse_session_mount failed"."""
    require_fuse()
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run as another user")
    dev_fuse_closed = os.stat("/dev/fuse").st_mode & 0o006 != 0o006
    home = Path(tempfile.mkdtemp(prefix="ferryfs-nobody-"))
    try:
        work = home / "work"
        (work / "src").mkdir(parents=True)
        (work / "src" / "a").write_text("hi\n")
        (work / "mnt").mkdir()  # root's: nobody may not write it
        for p in (home, work / "src", work / "src" / "a", work / "mnt"):
            p.chmod(0o755)
        os.chown(work, 65534, 65534)
        r = run_as_nobody(["mount", "src", "mnt", "--store", "st"], cwd=work, home=str(work))
        if dev_fuse_closed:
            refused(r, 1, "/dev/fuse", "Permission denied")
        else:
            refused(r, 1, "mountpoint")
        assert "fuse_session_mount failed" not in r.stderr
        assert not is_mounted(work / "mnt")
    finally:
        mnt = home / "work" / "mnt"
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            wait_for(lambda: not is_mounted(mnt), 30, "the mount to go")
        shutil.rmtree(home, ignore_errors=True)

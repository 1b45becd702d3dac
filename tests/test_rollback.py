"""Rollback on a live mount: refuse with changes unless told, export or discard
them, show the Phase 3 tree read-only in the mount's place, `umount` it, and
mount again to return to Phase 4. Also the unprivileged read-only passthrough
mount on its own."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ferryfs.tools import rollbacks
from ferryfs.tools.mounts import fs_type
from mountutil import diff_r, ferry, mounted, require_fuse, snapshot, snapshot_diff, wait_for


@contextlib.contextmanager
def phase3_copy(sample_tree, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private copy of the sample tree (rollback mounts over it), and cleanup of
    any read-only mount a test leaves there."""
    src = tmp_path / "phase3"
    shutil.copytree(sample_tree.root, src, symlinks=True)
    try:
        yield src
    finally:
        if fs_type(str(src)) not in (None, "fuse.ferryfs") and rollbacks.lookup(str(src)):
            subprocess.run(["umount", str(src)], check=False)
            rollbacks.forget(str(src))


def readonly_shown(src: Path, reference: Path) -> None:
    """`src` shows the Phase 3 tree read-only: same files, and writes get EROFS."""
    assert fs_type(str(src)) not in (None, "fuse.ferryfs")
    diff_r(reference, src)
    with pytest.raises(OSError) as e:
        (src / "new-file").write_text("x")
    assert e.value.errno == errno.EROFS


def test_rollback_without_changes_then_mount_again(sample_tree, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the bind-mount path needs root; the passthrough is tested below")
    with phase3_copy(sample_tree, tmp_path) as src:
        before = snapshot(src)
        with mounted(src) as m:
            first = next(p for p in src.rglob("*.jsonl"))
            first.read_bytes()
            wait_for(lambda: m.state(first) == "migrated", 30, "first-open migration")
            r = ferry("rollback", src, "--yes")
            assert r.returncode == 0, r.stderr
            m.pid = None  # rollback stopped the daemon itself
            readonly_shown(src, sample_tree.root)
            assert snapshot_diff(before, snapshot(src)) == []
            r = ferry("umount", src)
            assert r.returncode == 0, r.stderr
            assert fs_type(str(src)) is None or not os.path.ismount(src)
            m.start()  # Phase 4 again: the store kept what it had migrated
            assert m.state(first) == "migrated"
        assert snapshot_diff(before, snapshot(src)) == []


def test_rollback_refuses_changes_then_exports_them(sample_tree, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the bind-mount path needs root")
    export = tmp_path / "export"
    with phase3_copy(sample_tree, tmp_path) as src:
        before = snapshot(src)
        with mounted(src) as m:
            (src / "sessions" / "new.jsonl").write_bytes(b'{"role": "user"}\n')
            log = next(p for p in sorted(src.rglob("*.jsonl")) if p.name != "new.jsonl")
            grown = log.read_bytes() + b'{"role": "assistant", "content": "more"}\n'
            log.write_bytes(grown)
            gone = next(p for p in sorted((src / "attachments").rglob("*")) if p.is_file())
            gone.unlink()

            r = ferry("rollback", src, "--yes")
            assert r.returncode == 1
            assert "--export-changes" in r.stderr and "Traceback" not in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
            assert fs_type(str(src)) == "fuse.ferryfs", "a refused rollback must change nothing"

            r = ferry("rollback", src, "--yes", "--export-changes", export)
            assert r.returncode == 0, r.stderr
            m.pid = None
        readonly_shown(src, sample_tree.root)
        assert snapshot_diff(before, snapshot(src)) == []
        assert (export / "sessions" / "new.jsonl").read_bytes() == b'{"role": "user"}\n'
        assert (export / log.relative_to(src)).read_bytes() == grown
        deleted = (export / ".ferryfs-deleted").read_bytes().splitlines()
        assert os.fsencode(gone.relative_to(src)) in deleted
        assert ferry("umount", src).returncode == 0


def test_rollback_discard_changes(sample_tree, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the bind-mount path needs root")
    with phase3_copy(sample_tree, tmp_path) as src, mounted(src) as m:
        (src / "scratch.txt").write_text("lost on purpose")
        r = ferry("rollback", src, "--yes", "--discard-changes")
        assert r.returncode == 0, r.stderr
        m.pid = None
        readonly_shown(src, sample_tree.root)
        assert not (src / "scratch.txt").exists()
        assert ferry("umount", src).returncode == 0


def test_readonly_passthrough_mount(sample_tree, tmp_path: Path) -> None:
    """The mount rollback uses without root: same bytes, EROFS, links not followed."""
    require_fuse()
    src = tmp_path / "phase3"
    shutil.copytree(sample_tree.root, src, symlinks=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the tree")
    (src / "escape").symlink_to(secret)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    from ferryfs.tools.mount_cmd import spawn_daemon

    pid = spawn_daemon(
        [sys.executable, "-m", "ferryfs.fs.passthrough", str(src), str(mnt)],
        str(tmp_path / "ro.log"),
    )
    try:
        assert fs_type(str(mnt)) == "fuse.ferryfs-ro"
        diff_r(src, mnt)
        assert os.readlink(mnt / "escape") == str(secret)
        assert (mnt / "escape").is_symlink()
        with pytest.raises(OSError) as e:
            (mnt / "x").write_text("no")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            next(p for p in mnt.rglob("*.json")).write_text("no")
        assert e.value.errno == errno.EROFS
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)

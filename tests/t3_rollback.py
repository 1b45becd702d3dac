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
import tempfile
from pathlib import Path

import pytest
from ferryfs.tools import rollbacks
from ferryfs.tools.mounts import fs_type
from helpers.mount import (
    diff_r,
    ferry,
    mounted,
    require_fuse,
    snapshot,
    snapshot_diff,
    undo_rollback_mount,
    wait_for,
)
from helpers.store import make_chain


@contextlib.contextmanager
def phase3_copy(sample_tree, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private copy of the sample tree (rollback mounts over it), and cleanup of
    any read-only mount a test leaves there."""
    src = tmp_path / "phase3"
    shutil.copytree(sample_tree.root, src, symlinks=True)
    try:
        yield src
    finally:
        undo_rollback_mount(src)


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
    """--discard-changes rolls back without exporting: the help, the output line and
    the behaviour agree that the changes stay in the store and come back at the next
    mount (the store is kept)."""
    if os.geteuid() != 0:
        pytest.skip("the bind-mount path needs root")
    help_text = " ".join(ferry("rollback", "--help").stdout.split())
    assert "stay in the store" in help_text and "come back at the next" in help_text
    with phase3_copy(sample_tree, tmp_path) as src, mounted(src) as m:
        (src / "scratch.txt").write_text("kept in the store")
        r = ferry("rollback", src, "--yes", "--discard-changes")
        assert r.returncode == 0, r.stderr
        assert len(r.stdout.strip().splitlines()) == 1
        assert "1 changes not exported stay in the store" in r.stdout, r.stdout
        assert "come back at the next `ferryfs mount`" in r.stdout
        m.pid = None
        readonly_shown(src, sample_tree.root)
        assert not (src / "scratch.txt").exists()
        assert ferry("umount", src).returncode == 0
        m.start()
        assert (src / "scratch.txt").read_text() == "kept in the store"


def test_rollback_of_a_tree_1500_directories_deep(tmp_path: Path) -> None:
    """The change walk and the export are iterative: a tree deeper than Python's
    recursion limit rolls back, and the file made at the bottom is exported."""
    if os.geteuid() != 0:
        pytest.skip("the bind-mount path needs root")
    src, export = tmp_path / "phase3", tmp_path / "export"
    src.mkdir()
    parts = make_chain(src, 1500)
    deep = os.path.join(os.fsencode(src), *parts)
    try:
        with mounted(src) as m:
            with open(os.path.join(deep, b"bottom.txt"), "wb") as f:
                f.write(b"at the bottom")
            r = ferry("rollback", src, "--yes", "--export-changes", export)
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
            m.pid = None
        got = os.path.join(os.fsencode(export), *parts, b"bottom.txt")
        with open(got, "rb") as f:
            assert f.read() == b"at the bottom"
        assert ferry("umount", src).returncode == 0
    finally:
        if fs_type(str(src)) not in (None, "fuse.ferryfs"):
            subprocess.run(["umount", str(src)], check=False)
            rollbacks.forget(str(src))
        # shutil.rmtree recurses; GNU rm does not mind the depth.
        subprocess.run(["rm", "-rf", "--one-file-system", str(src), str(export)], check=False)


def test_umount_after_a_rollback_that_never_mounted(tmp_path: Path) -> None:
    """A rollback killed between its record and its read-only mount: `umount` removes
    the stale record (exit 0), and `mount` is not blocked by it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rollbacks.record(str(mnt), str(tmp_path / "src"), str(tmp_path / "store"))
    try:
        r = ferry("umount", mnt)
        assert r.returncode == 0, r.stderr
        assert "rollback record is removed" in r.stdout
        assert rollbacks.lookup(str(mnt)) is None
    finally:
        rollbacks.forget(str(mnt))


@contextlib.contextmanager
def passthrough(src: Path, mnt: Path, log: Path, *extra: str):  # type: ignore[no-untyped-def]
    """The read-only passthrough mount of `src` on `mnt`, unmounted and stopped after."""
    require_fuse()
    from ferryfs.tools.mount_cmd import spawn_daemon

    mnt.mkdir(exist_ok=True)
    pid = spawn_daemon(
        [sys.executable, "-m", "ferryfs.fs.passthrough", str(src), str(mnt), *extra], str(log)
    )
    try:
        yield pid
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)


def test_readonly_passthrough_lists_dot_and_dotdot(sample_tree, tmp_path: Path) -> None:
    """`ls -a` of the read-only tree is the same as of Phase 3, "." and ".." included."""
    src = sample_tree.root
    with passthrough(src, tmp_path / "ro", tmp_path / "ro.log"):
        for rel in (".", "sessions", "attachments"):
            a = subprocess.run(["ls", "-a", src / rel], capture_output=True, text=True).stdout
            b = subprocess.run(
                ["ls", "-a", tmp_path / "ro" / rel], capture_output=True, text=True
            ).stdout
            assert a.splitlines()[:2] == [".", ".."]
            assert a == b
        assert (
            os.stat(tmp_path / "ro" / "sessions" / "..").st_ino == os.stat(tmp_path / "ro").st_ino
        )


def test_readonly_passthrough_keeps_allow_other(tmp_path: Path) -> None:
    """A rollback of an `-o allow_other` mount passes it on: the passthrough mount
    answers another uid (65534) instead of EACCES."""
    if os.geteuid() != 0:
        pytest.skip("switches to uid 65534")
    base = Path(tempfile.mkdtemp(prefix="ferryfs-ro-", dir="/tmp"))
    try:
        base.chmod(0o755)
        src = base / "phase3"
        src.mkdir()
        (src / "f.txt").write_text("for everyone\n")
        with passthrough(src, base / "ro", base / "ro.log", "--allow-other"):
            r = subprocess.run(
                [
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "cat",
                    str(base / "ro" / "f.txt"),
                ],
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0 and r.stdout == "for everyone\n", r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_rollback_reads_allow_other_from_the_mount(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """rollback sees `allow_other` on a live mount and asks the passthrough for it."""
    from ferryfs.tools import rollback_cmd

    src = tmp_path / "phase3"
    src.mkdir()
    (src / "f.txt").write_text("x")
    with mounted(src, args=("--no-sweep", "-o", "allow_other")):
        assert "allow_other" in rollback_cmd.mount_options(str(src))
    with mounted(src, args=("--no-sweep",)):
        assert "allow_other" not in rollback_cmd.mount_options(str(src))
    seen: list[list[str]] = []
    monkeypatch.setattr(rollback_cmd.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(rollback_cmd, "spawn_daemon", lambda cmd, log: seen.append(cmd) or 1)
    rollback_cmd.show_readonly(str(src), str(src), str(tmp_path), allow_other=True)
    assert seen and seen[0][-1] == "--allow-other"


def test_errmap_without_on_corrupt_answers_eio() -> None:
    """A CorruptChunk in a handler of an Operations with no failsafe hook (the
    read-only tree) is EIO, not an AttributeError out of the table."""
    import pyfuse3
    import trio
    from ferryfs.fs.errmap import fuse_errors
    from ferryfs.store.errors import CorruptChunk

    class NoHook:
        @fuse_errors
        async def read(self, fh: int) -> bytes:
            raise CorruptChunk(b"\1" * 32)

    with pytest.raises(pyfuse3.FUSEError) as e:
        trio.run(NoHook().read, 1)
    assert e.value.errno == errno.EIO


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


def test_rollback_refuses_while_an_app_holds_a_file_open(sample_tree, tmp_path: Path) -> None:
    """As umount does: an app with a file open on the mount would lose it."""
    if os.geteuid() != 0:
        pytest.skip("the bind-mount path needs root")
    with phase3_copy(sample_tree, tmp_path) as src, mounted(src) as m:
        held = next(p for p in sorted(src.rglob("*.jsonl")))
        app = subprocess.Popen(
            [sys.executable, "-c", "import sys,time; f=open(sys.argv[1]); sys.stdin.read()", held],
            stdin=subprocess.PIPE,
        )
        try:
            wait_for(
                lambda: any(
                    os.path.realpath(f"/proc/{app.pid}/fd/{fd}") == str(held)
                    for fd in os.listdir(f"/proc/{app.pid}/fd")
                ),
                10,
                "the app to open its file",
            )
            r = ferry("rollback", src, "--yes")
            assert r.returncode == 1, r.stderr
            assert "busy" in r.stderr and str(app.pid) in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
            assert fs_type(str(src)) == "fuse.ferryfs", "a refused rollback changes nothing"
        finally:
            app.communicate(b"")
        r = ferry("rollback", src, "--yes")
        assert r.returncode == 0, r.stderr
        m.pid = None
        assert ferry("umount", src).returncode == 0

"""What root does on behalf of other users at `rollback --export-changes`: files
another user (uid 65534) wrote through an `allow_other` mount are exported with
their owner and mode but never setuid/setgid; no link someone planted is
followed; DIR must be new (or empty and the caller's) and outside the mount,
Phase 3 and the store, or the rollback refuses before unmounting anything.
Also: a sparse file exports sparse, and the rollback record is kept where only
its owner writes."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ferryfs.store import content
from ferryfs.store.changes import find_changes
from ferryfs.store.export import export_changes, open_dest
from ferryfs.store.phase3 import Phase3Tree
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store
from ferryfs.tools import rollbacks
from ferryfs.tools.mounts import fs_type
from helpers.mount import ferry, mounted, undo_rollback_mount

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acts as two users: needs root")


@contextlib.contextmanager
def shared_tree() -> Iterator[Path]:
    """A scratch directory uid 65534 can reach (pytest's tmp_path is 0700 root):
    phase3/ with a file, and drop/ owned by 65534, where that user writes.
    Any read-only mount a rollback leaves on phase3 is removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="ferryfs-xsafe-", dir="/tmp"))
    base.chmod(0o755)
    src = base / "phase3"
    (src / "drop").mkdir(parents=True)
    (src / "keep.txt").write_text("phase 3\n")
    os.chown(src / "drop", NOBODY, NOBODY)
    try:
        yield base
    finally:
        undo_rollback_mount(src)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def as_nobody(code: str, *argv: str | os.PathLike[str]) -> None:
    """Run Python `code` as uid/gid 65534 with no groups; fail the test if it fails."""
    r = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
            *map(os.fspath, argv),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"as uid {NOBODY}: {r.stderr}"


WRITE_SETUID_TOOL = """
import os, sys
p = sys.argv[1]
with open(p, "w") as f:
    f.write("#!/bin/sh\\nid\\n")
os.chmod(p, 0o4755)
"""


def refused_before_unmount(r: subprocess.CompletedProcess[str], src: Path) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert fs_type(str(src)) == "fuse.ferryfs", "a refused rollback must leave the mount up"


def test_export_into_another_users_dir_with_planted_link_is_refused() -> None:
    """Item 3: DIR owned by another user who planted DIR/drop -> a directory of
    root's: root must not write the exported file through that link."""
    with shared_tree() as base:
        src, victim, dest = base / "phase3", base / "victim", base / "export"
        victim.mkdir(mode=0o700)
        dest.mkdir()
        os.chown(dest, NOBODY, NOBODY)
        with mounted(src, args=("--no-sweep", "-o", "allow_other")):
            as_nobody(WRITE_SETUID_TOOL, src / "drop" / "tool")
            as_nobody("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", victim, dest / "drop")
            r = ferry("rollback", src, "--yes", "--export-changes", dest)
            refused_before_unmount(r, src)
            assert "--export-changes" in r.stderr
        assert list(victim.iterdir()) == []


def test_export_keeps_owner_and_mode_strips_setuid() -> None:
    """Items 3 and 4: the file uid 65534 wrote is exported owned by 65534 (not root),
    mode 0755 instead of 4755, listed as changed; DIR is made by the export, 0700."""
    with shared_tree() as base:
        src, dest = base / "phase3", base / "export"
        with mounted(src, args=("--no-sweep", "-o", "allow_other")) as m:
            as_nobody(WRITE_SETUID_TOOL, src / "drop" / "tool")
            assert os.stat(src / "drop" / "tool").st_mode & stat.S_ISUID
            r = ferry("rollback", src, "--yes", "--export-changes", dest)
            assert r.returncode == 0, r.stderr
            m.pid = None  # rollback stopped the daemon itself
        out = os.lstat(dest / "drop" / "tool")
        assert (out.st_uid, out.st_gid) == (NOBODY, NOBODY)
        assert stat.S_IMODE(out.st_mode) == 0o755
        assert (dest / "drop" / "tool").read_text() == "#!/bin/sh\nid\n"
        drop = os.lstat(dest / "drop")
        assert (drop.st_uid, stat.S_IMODE(drop.st_mode)) == (NOBODY, 0o755)
        assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o700
        assert "setuid/setgid removed from 1 files" in r.stdout
        assert (dest / ".ferryfs-modes").read_bytes() == b"4755 0755 drop/tool\n"
        assert ferry("umount", src).returncode == 0


def test_export_refuses_a_non_empty_dir() -> None:
    """Item 7: an existing non-empty DIR is refused, its files untouched."""
    with shared_tree() as base:
        src, dest = base / "phase3", base / "export"
        dest.mkdir()
        (dest / "drop").mkdir()
        (dest / "drop" / "tool").write_text("mine")
        with mounted(src, args=("--no-sweep",)):
            (src / "drop" / "tool").write_text("from the mount")
            r = ferry("rollback", src, "--yes", "--export-changes", dest)
            refused_before_unmount(r, src)
            assert "not empty" in r.stderr
        assert (dest / "drop" / "tool").read_text() == "mine"


def test_export_refuses_a_dir_through_a_symlink_into_the_mount() -> None:
    """Item 7: DIR reached through a symlink into the mount would land in the store."""
    with shared_tree() as base:
        src = base / "phase3"
        (base / "link").symlink_to(src / "drop")
        with mounted(src, args=("--no-sweep",)):
            (src / "new.txt").write_text("new")
            r = ferry("rollback", src, "--yes", "--export-changes", base / "link" / "out")
            refused_before_unmount(r, src)
            assert not (src / "drop" / "out").exists()
            r = ferry("rollback", src, "--yes", "--export-changes", base / "link")
            refused_before_unmount(r, src)


def test_export_refuses_a_dir_inside_phase3() -> None:
    """Item 7: with the mount elsewhere, DIR inside the Phase 3 tree is refused:
    ferryfs never writes there."""
    with shared_tree() as base:
        src, mnt = base / "phase3", base / "mnt"
        mnt.mkdir()
        with mounted(src, mnt, args=("--no-sweep",)):
            (mnt / "new.txt").write_text("new")
            r = ferry("rollback", mnt, "--yes", "--export-changes", src / "exported")
            assert r.returncode == 2, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and "Phase 3" in r.stderr
            assert fs_type(str(mnt)) == "fuse.ferryfs"
        assert not (src / "exported").exists()


def test_export_of_a_64_gib_hole_streams_and_stays_sparse() -> None:
    """Item 6 (export side): a file grown by a 64 GiB hole exports as a sparse file,
    with no MemoryError and without writing the zeros."""
    size = 64 << 30
    with shared_tree() as base:
        src, dest = base / "phase3", base / "export"
        with mounted(src, args=("--no-sweep",)) as m:
            with open(src / "big.bin", "wb") as f:
                f.write(b"head")
                f.truncate(size)
            r = ferry("rollback", src, "--yes", "--export-changes", dest, timeout=600)
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
            m.pid = None
        out = dest / "big.bin"
        st = os.stat(out)
        assert st.st_size == size
        assert st.st_blocks * 512 < 16 << 20, f"{st.st_blocks * 512} bytes allocated"
        with open(out, "rb") as f:
            assert f.read(4) == b"head"
            f.seek(size // 2)
            assert f.read(4096) == bytes(4096)
            f.seek(size - 4096)
            assert f.read() == bytes(4096)
        assert ferry("umount", src).returncode == 0


def _in_child(uid: int, env: dict[str, str], fn: Callable[[], None]) -> str:
    """Run `fn` in a forked child as `uid` with `env`; '' or the child's traceback."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.environ.clear()
            os.environ.update(env)
            fn()
        except BaseException:
            os.write(w, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_rollback_record_never_follows_a_planted_link(tmp_path: Path) -> None:
    """Item 5: a non-root user whose XDG_RUNTIME_DIR is a shared directory where
    another user planted ferryfs/rollbacks.tmp -> the victim's file: recording a
    rollback must not overwrite that file, and lookup must still find the record."""
    base = Path(tempfile.mkdtemp(prefix="ferryfs-xsafe-rec-", dir="/tmp"))
    try:
        base.chmod(0o755)
        shared = base / "shared"
        shared.mkdir(mode=0o1777)
        shared.chmod(0o1777)
        home = base / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        precious = home / "precious"
        precious.write_text("the victim's data\n")
        os.chown(precious, NOBODY, NOBODY)
        planted = shared / "ferryfs"  # made by "another user" (root here)
        planted.mkdir(mode=0o777)
        planted.chmod(0o777)
        (planted / "rollbacks.tmp").symlink_to(precious)
        env = {"XDG_RUNTIME_DIR": str(shared), "HOME": str(home)}

        def record_and_find() -> None:
            rollbacks.record("/some/mnt", "/some/src", "/some/store")
            assert rollbacks.lookup("/some/mnt") == ["/some/mnt", "/some/src", "/some/store"]
            where = rollbacks.place()
            assert where is not None and where.startswith(str(home)), where

        err = _in_child(NOBODY, env, record_and_find)
        assert precious.read_text() == "the victim's data\n"
        assert err == "", err
        d = home / ".local" / "state" / "ferryfs"
        assert stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == NOBODY
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_rollback_record_refuses_a_directory_another_user_made(tmp_path: Path) -> None:
    """Item 5: the record's directory made first by someone else is refused with
    one clear error (RecordUnsafe, exit 2), not used."""
    base = Path(tempfile.mkdtemp(prefix="ferryfs-xsafe-rec-", dir="/tmp"))
    try:
        base.chmod(0o755)
        home = base / "home"
        (home / ".local" / "state" / "ferryfs").mkdir(parents=True)
        os.chown(home, NOBODY, NOBODY)
        (home / ".local" / "state" / "ferryfs").chmod(0o777)  # root's, writable by all

        def record() -> None:
            try:
                rollbacks.check()
            except rollbacks.RecordUnsafe as e:
                assert e.exit_code == 2 and "remove it" in str(e), str(e)
                return
            raise AssertionError("an unsafe record directory was accepted")

        err = _in_child(NOBODY, {"HOME": str(home)}, record)
        assert err == "", err
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _store_with_changes(tmp_path: Path) -> tuple[Store, Phase3Tree]:
    """A store of a small Phase 3 tree with new files under sub/: a 3 MiB one and
    one that is 4 bytes then a 1 GiB hole."""
    src = tmp_path / "phase3"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "old.txt").write_text("old")
    tree = Phase3Tree.open(str(src))
    store = Store.open(str(tmp_path / "store"), source=str(src), create=True, tree=tree)
    sub = store.lookup(ROOT_INO, b"sub")
    big = store.create(sub.ino, b"big.bin", 0o644, 0, 0)
    store.write(big.ino, 0, os.urandom(3 << 20))
    holey = store.create(sub.ino, b"holey.bin", 0o644, 0, 0)
    store.write(holey.ino, 0, b"head")
    store.truncate(holey.ino, 1 << 30)
    return store, tree


def test_export_never_follows_a_link_below_dest(tmp_path: Path) -> None:
    """Below DEST every component is opened with O_NOFOLLOW: a symlink standing where
    the export makes a directory fails the export; nothing lands at its target."""
    store, tree = _store_with_changes(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    (dest / "sub").symlink_to(target)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as e:
            export_changes(store, tree, find_changes(store, tree), fd)
        assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)
    finally:
        os.close(fd)
        store.close()
        tree.close()
    assert list(target.iterdir()) == []


def test_export_reads_in_bounded_pieces_and_keeps_holes(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every store read of an export is at most 1 MiB; a hole is seeked over."""
    store, tree = _store_with_changes(tmp_path)
    sizes: list[int] = []
    real_read = content.read

    def counting(txn, ino, size, off, n, cache):  # type: ignore[no-untyped-def]
        sizes.append(n)
        return real_read(txn, ino, size, off, n, cache)

    monkeypatch.setattr(content, "read", counting)
    dest = tmp_path / "dest"
    fd = open_dest(str(dest), [])
    try:
        done = export_changes(store, tree, find_changes(store, tree), fd)
        assert done.entries == 2
    finally:
        os.close(fd)
        store.close()
        tree.close()
    assert sizes and max(sizes) <= 1 << 20, max(sizes)
    st = os.stat(dest / "sub" / "holey.bin")
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20
    assert (dest / "sub" / "big.bin").stat().st_size == 3 << 20

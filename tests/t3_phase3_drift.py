"""A Phase 3 file changed underneath the mount (it is supposed to be frozen).

Detected by its stat (size, mtime, ctime, inode) at open, at each read served
from Phase 3 (before and after it, on the fd opened at open time) and at
migration; never served as a mix of old and new bytes. The file then stays
LEGACY with an error in status (its opens and reads get EIO; stat keeps showing
the entry the mount imported), and `points verify` reports the drift.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from ferryfs.store.errors import SourceError
from ferryfs.store.phase3 import Phase3File
from ferryfs.store.store import Store
from helpers.mount import ferry, mounted, wait_for

OLD = b"old text, the version the mount imported\n" * 1000  # 41 kB
NEW = b"NEW TEXT written into Phase 3 after the import\n" * 30000  # 1.4 MB
DRIFT_LOG = r"cannot (read|migrate) inode \d+ (from Phase 3|on first open): (changed|replaced)"


def rewrite_in_place(path: Path, data: bytes) -> None:
    """What an app or an operator does to the frozen tree: same inode, new bytes."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate(len(data))
    assert path.stat().st_ino == before.st_ino


def test_a_file_changed_after_its_entry_was_imported_is_eio_never_torn(tmp_path: Path) -> None:
    src, mnt, store = tmp_path / "src", tmp_path / "mnt", tmp_path / "store"
    src.mkdir()
    mnt.mkdir()
    (src / "a.txt").write_bytes(OLD)
    (src / "b.txt").write_bytes(OLD)
    with mounted(src, mnt, store, args=("--no-sweep",), log_ok=DRIFT_LOG) as m:
        assert (mnt / "a.txt").stat().st_size == len(OLD)  # the entry is imported
        rewrite_in_place(src / "a.txt", NEW)
        # Served before: the first len(OLD) bytes of the new text.
        with pytest.raises(OSError) as e:
            (mnt / "a.txt").read_bytes()
        assert e.value.errno == errno.EIO
        assert (mnt / "a.txt").stat().st_size == len(OLD)  # the mount shows the entry
        assert m.state(mnt / "a.txt") == "legacy"
        s = m.status()
        assert s["errors"] == 1 and s["files_migrated"] == 0
        # Every other file is served.
        assert (mnt / "b.txt").read_bytes() == OLD
        # The app can still replace it through the mount: the error no longer applies.
        (mnt / "a.txt").write_bytes(b"replaced through the mount")
        assert (mnt / "a.txt").read_bytes() == b"replaced through the mount"
        assert m.status()["errors"] == 0
    r = ferry("points", "verify", store, "--json")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "a.txt" in r.stdout and "b.txt" not in r.stdout


def test_a_file_changed_while_open_is_never_served_mixed(tmp_path: Path) -> None:
    src, mnt, store = tmp_path / "src", tmp_path / "mnt", tmp_path / "store"
    src.mkdir()
    mnt.mkdir()
    big = os.urandom(1 << 20) * 4  # 4 MB: reads far apart are separate requests
    (src / "big.bin").write_bytes(big)
    with mounted(src, mnt, store, args=("--no-sweep",), log_ok=DRIFT_LOG) as m:
        with open(mnt / "big.bin", "rb", buffering=0) as f:
            assert f.read(4096) == big[:4096]
            rewrite_in_place(src / "big.bin", bytes(len(big) - 10))  # zeros
            f.seek(3 << 20)
            try:
                got = f.read(4096)
            except OSError as e:  # still LEGACY: not served from the changed file
                assert e.errno == errno.EIO
                assert m.state(mnt / "big.bin") == "legacy"
            else:  # migrated before the change: the store's copy, the old bytes
                assert got == big[3 << 20 : (3 << 20) + 4096]
                assert m.state(mnt / "big.bin") == "migrated"
        # Either way it stays the version the mount imported, or none at all.
        wait_for(lambda: m.status()["errors"] <= 1, 10, "status")
        assert (mnt / "big.bin").stat().st_size == len(big)


def test_migration_does_not_take_the_new_content(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(OLD)
    with Store.open(str(tmp_path / "store"), source=str(src), create=True) as st:
        ino = st.lookup(1, b"a.txt").ino
        rewrite_in_place(src / "a.txt", NEW[: len(OLD)])  # same size, new mtime and ctime
        with pytest.raises(SourceError, match="changed in Phase 3"):
            st.migrate(ino)
        assert st.getattr(ino).state == "legacy"
        assert st.getattr(ino).size == len(OLD)
        assert [i for i, _ in st.errors()] == [ino]
        with pytest.raises(SourceError, match="changed in Phase 3"):
            st.open_legacy(ino)


def test_a_change_during_one_read_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(OLD)
    with Store.open(str(tmp_path / "store"), source=str(src), create=True) as st:
        ino = st.lookup(1, b"a.txt").ino
        f = st.open_legacy(ino)
        try:
            assert isinstance(f, Phase3File)
            assert st.read_legacy(f, ino, 0, 100) == OLD[:100]
            real = os.pread

            def pread_racing_a_writer(fd: int, n: int, off: int) -> bytes:
                data = real(fd, n, off)
                rewrite_in_place(src / "a.txt", NEW[: len(OLD)])  # lands mid-read
                return data

            monkeypatch.setattr(os, "pread", pread_racing_a_writer)
            with pytest.raises(SourceError, match="changed in Phase 3"):
                st.read_legacy(f, ino, 100, 100)
            monkeypatch.undo()
            with pytest.raises(SourceError):
                st.read_legacy(f, ino, 0, 100)
        finally:
            f.close()
        assert [i for i, _ in st.errors()] == [ino]

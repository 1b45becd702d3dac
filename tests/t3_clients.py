"""Tier 3: real programs in a live mount. git, SQLite and tar each use the file
system in their own demanding way (renames over files, fsync, shared mmap,
holes, hard links, preserved metadata); they must not notice it is ferryfs.

git, tar and diff are required, not optional: without them these tests fail
rather than skip (the Makefile's deps would have to install them).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
from helpers.mount import cli, diff_r, mounted, one_file_phase3, snapshot, snapshot_diff


def run(
    *cmd: str | os.PathLike[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    exe = shutil.which(os.fspath(cmd[0]))
    assert exe is not None, f"{cmd[0]} is not installed; the Makefile's deps must install it"
    r = subprocess.run(
        [exe, *map(os.fspath, cmd[1:])],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stderr}"
    return r.stdout


def empty_phase3(tmp_path: Path) -> tuple[Path, Path]:
    return one_file_phase3(tmp_path, "already-here.txt", b"a Phase 3 file\n")


# -- git ------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(repo.parent),  # no user configuration
        "GIT_CONFIG_NOSYSTEM": "1",
        "LC_ALL": "C",
        "GIT_AUTHOR_DATE": "2025-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2025-01-01T00:00:00Z",
    }
    return run(
        "git",
        "-c",
        "user.name=Ferry Test",
        "-c",
        "user.email=ferry@example.org",
        "-c",
        "init.defaultBranch=main",
        "-c",
        "core.fsync=all",
        *args,
        cwd=repo,
        env=env,
    )


def test_git_init_commit_fsck_in_the_mount(tmp_path: Path) -> None:
    src, mnt = empty_phase3(tmp_path)
    with mounted(src, mnt) as m:
        repo = m.mnt / "repo"
        repo.mkdir()
        git(repo, "init", "-q")
        messages = []
        for i in range(6):
            (repo / "notes.txt").write_text(
                "".join(f"line {j} of commit {i}\n" for j in range(i * 50))
            )
            (repo / f"file-{i}.bin").write_bytes(os.urandom(1000 * i) + b"\0" * 70_000)
            (repo / "dir" / f"sub{i}").mkdir(parents=True)
            (repo / "dir" / f"sub{i}" / "x.py").write_text(f"print({i})\n")
            if i >= 2:
                git(repo, "mv", f"file-{i - 2}.bin", f"moved-{i - 2}.bin")
            if i >= 3:
                git(repo, "rm", "-q", "-r", f"dir/sub{i - 3}")
            git(repo, "add", "-A")
            messages.append(f"commit number {i}")
            git(repo, "commit", "-q", "-m", messages[-1])
        assert git(repo, "log", "--format=%s").splitlines() == messages[::-1]
        assert git(repo, "fsck", "--full", "--strict").strip() == ""
        assert git(repo, "status", "--porcelain") == ""
        git(repo, "gc", "-q", "--aggressive")  # packs, deletes loose objects, renames
        assert git(repo, "fsck", "--full", "--strict").strip() == ""
        head = git(repo, "rev-parse", "HEAD")
        m.remount()
        assert git(repo, "rev-parse", "HEAD") == head
        assert git(repo, "fsck", "--full", "--strict").strip() == ""
        assert git(repo, "status", "--porcelain") == ""
        assert git(repo, "log", "--format=%s").splitlines() == messages[::-1]
        assert git(repo, "show", "HEAD~1:dir/sub4/x.py") == "print(4)\n"
        assert not (repo / "dir" / "sub2").exists()
        assert git(repo, "show", "HEAD~3:dir/sub2/x.py") == "print(2)\n"
        # A clone out of the mount sees the same history.
        clone = tmp_path / "clone"
        git(tmp_path, "clone", "-q", str(repo), str(clone))
        diff_r(repo, clone, ".git")
    assert sorted(os.listdir(src)) == ["already-here.txt"]


# -- SQLite -----------------------------------------------------------------------------


def _rows(con: sqlite3.Connection) -> list[tuple[int, str, bytes]]:
    return con.execute("SELECT id, name, blob FROM t ORDER BY id").fetchall()


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite_thousands_of_rows_in_the_mount(tmp_path: Path, journal: str) -> None:
    src, mnt = empty_phase3(tmp_path)
    with mounted(src, mnt) as m:
        db = m.mnt / "app.db"
        con = sqlite3.connect(db, isolation_level=None)
        try:
            mode = con.execute(f"PRAGMA journal_mode={journal}").fetchone()[0]
            assert mode == journal
            con.execute("PRAGMA synchronous=FULL")
            con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB)")
            con.execute("CREATE INDEX t_name ON t(name)")
            want: dict[int, tuple[str, bytes]] = {}
            for txn in range(6):
                con.execute("BEGIN")
                for i in range(txn * 1000, txn * 1000 + 1000):
                    row = (f"name-{i % 97}-{i}", bytes([i % 251]) * (i % 700))
                    con.execute("INSERT INTO t VALUES (?, ?, ?)", (i, *row))
                    want[i] = row
                # Updates and deletes in the same transaction: pages rewritten in place.
                con.execute("UPDATE t SET name = name || '-u' WHERE id % 7 = ?", (txn,))
                con.execute("DELETE FROM t WHERE id % 13 = ? AND id >= ?", (txn, txn * 1000))
                con.execute("COMMIT")
                for i, (name, blob) in list(want.items()):
                    if i % 7 == txn:
                        want[i] = (name + "-u", blob)
                    if i % 13 == txn and i >= txn * 1000:
                        del want[i]
            con.execute("BEGIN")  # a rolled-back transaction leaves nothing behind
            con.execute("DELETE FROM t")
            con.execute("ROLLBACK")
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            expected = [(i, n, b) for i, (n, b) in sorted(want.items())]
            assert _rows(con) == expected
            if journal == "wal":
                # A second connection reads through the shared-memory index (mmap'ed -shm).
                other = sqlite3.connect(db)
                try:
                    assert other.execute("SELECT count(*) FROM t").fetchone()[0] == len(want)
                finally:
                    other.close()
        finally:
            con.close()
        m.remount()
        con = sqlite3.connect(db)
        try:
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert _rows(con) == expected
            assert len(expected) > 5000
        finally:
            con.close()
    assert sorted(os.listdir(src)) == ["already-here.txt"]


# -- tar --------------------------------------------------------------------------------


def _doc_subset(dest: Path, budget: int = 12_000_000) -> None:
    """Copy the first packages of /usr/share/doc (sorted, up to `budget` bytes) to `dest`,
    links and all; if there is no such directory, a sample tree stands in."""
    doc = Path("/usr/share/doc")
    dest.mkdir()
    total = 0
    if doc.is_dir():
        for pkg in sorted(os.listdir(doc)):
            p = doc / pkg
            if total > budget:
                break
            if p.is_symlink() or not p.is_dir():
                continue
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
            run("cp", "-a", p, dest / pkg)
            total += size
    if total < 1_000_000:
        cli("sample", dest / "sample", "--sessions", "30", "--seed", "5")


def test_tar_of_a_real_tree_extracted_into_the_mount(tmp_path: Path) -> None:
    orig = tmp_path / "orig"
    _doc_subset(orig)
    cli("sample", orig / "sessions", "--sessions", "20", "--seed", "9")
    (orig / "holes").write_bytes(b"")
    with open(orig / "holes", "r+b") as f:  # a sparse file: tar --sparse makes holes
        f.seek(3_000_000)
        f.write(b"end")
    os.link(orig / "holes", orig / "holes-hardlink")
    archive = tmp_path / "tree.tar"
    run("tar", "--format=posix", "--sparse", "-C", orig, "-cf", archive, ".")  # ns mtimes
    src, mnt = empty_phase3(tmp_path)
    with mounted(src, mnt) as m:
        out = m.mnt / "extracted"
        out.mkdir()
        run("tar", "-C", out, "-xpf", archive)
        diff_r(orig, out)
        _same_metadata(orig, out)
        assert os.stat(out / "holes").st_ino == os.stat(out / "holes-hardlink").st_ino
        m.remount()
        diff_r(orig, out)
        _same_metadata(orig, out)
        # And back out: a tar made from the mount lists the same members.
        again = tmp_path / "again.tar"
        run("tar", "-C", out, "-cf", again, ".")
        assert sorted(run("tar", "-tf", again).splitlines()) == sorted(
            run("tar", "-tf", archive).splitlines()
        )
    assert sorted(os.listdir(src)) == ["already-here.txt"]


def _same_metadata(a: Path, b: Path) -> None:
    """Mode, owner, size and mtime of every entry, as tar -p restored them (a directory's
    size is its file system's business, so not compared)."""
    fields = ("st_mode", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_nlink")

    def norm(snap: dict[bytes, tuple[object, ...]]) -> dict[bytes, tuple[object, ...]]:
        out = {}
        for k, v in snap.items():
            if k == b"":
                continue
            mode = v[0]
            assert isinstance(mode, int)
            out[k] = v[:3] + v[4:] if stat.S_ISDIR(mode) else v
        return out

    sa, sb = norm(snapshot(a, fields, False)), norm(snapshot(b, fields, False))
    assert sa == sb, snapshot_diff(sa, sb)

"""The store directory's security and integrity at open: who may read it, what
ferryfs refuses about a store path, the one-writer lock, a short data.mdb, and
the daemon's log.

Most cases run the CLI in a subprocess as an operator would; the ones about other
users run it as uid 65534 (nobody) with setpriv, or plant things owned by 65534
while the tests run as root.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NOW_NS
from ferryfs.store import storedir
from ferryfs.store.errors import StoreLocked, StoreMissing, StoreUnusable
from ferryfs.store.store import Store
from ferryfs.tools.mounts import fs_type
from ferryfs.tools.sampletree import generate
from helpers.asuser import run_as_nobody
from helpers.mount import cli, ferry, mounted, require_fuse
from helpers.store import free_last_pages

NOBODY = 65534


def one_line(r: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr, r.stderr
    assert err.startswith("ferryfs: ") and "\n" not in err, f"not one line: {r.stderr!r}"
    assert re.search(says, err), f"{err!r} does not say /{says}/"
    assert r.returncode == code, f"exit {r.returncode}, expected {code}: {err}"


def modes(store: Path) -> dict[str, str]:
    """Every path in the store whose mode lets group or others in (expected: none)."""
    loose = {}
    for dirpath, dirs, files in os.walk(store):
        for name in [".", *dirs, *files] if dirpath == str(store) else [*dirs, *files]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_IMODE(st.st_mode) & 0o077:
                loose[os.path.relpath(p, store)] = f"{stat.S_IMODE(st.st_mode):04o}"
    return loose


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    generate(src, 2, seed=5, attachment_mb=1, now_ns=NOW_NS)
    secret = src / "secret.txt"
    secret.write_text("the plaintext of a private file\n")
    secret.chmod(0o600)
    return src


@pytest.fixture
def migrated_store(tree: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A store `ferryfs migrate` made of `tree` (tmp_path/store), and an empty
    mountpoint (tmp_path/mnt)."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    cli("migrate", tree, "--store", store)
    return store, mnt


# -- 1: the store is private -------------------------------------------------------------


def test_a_new_store_is_private_whatever_the_umask(tree: Path, tmp_path: Path) -> None:
    require_fuse()
    mnt, store = tmp_path / "mnt", tmp_path / "src.ferry"
    mnt.mkdir()
    with umask(0):
        with mounted(tree, mnt, store) as m:
            assert (m.mnt / "secret.txt").read_text().startswith("the plaintext")
            m.sync()
            assert modes(store) == {}, "readable by others while mounted"
        cli("migrate", tree, "--store", tmp_path / "migrated.ferry")
    assert {"db/data.mdb", "db/lock.mdb", "daemon.log"} <= {
        os.path.relpath(os.path.join(d, f), store) for d, _, fs in os.walk(store) for f in fs
    }
    assert modes(store) == {}
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert stat.S_IMODE((store / "db" / "data.mdb").stat().st_mode) == 0o600
    assert modes(tmp_path / "migrated.ferry") == {}


def test_a_store_with_loose_modes_is_made_private(tree: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cli("migrate", tree, "--store", store)
    for dirpath, _dirs, files in os.walk(store):  # as an older ferryfs left it
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    r = ferry("stats", store)
    assert r.returncode == 0, r.stderr
    assert "made private" in r.stderr
    assert modes(store) == {}


# -- 2: a store path prepared by someone else ------------------------------------------------


def planted(tmp_path: Path, owner: int, mode: int) -> tuple[Path, Path]:
    """A store directory made by `owner` (mode `mode`) before the first mount, with
    daemon.log and lock as symbolic links to files the planter chose."""
    store, target = tmp_path / "src.ferry", tmp_path / "victim"
    store.mkdir()
    (store / "daemon.log").symlink_to(target)
    (store / "lock").symlink_to(tmp_path / "created-by-root")
    target.write_text("the victim's file\n")
    for p in (store, store / "daemon.log", store / "lock"):
        os.lchown(p, owner, owner)
    store.chmod(mode)
    return store, target


@pytest.mark.parametrize(
    ("owner", "mode", "says"),
    [
        (NOBODY, 0o777, r"owned by uid 65534"),
        (NOBODY, 0o700, r"owned by uid 65534"),
        (0, 0o777, r"writable by others"),
        (0, 0o700, r"symbolic link|not a ferryfs store"),
    ],
)
def test_a_store_prepared_by_another_user_is_refused(
    tree: Path, tmp_path: Path, owner: int, mode: int, says: str
) -> None:
    require_fuse()
    store, target = planted(tmp_path, owner, mode)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        for argv in (["mount", tree, mnt, "--store", store], ["migrate", tree, "--store", store]):
            r = ferry(*argv)
            one_line(r, 8, says)
    finally:
        if fs_type(str(mnt)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert fs_type(str(mnt)) is None
    assert target.read_text() == "the victim's file\n", "root wrote through a planted link"
    assert not (tmp_path / "created-by-root").exists(), "root created a file a link chose"
    assert sorted(os.listdir(store)) == ["daemon.log", "lock"], "a store was made in it"


def test_a_link_planted_in_our_store_is_not_followed(
    tree: Path, tmp_path: Path, migrated_store: tuple[Path, Path]
) -> None:
    require_fuse()
    store, mnt = migrated_store
    target = tmp_path / "victim"
    target.write_text("the victim's file\n")
    (store / "daemon.log").symlink_to(target)
    try:
        one_line(ferry("mount", tree, mnt, "--store", store), 8, r"daemon\.log is a symbolic link")
    finally:
        if fs_type(str(mnt)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert target.read_text() == "the victim's file\n"
    # fsck's cursor likewise: a link there is neither followed nor replaced blindly.
    (store / "daemon.log").unlink()
    (store / "fsck.cursor").symlink_to(target)
    r = ferry("fsck", store, "--max-duration", "0.001")
    assert "Traceback" not in r.stderr, r.stderr
    assert target.read_text() == "the victim's file\n"


def test_a_store_whose_database_was_moved_is_refused_not_made_again(
    tree: Path, tmp_path: Path, migrated_store: tuple[Path, Path]
) -> None:
    require_fuse()
    store, mnt = migrated_store
    (store / "db").rename(tmp_path / "db.moved")
    try:
        for argv in (["mount", tree, mnt, "--store", store], ["migrate", tree, "--store", store]):
            one_line(ferry(*argv), 8, r"database was moved away")
    finally:
        if fs_type(str(mnt)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert not (store / "db").exists(), "a new, empty store was made where one was"


def test_a_store_is_made_only_where_nothing_is(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreMissing):
        Store.open(str(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    with Store.open(str(empty), source=str(tree), create=True) as s:
        assert s.source_path() == str(tree)
    assert modes(empty) == {}
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreMissing):
        Store.open(str(tmp_path / "file"), source=str(tree), create=True)


# -- exit 8 for every store path that cannot be used, as a user who is not root ----------------


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody may read and write, with a Phase 3 tree and a mountpoint."""
    base = Path(tempfile.mkdtemp(prefix="A-storesec-", dir="/tmp"))
    try:
        base.chmod(0o755)
        src = base / "src"
        generate(src, 1, seed=1, attachment_mb=0, now_ns=NOW_NS)
        (base / "mnt").mkdir()
        for dirpath, dirs, files in os.walk(base):
            for n in dirs + files:
                os.chown(os.path.join(dirpath, n), NOBODY, NOBODY)
        os.chown(base, NOBODY, NOBODY)
        yield base
    finally:
        if fs_type(str(base / "mnt")) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(base / "mnt")], capture_output=True)
        shutil.rmtree(base)


def as_nobody(*argv: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return run_as_nobody(list(argv))


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("/etc", r"not a ferryfs store"),
        ("/root/app.ferry", r"cannot (use|create)"),
        ("/proc/app.ferry", r"cannot create store"),
        ("/etc/passwd", r"not a ferryfs store"),
    ],
)
def test_an_unusable_store_path_is_exit_8_as_a_user(world: Path, store: str, says: str) -> None:
    require_fuse()
    if os.geteuid() != 0:
        pytest.fail("this test runs commands as uid 65534: it needs root to start them")
    for argv in (
        ["mount", world / "src", world / "mnt", "--store", store],
        ["migrate", world / "src", "--store", store],
    ):
        one_line(as_nobody(*argv), 8, says)
    assert fs_type(str(world / "mnt")) is None
    assert not os.path.exists("/etc/daemon.log")


# -- 8: the lock cannot be removed from under a writer ---------------------------------------


def test_removing_the_lock_files_lets_no_second_writer_in(tree: Path, tmp_path: Path) -> None:
    require_fuse()
    store, mnt, mnt2 = tmp_path / "store", tmp_path / "mnt", tmp_path / "mnt2"
    mnt.mkdir()
    mnt2.mkdir()
    with mounted(tree, mnt, store, log_ok=r"in use by another ferryfs process"):
        for name in ("lock", "db/lock.mdb"):
            with contextlib.suppress(FileNotFoundError):
                (store / name).unlink()
        try:
            one_line(ferry("mount", tree, mnt2, "--store", store), 8, r"in use")
        finally:
            if fs_type(str(mnt2)) is not None:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt2)], capture_output=True)
        one_line(ferry("migrate", tree, "--store", store), 8, r"in use")
        one_line(ferry("fsck", "--repair", "--yes", store), 8, r"in use")
        with pytest.raises(StoreLocked):
            Store.open(str(store))


def test_the_writer_lock_is_one_for_store_open_and_fsck(tree: Path, tmp_path: Path) -> None:
    from ferryfs.store.fsck_repair import hold_writer_lock

    store = tmp_path / "store"
    Store.open(str(store), source=str(tree), create=True).close()
    held = hold_writer_lock(str(store))
    assert held is not None
    try:
        with pytest.raises(StoreLocked):
            Store.open(str(store))
    finally:
        held.close()
    with Store.open(str(store)), pytest.raises(StoreLocked):
        hold_writer_lock(str(store))


# -- 11: a short data.mdb whose last pages are free ---------------------------------------------


def test_a_store_whose_last_pages_are_free_is_not_truncated(
    tree: Path, migrated_store: tuple[Path, Path]
) -> None:
    store, _ = migrated_store
    size, need = free_last_pages(store / "db")
    assert size < need, "setup: the file should end before the meta page's last page"
    r = ferry("stats", store, "--json")
    assert r.returncode == 0, r.stderr
    r = ferry("fsck", store)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (store / "db" / "data.mdb").stat().st_size == size, "a reader changed data.mdb"
    with Store.open(str(store)):  # a writer extends it (a hole) to the meta page's length
        assert (store / "db" / "data.mdb").stat().st_size >= need
    # A file truly cut short is still refused, before anything touches a missing page.
    os.truncate(store / "db" / "data.mdb", size // 2)
    one_line(ferry("stats", store), 8, r"data\.mdb is truncated")


# -- log rotation -----------------------------------------------------------------------------

ROTATE = """
import logging, os, sys
from ferryfs.store.storedir import StoreDir
sd = StoreDir.open(sys.argv[1])
rot = sd.rotate_stderr(max_bytes=int(sys.argv[2]))
assert rot is not None, "stderr is daemon.log: rotation expected"
logging.basicConfig(level=logging.INFO)
for h in logging.getLogger().handlers:
    h.addFilter(rot)
log = logging.getLogger("ferryfs.test")
for i in range(2000):
    os.write(2, b"libfuse: " + b"x" * 500 + b"\\n")  # what libfuse writes to fd 2
    log.info("record %d %s", i, "y" * 200)
print("done")
"""


def test_daemon_log_rotates_and_stays_bounded(tree: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    Store.open(str(store), source=str(tree), create=True).close()
    limit = 64 << 10
    with storedir.open_log(str(store / "daemon.log")) as log:
        r = subprocess.run(
            [sys.executable, "-c", ROTATE, str(store), str(limit)],
            stderr=log,
            stdout=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert r.returncode == 0 and r.stdout.strip() == "done"
    main, old = store / "daemon.log", store / "daemon.log.1"
    assert old.exists(), "never rotated"
    # One record or libfuse line past the limit at most, before the next check.
    assert main.stat().st_size <= limit + 2048
    assert old.stat().st_size <= limit + 2048
    assert "record 1999" in main.read_text()
    assert modes(store) == {}


def test_mount_rotates_a_big_daemon_log(tree: Path, migrated_store: tuple[Path, Path]) -> None:
    require_fuse()
    store, mnt = migrated_store
    log = store / "daemon.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
    os.ftruncate(fd, storedir.LOG_MAX + 1)  # a sparse stand-in for a long history
    os.close(fd)
    with mounted(tree, mnt, store) as m:
        assert (m.mnt / "secret.txt").read_text().startswith("the plaintext")
    assert (store / "daemon.log.1").stat().st_size == storedir.LOG_MAX + 1
    assert log.stat().st_size < 1 << 20
    assert "mounted" in log.read_text()
    assert modes(store) == {}


def test_refusals_name_the_path_and_raise_store_errors(tmp_path: Path) -> None:
    other = tmp_path / "theirs"
    other.mkdir()
    os.chown(other, NOBODY, NOBODY)
    with pytest.raises(StoreUnusable, match="owned by uid 65534") as e:
        storedir.StoreDir.open(str(other), create=True)
    assert e.value.exit_code == 8


def test_a_live_daemon_rotates_its_log(tree: Path, tmp_path: Path) -> None:
    """The daemon's stderr is daemon.log: past LOG_MAX its next record rotates it."""
    require_fuse()
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    log = store / "daemon.log"
    with mounted(tree, mnt, store) as m:
        assert Path(f"/proc/{m.pid}/fd/2").resolve() == log
        os.truncate(log, log.stat().st_size + storedir.LOG_MAX + 1)  # as if it logged much
    # Unmounting logs "stopping" and "unmounted": the first of them rotated the log.
    assert (store / "daemon.log.1").stat().st_size > storedir.LOG_MAX
    assert log.stat().st_size < 1 << 20
    assert "unmounted" in log.read_text()
    assert modes(store) == {}


def test_a_user_makes_a_private_store_and_root_may_not_use_it(world: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test runs commands as uid 65534: it needs root to start them")
    store = world / "mine.ferry"
    r = as_nobody("migrate", world / "src", "--store", store)
    assert r.returncode == 0, r.stderr
    assert store.stat().st_uid == NOBODY and modes(store) == {}
    r = as_nobody("stats", store)
    assert r.returncode == 0, r.stderr
    # Root refuses a store another user controls (what it would write, it could redirect).
    one_line(ferry("stats", store), 8, r"owned by uid 65534")

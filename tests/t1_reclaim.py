"""Giving the database's free pages back to the filesystem (store/reclaim.py): after
a mass delete, idle upkeep makes `du` of the store fall; what a reader's older
snapshot references is never punched; the database stays valid (LMDB's own page
accounting, the file walk, fsck --deep) and keeps working when LMDB reuses the
punched pages; a kill -9 while punching leaves a clean store."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
from ferryfs.store import cas, lmdbfile, reclaim, upkeep
from ferryfs.store.errors import NoSpace
from ferryfs.store.fsck import Checker
from ferryfs.store.kv import DBS, LmdbBackend
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store
from helpers.damage import kill_midway
from helpers.mount import small_tmpfs
from helpers.store import check_invariants, migrate_everything

REG = 0o100644
N = 300


def du(path: Path | str) -> int:
    return sum(
        os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs
    )


def make_tree(tmp_path: Path, seed: int = 1) -> Path:
    rng = random.Random(seed)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(N):
        (src / f"f{i:03d}").write_bytes(rng.randbytes(rng.randrange(500, 50_000)))
    return src


def migrated_store(tmp_path: Path, src: Path) -> str:
    path = str(tmp_path / "s")
    with Store.open(path, source=str(src), create=True) as s:
        migrate_everything(s)
    return path


def idle_until_done(s: Store) -> None:
    for _ in range(100):
        if not upkeep.idle(s, lambda: False):
            return
    raise AssertionError("idle upkeep never ran out of work")


def read_all(s: Store, ino: int) -> bytes:
    return s.read(ino, 0, s.getattr(ino).size + 1)


def check_clean(s: Store, src: Path, gone: set[int]) -> None:
    """Every remaining file exact; the file walk, the invariants and fsck --deep clean."""
    assert isinstance(s.backend, LmdbBackend)
    assert s.backend.verify() is None
    for i in range(N):
        if i in gone:
            continue
        ino = s.lookup(ROOT_INO, f"f{i:03d}".encode()).ino
        assert read_all(s, ino) == (src / f"f{i:03d}").read_bytes(), i
    check_invariants(s, deep=True)
    s.cache = cas.ChunkCache()
    assert [
        f"{p.kind}: {p.detail}" for p in Checker(s, deep=True, resume=False).run().problems
    ] == []


def page_accounting(path: str) -> tuple[int, int, int]:
    """(pages in use by the newest snapshot, pages on its freelist, last page + 1):
    LMDB's own audit (mdb.c, mdb_audit) says the first two add up to the third."""
    fd = os.open(os.path.join(path, "db", "data.mdb"), os.O_RDONLY)
    try:
        psize = 4096
        new = lmdbfile.metas(fd, psize)[-1]
        used = lmdbfile.in_use(fd, psize, new)
        in_use = {pg + k for pg, n in used for k in range(n)}
        free = [pg for pages in lmdbfile.free_records(fd, psize, new).values() for pg in pages]
        assert len(free) == len(set(free)), "a page twice on the freelist"
        assert not in_use & set(free), "a page both free and in use"
        return len(in_use), len(free), new.last_pg + 1
    finally:
        os.close(fd)


def test_the_freelist_read_from_the_file_accounts_for_every_page(tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    path = migrated_store(tmp_path, src)
    with Store.open(path) as s:
        for i in range(0, N, 2):
            s.unlink(ROOT_INO, f"f{i:03d}".encode())
        upkeep.compact(s)
    used, free, pages = page_accounting(path)
    assert free > 600  # records long enough to sit in overflow pages
    assert used + free == pages


def test_idle_upkeep_gives_the_free_pages_back(tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    path = migrated_store(tmp_path, src)
    full = du(path)
    gone = set(range(0, N, 2))
    with Store.open(path) as s:
        for i in gone:
            s.unlink(ROOT_INO, f"f{i:03d}".encode())
        idle_until_done(s)
        after = du(path)
        assert after < 0.6 * full, (full, after)
        check_clean(s, src, gone)
        size = os.path.getsize(os.path.join(path, "db", "data.mdb"))
        # New files take the punched pages again: the file hardly grows, its disk does.
        rng = random.Random(2)
        new = {f"n{i}": rng.randbytes(rng.randrange(500, 50_000)) for i in range(100)}
        for name, data in new.items():
            ino = s.create(ROOT_INO, name.encode(), REG, 0, 0).ino
            s.write(ino, 0, data)
        grew = os.path.getsize(os.path.join(path, "db", "data.mdb")) - size
        assert grew < sum(map(len, new.values())) // 4
        assert du(path) > after
        for name, data in new.items():
            assert read_all(s, s.lookup(ROOT_INO, name.encode()).ino) == data
        check_clean(s, src, gone)
    used, free, pages = page_accounting(path)
    assert used + free == pages
    with Store.open(path) as s:  # and after reopening
        check_clean(s, src, gone)


def snapshot_digest(txn: object) -> str:
    h = hashlib.sha256()
    for db in DBS:
        for k, v in txn.range(db, b""):  # type: ignore[attr-defined]
            h.update(db.encode() + len(k).to_bytes(4, "big") + k + bytes(v))
    return h.hexdigest()


def test_a_reader_of_an_older_snapshot_reads_it_exactly_while_pages_are_punched(
    tmp_path: Path,
) -> None:
    src = make_tree(tmp_path)
    path = migrated_store(tmp_path, src)
    with Store.open(path) as s:
        for i in range(0, N, 2):  # half goes, its packs are compacted
            s.unlink(ROOT_INO, f"f{i:03d}".encode())
        upkeep.compact(s)
        assert isinstance(s.backend, LmdbBackend)
        data, psize = s.backend.data_file()
        with s.backend.read() as old:  # a reader keeps this snapshot from here on
            want = snapshot_digest(old)
            fd = os.open(data, os.O_RDONLY)
            try:
                pages = lmdbfile.in_use(fd, psize, lmdbfile.metas(fd, psize)[-1])
            finally:
                os.close(fd)
            for i in range(1, 12, 2):  # a few more go while it reads
                s.unlink(ROOT_INO, f"f{i:03d}".encode())
            idle_until_done(s)
            # Pages were punched meanwhile (those freed before the reader began and
            # not reused since), none of the reader's.
            assert s.backend.given_back > 1 << 20
            assert snapshot_digest(old) == want
            # Every page the reader's snapshot references still holds its data on disk.
            fd = os.open(data, os.O_RDONLY)
            try:
                for pg, n in pages:
                    assert reclaim.data_bytes(fd, pg * psize, (pg + n) * psize) == n * psize, pg
            finally:
                os.close(fd)
        check_clean(s, src, set(range(0, N, 2)) | set(range(1, 12, 2)))


KILLED = """
import sys
from ferryfs.store import reclaim, upkeep
from ferryfs.store.store import Store
reclaim.MAX_RUN = 4  # many short punches: the kill lands among them
reclaim.BATCH_SECONDS = 0
real = reclaim.punch
def punch(fd, off, n):
    real(fd, off, n)
    print("punched", off, flush=True)
reclaim.punch = punch
with Store.open(sys.argv[1]) as s:
    while upkeep.idle(s, lambda: False):
        pass
    print("done", flush=True)
"""


def test_a_kill_9_while_punching_leaves_a_clean_store(tmp_path: Path) -> None:
    rng = random.Random(3)
    src = make_tree(tmp_path)
    path = migrated_store(tmp_path, src)
    gone = set(range(0, N, 2))
    with Store.open(path) as s:
        for i in gone:
            s.unlink(ROOT_INO, f"f{i:03d}".encode())
        upkeep.compact(s)
    full = du(path)
    for attempt in range(3):
        copy = tmp_path / f"copy{attempt}"
        shutil.copytree(path, copy)
        kill_midway([sys.executable, "-c", KILLED, str(copy)], rng, 60)
        killed_at = du(copy)
        assert killed_at < full  # it was killed while punching, not before
        with Store.open(str(copy)) as s:
            check_clean(s, src, gone)
            idle_until_done(s)  # and it carries on to the end
            assert du(copy) < killed_at
            check_clean(s, src, gone)


def test_a_full_disk_after_punching_fails_the_write_cleanly(tmp_path: Path) -> None:
    """Punched pages take disk again when LMDB reuses them: on a full disk that
    write gets NoSpace and the store stays whole (and works once there is room)."""
    src = make_tree(tmp_path)
    with small_tmpfs(tmp_path / "small", 40) as small:
        path = migrated_store(small, src)
        gone = set(range(0, N, 2))
        with Store.open(path) as s:
            for i in gone:
                s.unlink(ROOT_INO, f"f{i:03d}".encode())
            idle_until_done(s)
            assert isinstance(s.backend, LmdbBackend) and s.backend.given_back > 1 << 20
            filler = small / "filler"
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\xff" * (1 << 16))
                    f.flush()
            rng = random.Random(4)
            written = {}
            with pytest.raises(NoSpace):
                for i in range(1000):
                    data = rng.randbytes(20_000)
                    ino = s.create(ROOT_INO, f"n{i}".encode(), REG, 0, 0).ino
                    s.write(ino, 0, data)
                    written[f"n{i}"] = data
            filler.unlink()
            check_clean(s, src, gone)
            for name, data in written.items():
                assert read_all(s, s.lookup(ROOT_INO, name.encode()).ino) == data
            ino = s.create(ROOT_INO, b"after", REG, 0, 0).ino
            s.write(ino, 0, b"x" * 100_000)
            assert read_all(s, ino) == b"x" * 100_000

"""The store's contract, run on both backends (memory, and LMDB in tmp_path).

Every test builds a small hostile Phase 3 tree (non-UTF-8 and 255-byte names,
hard links, a FIFO, symlinks pointing out of the tree, owners and nanosecond
mtimes), drives the store over it, checks the store's invariants, and checks
that the Phase 3 tree is byte-for-byte and stat-for-stat what it was.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ferryfs.store import cas
from ferryfs.store import migration as ingest
from ferryfs.store import store as store_module
from ferryfs.store.chunker import Chunker, digest
from ferryfs.store.errors import (
    CorruptChunk,
    Exists,
    Invalid,
    IsADir,
    NameTooLong,
    NoData,
    NotADir,
    NotEmpty,
    NotFound,
    NotPermitted,
    ReadOnly,
    SchemaMismatch,
    SourceError,
    StoreLocked,
)
from ferryfs.store.kv import LmdbBackend
from ferryfs.store.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE
from ferryfs.store.records import ROOT_INO, U64, Inode
from ferryfs.store.store import Store
from helpers.damage import damage_chunk
from helpers.store import check_invariants, deadline, raw, snapshot, walk_store, write_files

UID, GID = 4321, 8765
BASE_NS = 1_700_000_000_123_456_789
SECRET = b"the secret outside the tree\n" * 100
SHARED = random.Random(99).randbytes(400_000)

FILES: dict[bytes, bytes] = {
    b"hello.txt": b"hello world\n",
    b"empty": b"",
    b"big.bin": random.Random(1).randbytes(900_000),
    b"dup1.bin": SHARED,
    b"dup2.bin": SHARED,
    b"caf\xe9-latin1.json": b'{"k": "v\xe9"}\n' * 2000,
    b"n" * 255: b"a name of 255 bytes",
    b"sessions/s1/log.jsonl": b"".join(b'{"turn": %d}\n' % i for i in range(20000)),
    b"sessions/s1/shot.png": random.Random(2).randbytes(70_000),
    b"sessions/s2/log.jsonl": b'{"turn": 0}\n',
    b"sessions/deep/a/b/c/leaf": b"leaf",
}
HARD = (b"sessions/s2/hardlink", b"sessions/s1/log.jsonl")
DIRS = [b"sessions", b"sessions/s1", b"sessions/s2", b"sessions/deep", b"emptydir"]


def build_tree(tmp: Path) -> Path:
    """The Phase 3 tree at tmp/phase3 (and a secret at tmp/outside it must never read)."""
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    src = tmp / "phase3"
    top = os.fsencode(src)
    os.mkdir(top)
    for d in DIRS:
        os.makedirs(os.path.join(top, d), exist_ok=True)
    write_files(top, FILES, HARD)
    os.symlink(b"hello.txt", os.path.join(top, b"link"))
    os.symlink(os.fsencode(outside / "secret"), os.path.join(top, b"escape"))
    os.symlink(os.fsencode(outside), os.path.join(top, b"escdir"))
    os.symlink(b"../../outside/secret", os.path.join(top, b"sessions/up"))
    os.mkfifo(os.path.join(top, b"sessions/fifo"), 0o620)
    # Owners, modes and distinct nanosecond times; directories last, deepest first.
    paths = sorted(snapshot(src), key=lambda p: (-p.count(b"/"), p), reverse=False)
    for i, rel in enumerate(paths):
        p = os.path.join(top, rel) if rel else top
        st = os.lstat(p)
        ns = BASE_NS + i * 1_000_000_007
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(
                p,
                0o700 | (0o640 if i % 2 else 0o604)
                if stat.S_ISDIR(st.st_mode)
                else (0o640 if i % 2 else 0o604),
            )
        os.lchown(p, UID + i % 3, GID + i % 2)
        os.utime(p, ns=(ns - 5, ns), follow_symlinks=False)
    return src


class Env:
    """Opens stores of one backend kind over one Phase 3 tree."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.tmp = tmp
        self.src = build_tree(tmp)
        self.path = str(tmp / "store")
        self.live: Store | None = None
        self.tree_changed_on_purpose = False

    @property
    def lmdb(self) -> bool:
        return self.kind == "lmdb"

    def open(self, **kw: Any) -> Store:
        """A store over the tree; the fixture checks and closes the latest one."""
        if self.kind == "memory":
            self.live = Store.memory(str(self.src), **kw)
        else:
            self.live = Store.open(self.path, source=str(self.src), create=True, **kw)
        return self.live

    def reopen(self, store: Store, **kw: Any) -> Store:
        if not self.lmdb:
            pytest.skip("a memory store cannot be reopened")
        store.close()
        self.live = None
        self.live = Store.open(self.path, **kw)
        return self.live

    def close(self) -> None:
        if self.live is not None:
            self.live.close()
            self.live = None


@pytest.fixture(params=["memory", "lmdb"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    e = Env(request.param, tmp_path)
    before = snapshot(e.src)
    try:
        yield e
        if e.live is not None:
            check_invariants(e.live)
    finally:
        e.close()
    if not e.tree_changed_on_purpose:
        assert snapshot(e.src) == before, "the Phase 3 tree changed"


@pytest.fixture
def store(env: Env) -> Store:
    return env.open()


def resolve(s: Store, rel: bytes) -> Inode:
    node = s.getattr(ROOT_INO)
    for part in rel.split(b"/"):
        node = s.lookup(node.ino, part)
    return node


def migrate_all(s: Store) -> list[int]:
    """Import and migrate everything; returns the inodes that failed."""
    s.import_all()
    failed = []
    for ino in s.legacy_files_by_path():
        try:
            s.migrate(ino)
        except SourceError:
            failed.append(ino)
    return failed


def chunk_count(s: Store) -> int:
    return len(raw(s).chunks)


# -- import -----------------------------------------------------------------------


def test_import_keeps_names_types_owners_modes_and_ns_times(env: Env, store: Store) -> None:
    snap = snapshot(env.src)
    store.import_all()
    got = walk_store(store, read=False)
    assert set(got) == set(snap) - {b""}
    for rel, (row, body) in snap.items():
        mode, uid, gid, size, mtime_ns, ctime_ns, _ino, nlink, _rdev = row
        node = store.getattr(ROOT_INO) if rel == b"" else resolve(store, rel)
        assert (node.mode, node.uid, node.gid, node.mtime_ns, node.ctime_ns) == (
            mode,
            uid,
            gid,
            mtime_ns,
            ctime_ns,
        ), rel
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            assert node.size == size, rel
        if stat.S_ISREG(mode):
            assert node.nlink == nlink, rel
            assert node.state == "legacy"
        if stat.S_ISLNK(mode):
            assert store.readlink(node.ino) == body
        if stat.S_ISDIR(mode):
            assert node.nlink == nlink, rel
    assert resolve(store, HARD[0]).ino == resolve(store, HARD[1]).ino
    fifo = resolve(store, b"sessions/fifo")
    assert stat.S_ISFIFO(fifo.mode)
    assert store.errors() == []


def test_import_is_per_directory_and_lazy(store: Store) -> None:
    assert store.stats().dirs_listed == 0
    store.ensure_listed(ROOT_INO)
    s = store.stats()
    assert s.dirs_listed == 1
    assert s.files_migrated == 0
    assert s.dirs_total == 1 + len([d for d in DIRS if b"/" not in d])


def test_legacy_files_by_path_come_in_sorted_path_order_and_skip_migrated(
    store: Store,
) -> None:
    store.import_all()
    path = {resolve(store, rel).ino: rel for rel in FILES}  # each a regular file
    regular = sorted(FILES)  # HARD[0] is a second name of HARD[1]: that file once
    assert [path[ino] for ino in store.legacy_files_by_path()] == regular
    store.migrate(resolve(store, b"sessions/s1/log.jsonl").ino)
    regular.remove(b"sessions/s1/log.jsonl")
    assert [path[ino] for ino in store.legacy_files_by_path()] == regular


def test_lookup_lists_ahead_a_bounded_number_of_entries(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "LIST_AHEAD", 1)
    small = env.open()
    small.lookup(ROOT_INO, b"hello.txt")
    s = small.stats()
    assert 1 < s.dirs_listed < s.dirs_total, s  # the root and some, not all
    small.lookup(ROOT_INO, b"hello.txt")  # the root is listed: nothing more is
    assert small.stats().dirs_listed == s.dirs_listed
    monkeypatch.setattr(store_module, "LIST_AHEAD", 10_000)
    with Store.memory(str(env.src)) as big:  # a fresh store: all of it is in reach
        big.lookup(ROOT_INO, b"hello.txt")
        s = big.stats()
    assert s.dirs_listed == s.dirs_total and s.files_migrated == 0, s


def test_names_are_bytes_up_to_255(store: Store) -> None:
    ok = b"x" * 255
    long = b"x" * 256
    assert store.lookup(ROOT_INO, b"n" * 255).size == len(FILES[b"n" * 255])
    assert store.lookup(ROOT_INO, b"caf\xe9-latin1.json").size > 0
    with pytest.raises(NameTooLong) as e:
        store.create(ROOT_INO, long, 0o644, 0, 0)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(NameTooLong):
        store.lookup(ROOT_INO, long)
    with pytest.raises(NameTooLong):
        store.mkdir(ROOT_INO, long, 0o755, 0, 0)
    with pytest.raises(NameTooLong):
        store.symlink(ROOT_INO, long, b"t", 0, 0)
    with pytest.raises(NameTooLong):
        store.rename(ROOT_INO, b"hello.txt", ROOT_INO, long)
    f = store.create(ROOT_INO, ok, 0o644, 0, 0)
    with pytest.raises(NameTooLong):
        store.link(f.ino, ROOT_INO, long)
    odd = b"\xff\xfe not utf-8 \x80"
    g = store.create(ROOT_INO, odd, 0o600, 0, 0)
    store.write(g.ino, 0, b"odd")
    names = {name for _, name, _ in store.readdir(ROOT_INO, limit=10**6)}
    assert {ok, odd, b"n" * 255, b"caf\xe9-latin1.json"} <= names
    assert store.read(store.lookup(ROOT_INO, odd).ino, 0, 10) == b"odd"


def test_readdir_pages_through_every_entry_once(store: Store) -> None:
    d = store.mkdir(ROOT_INO, b"many", 0o755, 0, 0)
    names = {b"e%04d" % i for i in range(300)}
    for n in names:
        store.create(d.ino, n, 0o644, 0, 0)
    seen: list[bytes] = []
    after = 0
    while batch := store.readdir(d.ino, after, limit=7):
        seen += [n for _, n, _ in batch]
        after = batch[-1][0]
    assert sorted(seen) == sorted(names)


# -- hostile trees -------------------------------------------------------------------


def test_symlinks_out_of_the_tree_are_kept_and_never_followed(
    env: Env, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = os.path.realpath(env.tmp / "outside" / "secret")
    outside = os.path.realpath(env.tmp / "outside")
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        opened.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fd

    monkeypatch.setattr(os, "open", spy)
    assert migrate_all(store) == []
    for rel, target in [
        (b"escape", secret),
        (b"escdir", outside),
        (b"sessions/up", "../../outside/secret"),
    ]:
        node = resolve(store, rel)
        assert node.is_link
        assert store.readlink(node.ino) == os.fsencode(target)
        assert node.size == len(os.fsencode(target))
    with pytest.raises((NotADir, NotFound)):  # the kernel never asks; no way out anyway
        store.lookup(resolve(store, b"escdir").ino, b"secret")
    monkeypatch.undo()
    assert opened, "the spy saw nothing"
    assert not [p for p in opened if p.startswith(outside)]
    assert digest(SECRET) not in raw(store).chunks
    assert all(SECRET not in e.body for e in walk_store(store).values())


def test_swapped_or_vanished_files_give_per_file_errors(env: Env, store: Store) -> None:
    env.tree_changed_on_purpose = True
    store.import_all()
    top = os.fsencode(env.src)
    victims = {
        b"hello.txt": "symlink",
        b"sessions/s2/log.jsonl": "fifo",
        b"dup1.bin": "replaced",
        b"sessions/s1/shot.png": "gone",
    }
    inos = {rel: resolve(store, rel).ino for rel in victims}
    for rel, how in victims.items():
        p = os.path.join(top, rel)
        if how != "replaced":
            os.unlink(p)
        if how == "symlink":
            os.symlink(os.fsencode(env.tmp / "outside" / "secret"), p)
        elif how == "fifo":
            os.mkfifo(p)
        elif how == "replaced":
            with open(p + b".new", "wb") as f:  # made first: it cannot reuse the inode
                f.write(b"another file in its place")
            os.rename(p + b".new", p)
    failed = migrate_all(store)
    assert sorted(failed) == sorted(inos.values())
    errs = dict(store.errors())
    assert set(errs) == set(inos.values())
    for ino in inos.values():
        with pytest.raises(SourceError) as e:
            store.read(ino, 0, 10)
        assert e.value.errno == errno.EIO
        assert store.getattr(ino).state == "legacy"
    for rel, data in FILES.items():
        if rel not in victims:
            node = resolve(store, rel)
            assert store.read(node.ino, 0, len(data) + 10) == data
            assert node.state == "migrated"
    assert digest(SECRET) not in raw(store).chunks
    assert store.stats().errors == len(victims)


class ChangingChunker(Chunker):
    """Appends to the file being read after its first chunk has been read."""

    path: bytes = b""

    def stream(self, f: Any) -> Iterator[bytes]:
        for i, piece in enumerate(super().stream(f)):
            if i == 0:
                with open(type(self).path, "ab") as w:
                    w.write(b"more")
            yield piece


def test_a_file_changing_while_read_gives_source_error(env: Env, store: Store) -> None:
    env.tree_changed_on_purpose = True
    rel = b"big.bin"
    node = store.lookup(ROOT_INO, rel)
    ChangingChunker.path = os.path.join(os.fsencode(env.src), rel)
    store.chunker = ChangingChunker()
    with pytest.raises(SourceError, match="changed"):
        store.read(node.ino, 0, 10)
    assert store.getattr(node.ino).state == "legacy"
    assert [i for i, _ in store.errors()] == [node.ino]
    assert chunk_count(store) == 0
    store.chunker = Chunker()
    # Once it stopped changing it is still not the file the entry was imported as:
    # never migrated with the new content under the old entry (see open_legacy).
    with pytest.raises(SourceError, match="changed in Phase 3"):
        store.read(node.ino, 0, 10**7)
    assert store.getattr(node.ino).state == "legacy"
    assert [i for i, _ in store.errors()] == [node.ino]


# -- reading and writing -------------------------------------------------------------


def test_random_range_reads_equal_the_source(store: Store) -> None:
    rng = random.Random(5)
    for rel, data in FILES.items():
        ino = resolve(store, rel).ino
        for _ in range(30):
            off = rng.randrange(len(data) + 100)
            n = rng.choice([0, 1, 100, 4096, 70_000, 300_000, 10**7])
            assert store.read(ino, off, n) == data[off : off + n], (rel, off, n)
    hl = resolve(store, HARD[0])
    assert store.read(hl.ino, 0, 10**7) == FILES[HARD[1]]


def test_writes_appends_truncates_and_holes(store: Store) -> None:
    rng = random.Random(6)
    for rel in (b"big.bin", b"hello.txt"):
        node = resolve(store, rel)
        model = bytearray(FILES[rel])
        steps: list[tuple[str, int, int]] = [
            ("write", 10, 5000),
            ("write", len(model) - 3, 200_000),  # straddles the end
            ("append", 0, 4096),
            ("write", 3_000_000, 1000),  # past the end: a hole
            ("write", 2_000_000, 300),  # into the hole
            ("truncate", 1_500_000, 0),  # shrink into the hole
            ("truncate", 100_001, 0),  # shrink mid-chunk
            ("truncate", 400_000, 0),  # extend with zeros
            ("write", 399_999, 2),  # across the end of the zeros
            ("truncate", 0, 0),
            ("write", 5, 70_000),  # a file that starts with a hole
        ]
        for _ in range(20):
            steps.append(("write", rng.randrange(500_000), rng.randrange(1, 150_000)))
        for op, off, n in steps:
            if op == "append":
                off = len(model)
            if op == "truncate":
                store.truncate(node.ino, off)
                if off < len(model):
                    del model[off:]
                else:
                    model.extend(bytes(off - len(model)))
            else:
                data = rng.randbytes(n)
                store.write(node.ino, off, data)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + n] = data
            got = store.getattr(node.ino)
            assert got.size == len(model), (op, off, n)
            assert store.read(node.ino, 0, len(model) + 1) == bytes(model), (op, off, n)
            check_invariants(store)
        assert got.state == "migrated"
        assert got.changed


def test_writing_nothing_changes_nothing(store: Store) -> None:
    f = store.create(ROOT_INO, b"nothing", 0o644, 0, 0)
    store.write(f.ino, 100, b"")
    assert store.getattr(f.ino).size == 0
    store.write(f.ino, 0, b"abc")
    store.write(f.ino, 0, b"")
    store.write_spans(f.ino, [(1, b""), (5, b"x")])
    assert store.read(f.ino, 0, 100) == b"abc\0\0x"


def test_two_writes_far_apart_into_one_hole(store: Store) -> None:
    """Both writes land, and the hole between them stays zeros."""
    f = store.create(ROOT_INO, b"holey", 0o644, 0, 0)
    store.truncate(f.ino, 5_000_000)
    store.write_spans(f.ino, [(20, b"hello"), (3_000_000, b"world")])
    assert store.read(f.ino, 20, 5) == b"hello"
    assert store.read(f.ino, 3_000_000, 5) == b"world"
    assert store.read(f.ino, 0, 10**7) == (
        bytes(20) + b"hello" + bytes(3_000_000 - 25) + b"world" + bytes(2_000_000 - 5)
    )
    check_invariants(store)
    g = store.create(ROOT_INO, b"holier", 0o644, 0, 0)
    store.truncate(g.ino, 10_000_000)
    spans = [(i * 2_000_000 + 7, b"span %d" % i) for i in range(5)]
    store.write_spans(g.ino, spans)
    model = bytearray(10_000_000)
    for off, data in spans:
        model[off : off + len(data)] = data
    assert store.read(g.ino, 0, 10**8) == model
    check_invariants(store)


def test_spans_that_swap_a_files_chunks(store: Store) -> None:
    """One span takes over the chunk another span gives up, in one commit."""
    rng = random.Random(7)
    x, y = rng.randbytes(20_000), rng.randbytes(20_000)
    f = store.create(ROOT_INO, b"swap", 0o644, 0, 0)
    store.write(f.ino, 0, x)
    store.truncate(f.ino, 3_000_000)
    store.write(f.ino, 2_500_000, y)
    with deadline(20):
        store.write_spans(f.ino, [(0, y), (2_500_000, x)])
    assert store.read(f.ino, 0, 20_000) == y
    assert store.read(f.ino, 2_500_000, 20_000) == x
    check_invariants(store)


def test_appending_to_a_large_file_rechunks_only_its_tail(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 100 << 20
    data = random.Random(8).randbytes(size)
    f = store.create(ROOT_INO, b"large", 0o644, 0, 0)
    for off in range(0, size, 16 << 20):
        store.write(f.ino, off, data[off : off + (16 << 20)])
    before = raw(store).extents[f.ino]
    assert len(before) > 300
    loads: list[bytes] = []
    real_load = cas.load

    def counting_load(txn: Any, d: bytes, n: int, cache: Any) -> bytes:
        loads.append(d)
        return real_load(txn, d, n, cache)

    monkeypatch.setattr(cas, "load", counting_load)
    monkeypatch.setattr(store, "cache", cas.ChunkCache())
    store.write(f.ino, size, b"t" * 4096)
    monkeypatch.undo()
    after = raw(store).extents[f.ino]
    changed = set(after) ^ set(before)
    assert len(changed) <= 6, changed
    assert min(off for off, _, _ in changed) >= before[-2][0]
    assert len(loads) <= 1
    assert store.read(f.ino, size - 10, 10**6) == data[-10:] + b"t" * 4096


# -- dedup and reference counts -------------------------------------------------------


def test_identical_files_share_chunks_and_free_them_at_the_last_unlink(store: Store) -> None:
    d1, d2 = store.lookup(ROOT_INO, b"dup1.bin"), store.lookup(ROOT_INO, b"dup2.bin")
    store.read(d1.ino, 0, 1)
    n1 = chunk_count(store)
    assert n1 >= 3
    store.read(d2.ino, 0, 1)
    assert chunk_count(store) == n1
    r = check_invariants(store)
    assert set(r.refs.values()) == {2}
    assert {d for _, d, _ in r.extents[d1.ino]} == {d for _, d, _ in r.extents[d2.ino]}
    store.read(store.lookup(ROOT_INO, b"hello.txt").ino, 0, 1)
    base = chunk_count(store)
    store.unlink(ROOT_INO, b"dup1.bin")
    assert chunk_count(store) == base
    r = check_invariants(store)
    store.unlink(ROOT_INO, b"dup2.bin")
    assert chunk_count(store) == base - n1
    r = check_invariants(store)
    assert not (set(r.refs) & {digest(SHARED[:1])})
    assert d2.ino not in r.inodes and d2.ino not in r.extents


def test_overwriting_a_shared_chunk_keeps_the_other_copy(store: Store) -> None:
    d1, d2 = store.lookup(ROOT_INO, b"dup1.bin"), store.lookup(ROOT_INO, b"dup2.bin")
    store.write(d1.ino, 100, b"changed")
    assert store.read(d2.ino, 0, 10**6) == SHARED
    want = SHARED[:100] + b"changed" + SHARED[107:]
    assert store.read(d1.ino, 0, 10**6) == want
    store.truncate(d2.ino, 0)
    assert store.read(d1.ino, 0, 10**6) == want
    check_invariants(store, deep=True)


def test_hard_links_share_content_and_unlink_keeps_the_other_name(store: Store) -> None:
    store.import_all()
    a = resolve(store, HARD[0])
    assert a.nlink == 2
    store.write(a.ino, 0, b"via a")
    b = resolve(store, HARD[1])
    assert store.read(b.ino, 0, 5) == b"via a"
    s1 = resolve(store, b"sessions/s1")
    store.unlink(s1.ino, b"log.jsonl")
    assert store.getattr(a.ino).nlink == 1
    assert store.read(a.ino, 0, 5) == b"via a"
    store.link(a.ino, ROOT_INO, b"again")
    assert store.getattr(a.ino).nlink == 2
    with pytest.raises(NotPermitted):
        store.link(s1.ino, ROOT_INO, b"dirlink")
    with pytest.raises(Exists):
        store.link(a.ino, ROOT_INO, b"hello.txt")


def test_hard_link_in_a_dir_listed_after_the_other_name_is_gone(store: Store) -> None:
    """Phase 3 links in two directories: unlinking the one imported first must not
    break importing the other directory."""
    s1 = resolve(store, b"sessions/s1")
    store.unlink(s1.ino, b"log.jsonl")
    s2 = resolve(store, b"sessions/s2")
    node = store.lookup(s2.ino, b"hardlink")
    assert store.read(node.ino, 0, 10**7) == FILES[HARD[1]]


def test_an_orphan_survives_until_forgotten(env: Env) -> None:
    s = env.open(keep_orphans=True)
    if True:
        s2 = resolve(s, b"sessions/s2")
        s1 = resolve(s, b"sessions/s1")
        log = s.lookup(s1.ino, b"log.jsonl")
        s.unlink(s1.ino, b"log.jsonl")
        # The other Phase 3 name of the orphan is imported now.
        assert s.read(s.lookup(s2.ino, b"hardlink").ino, 0, 10**7) == FILES[HARD[1]]
        s.forget(log.ino)
        assert s.read(s.lookup(s2.ino, b"hardlink").ino, 0, 10**7) == FILES[HARD[1]]
        check_invariants(s)
        big = s.lookup(ROOT_INO, b"big.bin")
        s.read(big.ino, 0, 1)
        s.unlink(ROOT_INO, b"big.bin")
        assert s.read(big.ino, 0, 10**7) == FILES[b"big.bin"]
        check_invariants(s)
        s.forget(big.ino)
        with pytest.raises(NotFound):
            s.getattr(big.ino)


@pytest.mark.parametrize("env", ["lmdb"], indirect=True)  # reopening needs a disk
def test_orphans_left_at_close_are_purged_on_open(env: Env) -> None:
    s = env.open(keep_orphans=True)
    orphans = []
    for rel in (b"big.bin", b"dup1.bin", b"caf\xe9-latin1.json", b"sessions/s1/shot.png"):
        node = resolve(s, rel)
        s.read(node.ino, 0, 1)
        parent = resolve(s, rel.rpartition(b"/")[0]) if b"/" in rel else s.getattr(ROOT_INO)
        s.unlink(parent.ino, rel.rpartition(b"/")[2])
        orphans.append(node.ino)
    s.write(s.lookup(ROOT_INO, b"dup2.bin").ino, 0, b"keep me")
    s = env.reopen(s, keep_orphans=True)
    r = check_invariants(s, deep=True)
    assert not set(orphans) & set(r.inodes)
    assert s.read(s.lookup(ROOT_INO, b"dup2.bin").ino, 0, 10**6) == b"keep me" + SHARED[7:]


# -- namespace -------------------------------------------------------------------------


def test_rename_plain_noreplace_and_exchange(store: Store) -> None:
    s1 = resolve(store, b"sessions/s1")
    s2 = resolve(store, b"sessions/s2")
    hello = store.lookup(ROOT_INO, b"hello.txt")
    store.rename(ROOT_INO, b"hello.txt", s1.ino, b"moved")
    with pytest.raises(NotFound):
        store.lookup(ROOT_INO, b"hello.txt")
    assert store.lookup(s1.ino, b"moved").ino == hello.ino
    assert store.read(hello.ino, 0, 100) == FILES[b"hello.txt"]
    with pytest.raises(Exists):
        store.rename(s1.ino, b"moved", s1.ino, b"shot.png", RENAME_NOREPLACE)
    shot = store.lookup(s1.ino, b"shot.png")
    # EXCHANGE a file and a directory across directories.
    root_nlink, s1_nlink = store.getattr(ROOT_INO).nlink, store.getattr(s1.ino).nlink
    store.rename(s1.ino, b"moved", ROOT_INO, b"emptydir", RENAME_EXCHANGE)
    assert store.lookup(ROOT_INO, b"emptydir").ino == hello.ino
    empty = store.lookup(s1.ino, b"moved")
    assert empty.is_dir
    assert store.getattr(ROOT_INO).nlink == root_nlink - 1
    assert store.getattr(s1.ino).nlink == s1_nlink + 1
    check_invariants(store)
    # Exchanging a directory with a file inside it would make a cycle.
    with pytest.raises(Invalid):
        store.rename(s1.ino, b"moved", ROOT_INO, b"sessions", RENAME_EXCHANGE)
    store.rename(ROOT_INO, b"emptydir", s1.ino, b"moved", RENAME_EXCHANGE)
    assert store.lookup(ROOT_INO, b"emptydir").is_dir
    check_invariants(store)
    with pytest.raises(NotFound):
        store.rename(ROOT_INO, b"hello.txt", ROOT_INO, b"nope", RENAME_EXCHANGE)
    # Replacing: the old target's content goes, the moved file keeps its inode.
    store.rename(s1.ino, b"moved", s2.ino, b"log.jsonl")
    assert store.lookup(s2.ino, b"log.jsonl").ino == hello.ino
    assert store.read(shot.ino, 0, 10**6) == FILES[b"sessions/s1/shot.png"]
    check_invariants(store)


def test_rename_a_directory_into_its_own_subtree_is_invalid(store: Store) -> None:
    sessions = store.lookup(ROOT_INO, b"sessions")
    deep = resolve(store, b"sessions/deep/a/b")
    with pytest.raises(Invalid) as e:
        store.rename(ROOT_INO, b"sessions", deep.ino, b"loop")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(Invalid):
        store.rename(ROOT_INO, b"sessions", sessions.ino, b"self")
    c = resolve(store, b"sessions/deep/a/b/c")
    with pytest.raises(Invalid):
        store.rename(ROOT_INO, b"sessions", c.ino, b"c2", RENAME_EXCHANGE)
    store.rename(deep.ino, b"c", ROOT_INO, b"c")  # moving up is fine
    assert store.lookup(ROOT_INO, b"c").ino == c.ino
    check_invariants(store)


def test_rename_over_directories(store: Store) -> None:
    store.import_all()
    e = store.mkdir(ROOT_INO, b"e", 0o755, 0, 0)
    with pytest.raises(IsADir):
        store.rename(ROOT_INO, b"hello.txt", ROOT_INO, b"e")
    with pytest.raises(NotADir):
        store.rename(ROOT_INO, b"e", ROOT_INO, b"hello.txt")
    with pytest.raises(NotEmpty):
        store.rename(ROOT_INO, b"e", ROOT_INO, b"sessions")
    nlink = store.getattr(ROOT_INO).nlink
    store.rename(ROOT_INO, b"sessions", ROOT_INO, b"e")  # over an empty dir
    assert store.getattr(ROOT_INO).nlink == nlink - 1
    with pytest.raises(NotFound):
        store.getattr(e.ino)
    # Same inode under both names: nothing happens.
    hl = resolve(store, b"e/s2/hardlink")
    s2 = resolve(store, b"e/s2")
    store.link(hl.ino, s2.ino, b"third")
    store.rename(s2.ino, b"third", s2.ino, b"hardlink")
    assert store.getattr(hl.ino).nlink == 3
    check_invariants(store)


def test_unlink_and_rmdir(store: Store) -> None:
    sessions = store.lookup(ROOT_INO, b"sessions")
    with pytest.raises(NotEmpty) as e:
        store.rmdir(ROOT_INO, b"sessions")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(IsADir):
        store.unlink(ROOT_INO, b"sessions")
    with pytest.raises(NotADir):
        store.rmdir(ROOT_INO, b"hello.txt")
    with pytest.raises(NotFound):
        store.unlink(ROOT_INO, b"nothing")
    with pytest.raises(NotFound):
        store.rmdir(ROOT_INO, b"nothing")
    nlink = store.getattr(ROOT_INO).nlink
    store.rmdir(ROOT_INO, b"emptydir")
    assert store.getattr(ROOT_INO).nlink == nlink - 1
    with pytest.raises(NotFound):
        store.lookup(ROOT_INO, b"emptydir")
    for name in (b"link", b"escape", b"empty"):
        store.unlink(ROOT_INO, name)
    store.unlink(sessions.ino, b"fifo")
    d = store.mkdir(sessions.ino, b"new", 0o700, 1, 2)
    assert (d.uid, d.gid, stat.S_IMODE(d.mode)) == (1, 2, 0o700)
    assert store.getattr(sessions.ino).nlink == 2 + 4
    store.rmdir(sessions.ino, b"new")
    with pytest.raises(NotADir):
        store.create(store.lookup(ROOT_INO, b"hello.txt").ino, b"x", 0o644, 0, 0)
    with pytest.raises(Exists):
        store.create(ROOT_INO, b"hello.txt", 0o644, 0, 0)
    with pytest.raises(Exists):
        store.mkdir(ROOT_INO, b"sessions", 0o755, 0, 0)
    check_invariants(store)


def test_new_nodes_and_setattr(store: Store) -> None:
    f = store.create(ROOT_INO, b"new", 0o640, 7, 8)
    assert (stat.S_IFMT(f.mode), stat.S_IMODE(f.mode), f.uid, f.gid) == (stat.S_IFREG, 0o640, 7, 8)
    ln = store.symlink(ROOT_INO, b"sl", b"/anywhere/\xff", 7, 8)
    assert store.readlink(ln.ino) == b"/anywhere/\xff"
    with pytest.raises(Invalid):
        store.readlink(f.ino)
    fifo = store.mknod(ROOT_INO, b"ff", stat.S_IFIFO | 0o600, 0, 0)
    assert stat.S_ISFIFO(store.getattr(fifo.ino).mode)
    with pytest.raises(Invalid):
        store.mknod(ROOT_INO, b"dd", stat.S_IFDIR | 0o755, 0, 0)
    n = store.setattr(f.ino, mode=0o4711, uid=9, gid=10, mtime_ns=123, atime_ns=456)
    assert (stat.S_IMODE(n.mode), n.uid, n.gid, n.mtime_ns, n.atime_ns) == (0o4711, 9, 10, 123, 456)
    assert stat.S_ISREG(n.mode)
    store.setattr(f.ino, size=10)
    assert store.read(f.ino, 0, 100) == bytes(10)
    with pytest.raises(IsADir):
        store.truncate(ROOT_INO, 0)
    with pytest.raises(IsADir):
        store.write(ROOT_INO, 0, b"x")
    with pytest.raises(Invalid):
        store.truncate(f.ino, -1)


def test_truncating_a_legacy_file_to_zero_never_reads_it(
    env: Env, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = store.lookup(ROOT_INO, b"big.bin")
    monkeypatch.setattr(ingest, "prepare_migration", lambda *a, **k: pytest.fail("read the source"))
    store.truncate(node.ino, 0)
    assert store.read(node.ino, 0, 10) == b""
    store.write(node.ino, 0, b"new")
    assert store.read(node.ino, 0, 10) == b"new"


def test_xattrs(store: Store) -> None:
    f = store.lookup(ROOT_INO, b"hello.txt")
    with pytest.raises(NoData) as e:
        store.getxattr(f.ino, b"user.a")
    assert e.value.errno == errno.ENODATA
    store.setxattr(f.ino, b"user.a", b"1")
    store.setxattr(f.ino, b"user.b", b"\x00\xff", XATTR_CREATE)
    with pytest.raises(Exists):
        store.setxattr(f.ino, b"user.a", b"2", XATTR_CREATE)
    with pytest.raises(NoData):
        store.setxattr(f.ino, b"user.c", b"2", XATTR_REPLACE)
    store.setxattr(f.ino, b"user.a", b"2", XATTR_REPLACE)
    assert store.getxattr(f.ino, b"user.a") == b"2"
    assert store.getxattr(f.ino, b"user.b") == b"\x00\xff"
    assert sorted(store.listxattr(f.ino)) == [b"user.a", b"user.b"]
    assert store.listxattr(store.lookup(ROOT_INO, b"big.bin").ino) == []
    store.removexattr(f.ino, b"user.a")
    with pytest.raises(NoData):
        store.removexattr(f.ino, b"user.a")
    assert store.listxattr(f.ino) == [b"user.b"]
    store.unlink(ROOT_INO, b"hello.txt")
    assert raw(store).inodes.get(f.ino) is None
    with store.backend.read() as txn:
        assert list(txn.range("xattrs", U64.pack(f.ino), U64.pack(f.ino + 1))) == []


# -- faults ---------------------------------------------------------------------------


def test_a_corrupt_chunk_reads_as_eio_never_as_wrong_bytes(store: Store) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    files = [(store.lookup(ROOT_INO, n), FILES[n]) for n in (b"caf\xe9-latin1.json", b"big.bin")]
    for node, _ in files:
        store.read(node.ino, 0, 1)
    codecs = set()
    for node, data in files:
        for i in range(16):
            _, d, _ = rng.choice(raw(store).extents[node.ino])
            codecs.add(raw(store).chunks[d][0])
            # Every other time in the header (codec, dictionary id, zstd frame header).
            old = damage_chunk(store, d, rng) if i % 2 else damage_chunk(store, d, rng, 0, 12)
            with pytest.raises(CorruptChunk) as e:
                store.read(node.ino, 0, len(data))
            assert e.value.errno == errno.EIO, seed
            assert e.value.digest == d, seed
            with store.backend.write() as txn:
                txn.put("chunks", d, old)
            store.cache = cas.ChunkCache()
    assert codecs == {0, 1}  # random bytes are kept raw, JSON compressed: both checked
    for node, data in files:
        assert store.read(node.ino, 0, 10**7) == data


def test_read_or_heal_heals_from_phase3_or_sets_failsafe_before_raising(store: Store) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    big = store.lookup(ROOT_INO, b"big.bin")
    store.migrate(big.ino)
    _, d, _ = rng.choice(raw(store).extents[big.ino])
    damage_chunk(store, d, rng)
    data, healed = store.read_or_heal(big.ino, 0, 10**7)
    assert healed and data is not None and bytes(data) == FILES[b"big.bin"], seed
    assert store.failsafe is None
    # Changed through the mount: Phase 3 holds another version, nothing to heal from.
    store.write(big.ino, 0, b"changed")
    _, d, _ = rng.choice(raw(store).extents[big.ino])
    damage_chunk(store, d, rng)
    with pytest.raises(CorruptChunk) as e:
        store.read_or_heal(big.ino, 0, 10**7)
    assert e.value.digest == d, seed
    assert store.failsafe is not None and d.hex()[:16] in store.failsafe
    with pytest.raises(ReadOnly):  # writes stop until fsck has looked
        store.create(ROOT_INO, b"new", 0o644, UID, GID)


def test_forget_in_failsafe_leaves_the_orphan_for_the_next_open(env: Env) -> None:
    # The kernel forgets inodes whenever it likes, failsafe or not: no error then.
    store = env.open(keep_orphans=True)
    f = store.create(ROOT_INO, b"gone", 0o644, UID, GID)
    store.write(f.ino, 0, b"bytes")
    store.unlink(ROOT_INO, b"gone")
    store.failsafe = "a chunk is corrupt"
    store.forget(f.ino)
    assert raw(store).orphans == {f.ino}
    if env.lmdb:
        store = env.reopen(store)
        assert raw(store).orphans == set()
        with pytest.raises(NotFound):
            store.getattr(f.ino)


@pytest.fixture
def big(store: Store, monkeypatch: pytest.MonkeyPatch) -> Inode:
    """big.bin, with STAGE_BYTES lowered so that migrating it stages chunks first
    (it has more than 100_000 bytes of new chunks). A test's `monkeypatch.undo()`
    restores STAGE_BYTES too."""
    monkeypatch.setattr(ingest, "STAGE_BYTES", 100_000)
    return store.lookup(ROOT_INO, b"big.bin")


def assert_big_migrated(store: Store, big: Inode) -> None:
    assert raw(store).pending == set()
    assert store.read(big.ino, 0, 10**7) == FILES[b"big.bin"]
    check_invariants(store, deep=True)


def test_preparing_a_migration_opens_no_write_transaction(
    store: Store, big: Inode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Preparing runs on low-priority threads: a write there would hold the writer
    # behind a starved thread. Its new chunks are written by the commit.

    def no_write() -> None:
        raise AssertionError("a write transaction while preparing a migration")

    monkeypatch.setattr(store.backend, "write", no_write)
    m = store.prepare_migration(big.ino)
    monkeypatch.undo()
    assert m is not None and len(m.records) > 1
    assert raw(store).chunks == {}
    assert [n.ino for n in store.commit_migrations([m])] == [big.ino]
    assert_big_migrated(store, big)


def test_a_big_migration_hands_its_chunks_to_the_callers_spill_in_bounded_groups(
    store: Store, big: Inode
) -> None:
    groups: list[int] = []

    def spill(records: dict[bytes, bytes]) -> None:
        groups.append(sum(map(len, records.values())))
        store.stage_chunks(records)

    m = store.prepare_migration(big.ino, spill=spill)
    assert m is not None and len(groups) >= 2, groups
    # A group is cut at the first chunk past the bound: at most one chunk more.
    assert max(groups) <= 100_000 + store.chunker.max_size, groups
    assert raw(store).pending == set(m.staged) and set(raw(store).chunks) == set(m.staged)
    store.commit_migrations([m])
    assert_big_migrated(store, big)


def test_a_failed_migration_commit_leaves_the_file_legacy(
    env: Env, store: Store, big: Inode, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = resolve(store, b"sessions/s1/log.jsonl")
    real = ingest.commit_extents
    calls = []

    def half_then_fail(txn: Any, m: ingest.Migration) -> None:
        real(txn, m)
        calls.append(m.ino)
        if len(calls) == 2:
            raise RuntimeError("crash inside the commit")

    monkeypatch.setattr(ingest, "commit_extents", half_then_fail)
    ms = [store.prepare_migration(i, spill=store.stage_chunks) for i in (log.ino, big.ino)]
    assert all(m is not None for m in ms)
    with pytest.raises(RuntimeError):
        store.commit_migrations([m for m in ms if m is not None])
    monkeypatch.undo()
    for i in (big.ino, log.ino):
        assert store.getattr(i).state == "legacy"
    r = raw(store)
    assert r.extents == {}
    assert r.refs == {}
    assert set(r.chunks) <= r.pending  # only the staged chunks, freed on open
    if env.lmdb:
        store = env.reopen(store)
        r = raw(store)
        assert (r.chunks, r.refs, r.pending) == ({}, {}, set())
        big = store.getattr(big.ino)
    assert store.read(big.ino, 0, 10**7) == FILES[b"big.bin"]
    check_invariants(store, deep=True)


# -- opening and reopening -------------------------------------------------------------


@pytest.mark.parametrize("env", ["lmdb"], indirect=True)  # reopening needs a disk
def test_reopen_keeps_everything(env: Env, store: Store) -> None:
    migrate_all(store)
    f = store.create(ROOT_INO, b"written", 0o600, 1, 2)
    store.write(f.ino, 0, b"after the import")
    store.setxattr(f.ino, b"user.k", b"v")
    store.rename(ROOT_INO, b"hello.txt", ROOT_INO, b"hi")
    before = walk_store(store)
    st = store.stats()
    store = env.reopen(store)
    assert walk_store(store) == before
    assert store.getxattr(f.ino, b"user.k") == b"v"
    assert store.stats().chunks == st.chunks
    assert store.stats().files_migrated == st.files_migrated
    check_invariants(store, deep=True)
    # A new file after reopening gets a fresh inode number.
    g = store.create(ROOT_INO, b"later", 0o600, 0, 0)
    assert g.ino > max(e.ino for e in before.values())


@pytest.mark.parametrize("env", ["lmdb"], indirect=True)  # reopening needs a disk
def test_a_second_writer_is_locked_out_and_a_reader_may_open(env: Env, store: Store) -> None:
    store.read(store.lookup(ROOT_INO, b"hello.txt").ino, 0, 1)
    with pytest.raises(StoreLocked) as e:
        Store.open(env.path)
    assert e.value.exit_code != 0
    with pytest.raises(StoreLocked):
        Store.open(env.path, source=str(env.src), create=True)
    code = (
        "import sys; from ferryfs.store.store import Store\n"
        "s = Store.open(sys.argv[1], readonly=True)\n"
        "st = s.stats(); print(st.files_total, st.files_migrated)\n"
        "from ferryfs.store.errors import ReadOnly\n"
        "try:\n    s.create(1, b'x', 0o644, 0, 0)\nexcept ReadOnly:\n    print('ro')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, env.path], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(store.stats().files_total), "1", "ro"]
    env.close()
    env.live = Store.open(env.path)  # the lock went with the writer


@pytest.mark.parametrize("env", ["lmdb"], indirect=True)  # reopening needs a disk
def test_another_schema_version_is_refused(env: Env, store: Store) -> None:
    env.close()
    be = LmdbBackend(os.path.join(env.path, "db"))
    with be.write() as txn:
        txn.put("meta", b"schema", U64.pack(99))
    be.close()
    with pytest.raises(SchemaMismatch) as e:
        Store.open(env.path)
    assert e.value.exit_code != 0
    assert "99" in str(e.value)
    with pytest.raises(SchemaMismatch):
        Store.open(env.path, readonly=True)

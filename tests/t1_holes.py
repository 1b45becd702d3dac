"""Holes: a file grown by truncate or by a write far past its end keeps the gap as
one HOLE extent. Reads of any range give the right bytes (zeros in holes) in
memory sized by the read, never by the hole; writes into a hole store only what
was written; nothing stored grows with a hole's length; fsck counts holes in the
tiling, ignores them in reference counts, hashes them in bounded memory, and
reports a file whose extents cannot be read.

Tiers: the store (no FUSE), the write buffer, fsck through its CLI, a real mount.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import lmdb
import pytest
from ferryfs.fs.handles import OpenFile
from ferryfs.store.cas import ChunkCache
from ferryfs.store.chunker import MIN_SIZE
from ferryfs.store.content import hash_chunks
from ferryfs.store.errors import CorruptChunk
from ferryfs.store.kv import Txn
from ferryfs.store.records import CHANGED, HOLE, ROOT_INO, U64, Inode, extent_key
from ferryfs.store.store import Store
from helpers.mount import mounted, wait_for
from helpers.store import SparseFile, check_invariants, deadline, raw

GiB = 1 << 30
MiB = 1 << 20
ORIGINAL = b"the first bytes of a small session file\n" * 3


def peak_of(fn: Callable[[], object]) -> tuple[object, int]:
    """(result, tracemalloc peak in bytes) of `fn()`."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def small(tmp_path: Path) -> Iterator[tuple[Store, int]]:
    """An LMDB store over a Phase 3 tree of one small file, migrated."""
    src = tmp_path / "phase3"
    src.mkdir()
    (src / "s.json").write_bytes(ORIGINAL)
    s = Store.open(str(tmp_path / "store"), source=str(src), create=True)
    try:
        ino = s.lookup(ROOT_INO, b"s.json").ino
        s.migrate(ino)
        yield s, ino
    finally:
        s.close()


def stored_bytes(s: Store) -> int:
    return sum(len(v) for v in raw(s).chunks.values())


def agree(s: Store, ino: int, m: SparseFile) -> None:
    """The store and the model agree on the size, on every data run and on the
    edges of every hole (the whole hole would be gigabytes of zeros to compare)."""
    assert s.getattr(ino).size == m.size
    runs = s.data_ranges(ino)
    assert sum(n for _, n, _ in runs) == m.size
    for off, n, hole in runs:
        if hole:
            for at in {off, max(off, off + n - 4096)}:
                assert s.read(ino, at, min(n, 4096)) == m.read(at, min(n, 4096)), at
        else:
            assert s.read(ino, off, n) == m.read(off, n), off
    for at in (0, m.size - 10, m.size, m.size + 5):
        assert s.read(ino, max(0, at), 100) == m.read(max(0, at), 100), at
    check_invariants(s)


# -- the store ---------------------------------------------------------------------------


def test_a_small_file_grown_to_64_gib_and_written_at_100_gib_reads_right_in_bounded_memory(
    small: tuple[Store, int],
) -> None:
    s, ino = small
    before = stored_bytes(s)
    s.truncate(ino, 64 * GiB)
    s.write(ino, 100 * GiB, b"!")
    assert s.getattr(ino).size == 100 * GiB + 1
    # The original bytes, also by a read that runs on into the hole (as the kernel's do).
    assert s.read(ino, 0, len(ORIGINAL)) == ORIGINAL
    got, peak = peak_of(lambda: s.read(ino, 0, 128 * 1024))
    assert got == ORIGINAL + bytes(128 * 1024 - len(ORIGINAL))
    assert peak < 2 * 128 * 1024 + 64 * 1024, peak
    # 1 MiB in the middle of the hole costs 1 MiB, not the hole.
    got, peak = peak_of(lambda: s.read(ino, 32 * GiB, MiB))
    assert got == bytes(MiB)
    assert peak < 2 * MiB + 64 * 1024, peak
    # Across the far data byte and past the end of the file.
    assert s.read(ino, 100 * GiB - 3, 10) == b"\0\0\0!"
    assert s.read(ino, 100 * GiB + 1, 10) == b""
    assert s.read(ino, 200 * GiB, 10) == b""
    assert s.data_ranges(ino) == [
        (0, len(ORIGINAL), False),
        (len(ORIGINAL), 100 * GiB - len(ORIGINAL), True),
        (100 * GiB, 1, False),
    ]
    # 100 GiB of holes cost a few records and one tiny chunk, not storage.
    assert stored_bytes(s) - before < 1024
    assert len(raw(s).extents[ino]) <= 4
    check_invariants(s, deep=True)


def test_holes_shrink_regrow_and_take_writes_in_their_middle_and_across_their_edges(
    small: tuple[Store, int],
) -> None:
    s, ino = small
    m = SparseFile(ORIGINAL)

    def do(op: str, *args: int | bytes) -> None:
        getattr(s, op)(ino, *args)
        getattr(m, op)(*args)
        agree(s, ino, m)

    do("truncate", 64 * GiB)
    do("truncate", 3 * GiB + 5)  # shrink inside the hole
    chunks = len(raw(s).chunks)
    payload = random.Random(121).randbytes(100_000)
    do("write", 2 * GiB, payload)  # into the middle of the hole
    # Only the written bytes were chunked (2 GiB of zeros would be thousands of
    # chunks): at most what the payload alone cuts into, every chunk but the last
    # at least MIN_SIZE. (A fixed 2 failed now and then on random payloads.)
    assert len(raw(s).chunks) - chunks <= -(-len(payload) // MIN_SIZE)
    assert sum(n for _, n, h in s.data_ranges(ino) if not h) < len(ORIGINAL) + 2 * len(payload)
    do("truncate", 10 * GiB)  # re-grow: the trailing hole is lengthened, not followed
    assert [h for _, _, h in s.data_ranges(ino)] == [False, True, False, True]
    do("write", len(ORIGINAL) - 10, b"A" * 50)  # from the first data into the hole
    do("write", 2 * GiB - 20, b"B" * 40)  # from the hole into the middle data
    do("write", 2 * GiB + len(payload) - 7, b"C" * 30)  # from that data out into the hole
    do("write", 10 * GiB - 3, b"D" * 9)  # from the trailing hole past the end
    do("truncate", 2 * GiB + 10)  # shrink into data that follows a hole
    do("truncate", len(ORIGINAL) + 30)  # shrink to just past the first data
    do("truncate", 5)
    do("write", 7 * GiB, b"E")  # a write far past the end leaves a hole, not zeros
    assert len(raw(s).chunks) <= 4
    assert stored_bytes(s) < 4096


def test_scattered_writes_into_a_hole_chunk_only_their_bytes(small: tuple[Store, int]) -> None:
    """2,000 one-byte writes 1 MiB apart, one flush: each is its own tiny region with
    holes between, not one 2 GiB buffer of zeros."""
    s, ino = small
    s.truncate(ino, 64 * GiB)
    spans = [(GiB + i * MiB, b"x") for i in range(2000)]
    m = SparseFile(ORIGINAL)
    m.truncate(64 * GiB)
    for off, data in spans:
        m.write(off, data)
    _, peak = peak_of(lambda: s.write_spans(ino, spans))
    assert peak < 16 * MiB, peak
    runs = s.data_ranges(ino)
    assert sum(n for _, n, h in runs if not h) == len(ORIGINAL) + 2000
    assert s.read(ino, GiB + 5 * MiB - 1, 3) == b"\0x\0"
    agree(s, ino, m)


def test_close_writes_in_a_hole_are_chunked_together(small: tuple[Store, int]) -> None:
    """Gaps of a few zeros between writes are filled (as a block filesystem would),
    so the pattern of pwrite(b"x", 2*i) makes a few chunks, not one per byte."""
    s, ino = small
    s.truncate(ino, GiB)
    spans = [(MiB + 2 * i, b"x") for i in range(20_000)]
    s.write_spans(ino, spans)
    assert len(raw(s).chunks) < 10
    assert s.read(ino, MiB, 6) == b"x\0x\0x\0"


def test_store_read_and_data_ranges_of_the_memory_backend_too() -> None:
    s = Store.memory()
    try:
        ino = s.create(ROOT_INO, b"f", 0o644, 0, 0).ino
        s.write(ino, 0, b"abc")
        s.truncate(ino, 1 << 40)  # a TiB
        s.write(ino, (1 << 40) + 10, b"z")
        assert s.read(ino, (1 << 39), 1000) == bytes(1000)
        assert s.data_ranges(ino) == [
            (0, 3, False),
            (3, (1 << 40) + 10 - 3, True),
            ((1 << 40) + 10, 1, False),
        ]
        check_invariants(s)
    finally:
        s.close()


def test_a_gap_between_extents_is_eio_and_never_heals_as_a_whole_hole(
    small: tuple[Store, int],
) -> None:
    """A gap in the tiling reads as CorruptChunk(HOLE); healing must not try to read
    the file's holes back from Phase 3 (a 64 GiB pread)."""
    s, ino = small
    s.truncate(ino, 64 * GiB)
    s.write(ino, 64 * GiB, b"tail")

    def cut(txn: Txn) -> None:
        txn.delete("extents", extent_key(ino, 64 * GiB))

    s.transact(cut)
    with pytest.raises(CorruptChunk) as e:
        s.read(ino, 64 * GiB - 2, 4)
    assert e.value.digest == HOLE
    _, peak = peak_of(lambda: s.heal(ino, HOLE))
    assert peak < MiB


# -- the write buffer --------------------------------------------------------------------


def test_scattered_small_writes_buffer_in_time_proportional_to_their_bytes() -> None:
    """pwrite(b"x", 2*i) 50,000 times: each add visits only the spans it touches
    (summing every span per write made this quadratic: ~100 s for 50,000)."""
    f = OpenFile(1)
    with deadline(20):
        for i in range(50_000):
            f.add(2 * i, b"x")
    assert len(f.spans) == 50_000 and f.dirty_bytes == 50_000
    f.add(1, b"yyy")  # bridges three spans: 0..4 merged
    assert f.spans[0] == (0, bytearray(b"xyyyx"))
    assert f.dirty_bytes == 50_000 - 3 + 5
    assert f.full is False
    f.add(10**12, b"far")  # far past the end: one more span, no gap materialised
    assert f.spans[-1] == (10**12, bytearray(b"far")) and f.dirty_bytes == 50_005


# -- fsck --------------------------------------------------------------------------------


def fsck(store: Path, *args: str) -> tuple[int, dict[str, object]]:
    r = subprocess.run(
        [sys.executable, "-m", "ferryfs.tools.cli", "fsck", str(store), "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in r.stderr, r.stderr
    doc: dict[str, object] = json.loads(r.stdout)
    return r.returncode, doc


def kinds(doc: dict[str, object]) -> set[str]:
    return {p["kind"] for p in doc["problems"]}  # type: ignore[attr-defined, index]


@pytest.fixture
def holey(tmp_path: Path) -> tuple[Path, int]:
    """A closed store holding a migrated file grown by 64 GiB of hole plus a byte."""
    src = tmp_path / "phase3"
    src.mkdir()
    (src / "s.json").write_bytes(ORIGINAL)
    (src / "other.bin").write_bytes(os.urandom(5000))
    with Store.open(str(tmp_path / "store"), source=str(src), create=True) as s:
        ino = s.lookup(ROOT_INO, b"s.json").ino
        s.migrate(ino)
        s.migrate(s.lookup(ROOT_INO, b"other.bin").ino)
        s.truncate(ino, 64 * GiB)
        s.write(ino, 64 * GiB + 7, b"!")
    return tmp_path / "store", ino


def test_fsck_deep_is_clean_on_a_file_with_holes(holey: tuple[Path, int]) -> None:
    store, _ = holey
    assert fsck(store)[0] == 0
    code, doc = fsck(store, "--deep")
    assert code == 0, doc["problems"]


def test_fsck_deep_hashes_a_hole_in_bounded_memory() -> None:
    n = GiB
    h = blake3.blake3()
    for _ in range(n // MiB):
        h.update(bytes(MiB))
    want = h.digest()
    got, peak = peak_of(lambda: hash_chunks([(HOLE, None, n)]))
    assert (got.status, got.digest) == ("ok", want)
    assert peak < 4 * MiB, peak


def _edit_extent(store: Path, ino: int, fn: Callable[[bytes, bytes], tuple[bytes, bytes]]) -> None:
    """Rewrite the first extent of `ino` with lmdb directly (not the code under test)."""
    env = lmdb.open(str(store / "db"), max_dbs=32)
    try:
        db = env.open_db(b"extents")
        with env.begin(write=True) as t:
            k, v = next(_items(t, db, ino))
            t.delete(k, db=db)
            nk, nv = fn(k, v)
            t.put(nk, nv, db=db)
    finally:
        env.close()


def _items(t: lmdb.Transaction, db: lmdb._Database, ino: int) -> Iterator[tuple[bytes, bytes]]:
    c = t.cursor(db=db)
    c.set_range(U64.pack(ino))
    for k, v in c:
        if U64.unpack(k[:8])[0] != ino:
            return
        yield bytes(k), bytes(v)


def test_fsck_reports_a_malformed_extent_record_without_deep(holey: tuple[Path, int]) -> None:
    store, ino = holey
    _edit_extent(store, ino, lambda k, v: (k, v[:-1]))  # a value one byte short
    for args in ((), ("--deep",)):
        code, doc = fsck(store, *args)
        assert code == 4, doc
        assert "malformed-extent" in kinds(doc), doc["problems"]


def test_fsck_reports_an_extent_whose_length_its_chunk_does_not_have(
    holey: tuple[Path, int], tmp_path: Path
) -> None:
    """The first extent of a changed file says one byte more than its chunk holds
    (the file's size too, so the tiling is right): reads must get EIO, never
    short bytes, and fsck must say so without --deep."""
    store, ino = holey
    _edit_extent(store, ino, lambda k, v: (k, v[:32] + U64.pack(U64.unpack(v[32:])[0] + 1)))
    env = lmdb.open(str(store / "db"), max_dbs=32)
    try:
        inodes, extents = env.open_db(b"inodes"), env.open_db(b"extents")
        with env.begin(write=True) as t:
            node = Inode.unpack(ino, t.get(U64.pack(ino), db=inodes))
            assert node.flags & CHANGED
            # Shift every later extent by one, and the size: only the length is wrong.
            later = [(k, v) for k, v in _items(t, extents, ino)][1:]
            for k, _ in later:
                t.delete(k, db=extents)
            for k, v in later:
                t.put(extent_key(ino, U64.unpack(k[8:])[0] + 1), v, db=extents)
            node.size += 1
            t.put(U64.pack(ino), node.pack(), db=inodes)
    finally:
        env.close()
    code, doc = fsck(store)
    assert code == 4, doc
    assert "extent-length-differs" in kinds(doc), doc["problems"]
    with Store.open(str(store), readonly=True) as s, pytest.raises(CorruptChunk):
        s.read(ino, 0, 10)


def test_fsck_reports_an_extent_naming_a_missing_chunk_without_deep(
    holey: tuple[Path, int],
) -> None:
    store, ino = holey
    _edit_extent(store, ino, lambda k, v: (k, bytes(31) + b"\1" + v[32:]))
    code, doc = fsck(store)
    assert code == 4, doc
    assert "missing-chunk" in kinds(doc), doc["problems"]


# -- a real mount ------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_truncate_64g_through_the_mount_keeps_the_file_readable(tmp_path: Path) -> None:
    src = tmp_path / "phase3"
    src.mkdir()
    (src / "s.json").write_bytes(ORIGINAL)
    (tmp_path / "mnt").mkdir()
    store = tmp_path / "store"
    with mounted(src, tmp_path / "mnt", store) as m:
        f = m.mnt / "s.json"
        assert f.read_bytes() == ORIGINAL  # migrates it (behind the read)
        wait_for(lambda: m.state(f) == "migrated", 30, "s.json to migrate")
        assert m.pid is not None
        rss0 = rss_kib(m.pid)
        subprocess.run(["truncate", "-s", "64G", str(f)], check=True, timeout=60)
        assert f.stat().st_size == 64 * GiB
        head = subprocess.run(["head", "-c", "100", str(f)], capture_output=True, timeout=60)
        assert head.returncode == 0 and head.stdout == ORIGINAL[:100]
        fd = os.open(f, os.O_RDWR)
        try:
            assert os.pread(fd, MiB, 32 * GiB) == bytes(MiB)
            assert os.pread(fd, 4096, 64 * GiB - 10) == bytes(10)
            os.pwrite(fd, b"far", 100 * GiB)
            os.fsync(fd)
            assert os.pread(fd, 10, 100 * GiB - 2) == b"\0\0far"
            assert os.pread(fd, MiB, 80 * GiB) == bytes(MiB)
            # Scattered writes into the hole, one flush: each its own small region.
            for i in range(2000):
                os.pwrite(fd, b"y", GiB + i * MiB)
            os.fsync(fd)
            assert os.pread(fd, 3, GiB + 7 * MiB - 1) == b"\0y\0"
        finally:
            os.close(fd)
        assert f.stat().st_size == 100 * GiB + 3
        grown = rss_kib(m.pid) - rss0
        assert grown < 64 * 1024, f"daemon RSS grew by {grown} KiB"
    assert (src / "s.json").read_bytes() == ORIGINAL
    code, doc = fsck(store, "--deep")
    assert code == 0, doc["problems"]
    with Store.open(str(store), readonly=True) as s:
        ino = s.lookup(ROOT_INO, b"s.json").ino
        runs = s.data_ranges(ino)
        assert [h for _, _, h in runs] == [False, True] + [False, True] * 2000 + [False]
        assert sum(n for _, n, h in runs if not h) == len(ORIGINAL) + 2000 + 3


def test_scattered_writes_over_a_large_file_re_chunk_it_in_bounded_pieces(
    small: tuple[Store, int],
) -> None:
    """One byte every 4 KiB of a 64 MiB file, one flush: every chunk changes, but it is
    re-chunked in regions of about REGION_MAX, not from one 64 MiB buffer."""
    s, ino = small
    size = 64 * MiB
    body = b"".join(b"line %010d\n" % i for i in range(size // 16))
    for off in range(0, size, 4 * MiB):
        s.write(ino, off, body[off : off + 4 * MiB])
    s.cache = ChunkCache(limit=0)  # count the plan's buffers, not cached chunks
    spans = [(off, b"#") for off in range(0, size, 4096)]
    _, peak = peak_of(lambda: s.write_spans(ino, spans))
    assert peak < 40 * MiB, peak  # REGION_MAX is 16 MiB
    want = bytearray(body)
    for off, _ in spans:
        want[off] = ord("#")
    for off in range(0, size, 8 * MiB):
        assert s.read(ino, off, 8 * MiB) == want[off : off + 8 * MiB]
    check_invariants(s)

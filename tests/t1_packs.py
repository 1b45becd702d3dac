"""Chunk records, version 2 (store/packs.py): small records packed together.

Records of every size round-trip through packs on both backends; fsck finds a
pack whose accounting is wrong and a chunk pointing outside its pack, and
--repair mends them; compaction survives a crash at any step (simulated, and a
real kill -9) with every chunk readable exactly once; a store written before
packs (a3f786f, tests/data) opens, reads exactly and upgrades in idle steps.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ferryfs.store import cas, content, fsck_packs, packs, upkeep
from ferryfs.store.errors import CorruptChunk, NotFound
from ferryfs.store.fsck import Checker
from ferryfs.store.fsck_repair import repair
from ferryfs.store.records import ROOT_INO, SCHEMA_VERSION, U64
from ferryfs.store.store import Store
from helpers.damage import Crash, crash_at_transaction, kill_midway
from helpers.store import check_invariants, migrate_everything, schema1_store

REG = stat.S_IFREG | 0o644


@pytest.fixture(params=["memory", "lmdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = (
        Store.memory()
        if request.param == "memory"
        else Store.open(str(tmp_path / "s"), create=True)
    )
    try:
        yield s
    finally:
        s.close()


def put_file(s: Store, name: str, data: bytes) -> int:
    ino = s.create(ROOT_INO, name.encode(), REG, 0, 0).ino
    if data:
        s.write(ino, 0, data)
    return ino


def read_all(s: Store, ino: int) -> bytes:
    return s.read(ino, 0, s.getattr(ino).size + 1)


def body(rng: random.Random, n: int) -> bytes:
    """`n` bytes, compressible text or random bytes (records of both kinds)."""
    if rng.random() < 0.5:
        return rng.randbytes(n)
    words = [b"session", b"token", b"chunk", b"agent", rng.randbytes(3).hex().encode()]
    out = b" ".join(rng.choice(words) for _ in range(n // 5 + 1))
    return out[:n]


def pointers(s: Store) -> int:
    with s.backend.read() as txn:
        return sum(1 for _k, v in txn.range("chunks", b"") if packs.is_pointer(v))


def problems(s: Store, deep: bool = False) -> list[str]:
    s.cache = cas.ChunkCache()
    rep = Checker(s, deep=deep, resume=False).run()
    return [f"{p.kind}: {p.detail}" for p in rep.problems]


# -- round trip -------------------------------------------------------------------------------


SIZES = sorted(
    set(range(0, 70))
    | {(1 << k) + d for k in range(6, 23) for d in (-1, 0, 1)}
    | {packs.PACK_MAX - 6, packs.PACK_MAX - 5, packs.PACK_MAX + 1, 3 << 20, (5 << 20) + 7}
)


def test_records_of_every_size_round_trip_through_packs(store: Store) -> None:
    rng = random.Random(8)
    want: dict[int, bytes] = {}
    for n in SIZES:
        data = body(rng, n)
        want[put_file(store, f"f{n}", data)] = data
    for i in range(300):  # enough small records to fill more than one pack
        data = rng.randbytes(rng.randrange(1, 8000))
        want[put_file(store, f"small{i}", data)] = data
    for ino, data in want.items():
        assert read_all(store, ino) == data, f"inode {ino}: {len(data)} bytes"
    with store.backend.read() as txn:
        assert len(list(packs.all_info(txn))) > 1
    assert pointers(store) > 300
    check_invariants(store, deep=True)
    assert problems(store, deep=True) == []


def test_a_small_commit_does_not_rewrite_a_big_open_pack(store: Store) -> None:
    """A close through the mount adds one small chunk in its own transaction: it must
    not rewrite (and sync) the open pack whole once that is big. Small commits carry
    on a small open pack; past CARRY_MAX the next one starts a new pack."""
    rng = random.Random(5)

    def open_size() -> tuple[int, int]:
        with store.backend.read() as txn:
            pack = packs.open_pack(txn)
            assert pack is not None
            v = txn.get("packs", packs.pack_key(pack))
            return pack, 0 if v is None else len(v)

    put_file(store, "a", rng.randbytes(1000))
    first, size = open_size()
    put_file(store, "b", rng.randbytes(1000))
    carried, carried_size = open_size()
    assert carried == first and carried_size > size, "a small open pack was not carried on"
    # One transaction of many small chunks fills its pack past CARRY_MAX.
    ino = store.create(ROOT_INO, b"big", REG, 0, 0).ino
    store.write(ino, 0, rng.randbytes(packs.CARRY_MAX * 2))
    big, big_size = open_size()
    assert big_size >= packs.CARRY_MAX
    with store.backend.read() as txn:
        before = bytes(txn.get("packs", packs.pack_key(big)) or b"")
    put_file(store, "c", rng.randbytes(1000))
    after, after_size = open_size()
    assert after != big and after_size < 2000, "a small commit went on the big pack"
    with store.backend.read() as txn:
        assert bytes(txn.get("packs", packs.pack_key(big)) or b"") == before
    assert problems(store) == []


def test_an_open_pack_whose_chunks_all_died_goes_when_a_new_one_opens(store: Store) -> None:
    """free() keeps the open pack even when its last chunk dies (more may come);
    once a new pack is opened in its place, the dead one must go (fsck: dead-pack)."""
    rng = random.Random(6)
    ino = put_file(store, "b", rng.randbytes(packs.CARRY_MAX + 1000))
    with store.backend.read() as txn:
        dead = packs.open_pack(txn)
    store.unlink(ROOT_INO, b"b")
    store.forget(ino)
    with store.backend.read() as txn:
        assert dead is not None and packs.info(txn, dead) is not None, "the open pack went"
    put_file(store, "c", rng.randbytes(1000))  # too big to carry on: a new pack opens
    with store.backend.read() as txn:
        assert packs.open_pack(txn) != dead
        assert packs.info(txn, dead) is None and txn.get("packs", packs.pack_key(dead)) is None
    assert problems(store) == []


def test_a_packed_read_is_a_view_of_the_pack_not_a_copy(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "s"), create=True) as s:
        ino = put_file(s, "a", b"hello packs" * 100)
        with s.backend.read() as txn:
            ((_o, d, _n),) = list(content.all_extents(txn, ino))
            ptr = txn.get("chunks", d)
            assert ptr is not None and packs.is_pointer(ptr)
            rec = cas.record(txn, d)
            # LMDB hands the read transaction a view of its map; a slice of it is no copy.
            assert isinstance(txn.get("packs", packs.pack_key(packs.locate(ptr).pack)), memoryview)
            assert isinstance(rec, memoryview) and rec.readonly
            assert len(rec) == packs.locate(ptr).length


def test_freeing_packed_chunks_counts_dead_bytes_and_drops_empty_packs(store: Store) -> None:
    rng = random.Random(3)
    inos = [put_file(store, f"f{i}", rng.randbytes(3000)) for i in range(400)]
    with store.backend.read() as txn:
        before = {p: i for p, i in packs.all_info(txn)}
        first = min(before)
    for ino in inos[:200]:
        store.unlink(ROOT_INO, f"f{inos.index(ino)}".encode())
    with store.backend.read() as txn:
        after = {p: i for p, i in packs.all_info(txn)}
    assert first not in after  # every chunk of the first pack died: the pack went
    assert sum(i.dead_bytes for i in after.values() if i) > 0
    assert problems(store) == []


# -- fsck -------------------------------------------------------------------------------------


def make_packed(tmp_path: Path) -> tuple[Store, dict[int, bytes]]:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    for i in range(120):
        (src / f"f{i:03d}").write_bytes(body(rng, rng.randrange(100, 9000)))
    s = Store.open(str(tmp_path / "s"), source=str(src), create=True)
    migrate_everything(s)
    want = {}
    for i in range(120):
        ino = s.lookup(ROOT_INO, f"f{i:03d}".encode()).ino
        want[ino] = (src / f"f{i:03d}").read_bytes()
    return s, want


def test_fsck_finds_and_repairs_wrong_pack_accounting(tmp_path: Path) -> None:
    s, want = make_packed(tmp_path)
    with s:
        assert problems(s) == []
        with s.backend.write() as txn:
            pack, i = next(packs.all_info(txn))
            assert i is not None
            packs.put_info(txn, pack, packs.Info(i.size, i.live_bytes + 1, i.live_chunks))
        found = problems(s)
        assert len(found) == 1 and found[0].startswith("pack-accounting"), found
        repair(s, Checker(s, resume=False).run())
        assert problems(s, deep=True) == []
        assert all(read_all(s, ino) == data for ino, data in want.items())


def test_fsck_finds_a_chunk_pointing_outside_its_pack_and_heals_it(tmp_path: Path) -> None:
    s, want = make_packed(tmp_path)
    with s:
        with s.backend.write() as txn:
            d, v = next((k, v) for k, v in txn.range("chunks", b"") if packs.is_pointer(v))
            loc = packs.locate(v)
            size = len(txn.get("packs", packs.pack_key(loc.pack)) or b"")
            bad = packs.Location(loc.pack, size - 2, loc.length, loc.codec, loc.dict_id)
            txn.put("chunks", d, packs.pointer(bad))
        s.cache = cas.ChunkCache()
        rep = Checker(s, resume=False).run()
        kinds = {p.kind for p in rep.problems}
        assert {"chunk-outside-pack", "corrupt-chunk", "pack-accounting"} <= kinds, kinds
        holder = next(p.ino for p in rep.problems if p.kind == "corrupt-chunk")
        assert holder is not None
        with pytest.raises(CorruptChunk), s.backend.read() as txn:
            content.read(txn, holder, s.getattr(holder).size, 0, 1 << 30, None)
        assert repair(s, rep) == []
        assert problems(s, deep=True) == []
        assert all(read_all(s, ino) == data for ino, data in want.items())


def test_fsck_finds_overlapping_chunks(tmp_path: Path) -> None:
    s, _want = make_packed(tmp_path)
    with s:
        with s.backend.write() as txn:
            ptrs = [
                (k, packs.locate(v)) for k, v in txn.range("chunks", b"") if packs.is_pointer(v)
            ]
            (d1, a), (_d2, _b) = next(
                (x, y) for x, y in itertools.pairwise(ptrs) if x[1].pack == y[1].pack
            )
            moved = packs.Location(a.pack, a.offset + 1, a.length, a.codec, a.dict_id)
            txn.put("chunks", d1, packs.pointer(moved))
        with s.backend.read() as txn:
            scan = fsck_packs.check(txn)
        kinds = {f.kind for f in scan.findings}
        assert "chunks-overlap" in kinds or "chunk-header-differs" in kinds, kinds


# -- compaction --------------------------------------------------------------------------------


def test_compaction_survives_a_crash_at_every_transaction(tmp_path: Path) -> None:
    rng = random.Random(11)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(600):
        (src / f"f{i:03d}").write_bytes(rng.randbytes(rng.randrange(500, 4000)))
    path = str(tmp_path / "s")
    with Store.open(path, source=str(src), create=True) as s:
        migrate_everything(s)
        for i in range(0, 600, 3):  # a third dies: most packs are a third dead
            s.unlink(ROOT_INO, f"f{i:03d}".encode())
        with s.backend.read() as txn:
            assert len(packs.victims(txn)) > 1
    crashed_at = 0
    for k in range(1, 200):
        with Store.open(path) as s:
            try:
                with crash_at_transaction(s, k):
                    upkeep.compact(s)
            except Crash:
                crashed_at += 1
            else:
                break
        with Store.open(path) as s:
            check_files(s, src, gone=range(0, 600, 3))
    assert crashed_at > 1
    with Store.open(path) as s, s.backend.read() as txn:
        assert packs.victims(txn) == []
        live = sum(i.live_bytes for _p, i in packs.all_info(txn) if i)
        size = sum(i.size for _p, i in packs.all_info(txn) if i)
        assert size - live < packs.PACK_TARGET  # only the pack being filled has dead bytes


def check_files(s: Store, src: Path, gone: range) -> None:
    """Every file of `src` not in `gone` reads exactly; invariants and fsck clean,
    which include: every chunk in exactly one live place, no overlap."""
    dead = {f"f{i:03d}" for i in gone}
    for p in sorted(src.iterdir()):
        if p.name in dead:
            continue
        ino = s.lookup(ROOT_INO, p.name.encode()).ino
        assert read_all(s, ino) == p.read_bytes(), p.name
    check_invariants(s, deep=True)
    assert problems(s, deep=True) == []


KILLED = """
import sys
from ferryfs.store import upkeep
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store
with Store.open(sys.argv[1]) as s:
    for i in range(0, 600, 3):
        s.unlink(ROOT_INO, b"f%03d" % i)
        if i % 15 == 0:
            upkeep.compact(s)
            print("compacted", i, flush=True)
    upkeep.compact(s)
    print("done", flush=True)
"""


def test_compaction_under_kill_9(tmp_path: Path) -> None:
    rng = random.Random(12)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(600):
        (src / f"f{i:03d}").write_bytes(rng.randbytes(rng.randrange(500, 4000)))
    path = tmp_path / "s"
    with Store.open(str(path), source=str(src), create=True) as s:
        migrate_everything(s)
    for attempt in range(3):
        copy = tmp_path / f"copy{attempt}"
        shutil.copytree(path, copy)
        kill_midway([sys.executable, "-c", KILLED, str(copy)], rng, 8)
        with Store.open(str(copy)) as s:
            gone = [i for i in range(0, 600, 3) if _gone(s, i)]
            _check_some(s, src, set(gone))
            upkeep.compact(s)  # and it carries on to the end
            _check_some(s, src, set(gone))


def _gone(s: Store, i: int) -> bool:
    try:
        s.lookup(ROOT_INO, b"f%03d" % i)
    except NotFound:
        return True
    return False


def _check_some(s: Store, src: Path, gone: set[int]) -> None:
    for p in sorted(src.iterdir()):
        i = int(p.name[1:])
        if i in gone:
            continue
        ino = s.lookup(ROOT_INO, p.name.encode()).ino
        assert read_all(s, ino) == p.read_bytes(), p.name
    check_invariants(s, deep=True)
    assert problems(s, deep=True) == []


# -- a store written before packs (schema 1) -----------------------------------------------------


def tree_files(src: Path) -> dict[bytes, bytes]:
    out = {}
    for root, _dirs, files in os.walk(src):
        for f in files:
            p = Path(root) / f
            out[os.fsencode(p.relative_to(src))] = p.read_bytes()
    return out


def store_files(s: Store) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}

    def walk(ino: int, prefix: bytes) -> None:
        for _c, name, node in s.readdir(ino, limit=1 << 20):
            if node.is_dir:
                walk(node.ino, prefix + name + b"/")
            elif node.is_reg:
                out[prefix + name] = read_all(s, node.ino)

    walk(ROOT_INO, b"")
    return out


def test_a_store_written_before_packs_reads_exactly_and_upgrades(tmp_path: Path) -> None:
    src, path = schema1_store(tmp_path)
    want = tree_files(src)
    with Store.open(str(path), readonly=True) as s:
        with s.backend.read() as txn:
            assert U64.unpack(txn.get("meta", b"schema") or b"")[0] == 1
        assert store_files(s) == want
        assert pointers(s) == 0
        assert [p for p in problems(s, deep=True) if not p.startswith("phase3-")] == []
    with Store.open(str(path), source=str(src)) as s:  # a writer: the version moves on
        with s.backend.read() as txn:
            assert U64.unpack(txn.get("meta", b"schema") or b"")[0] == SCHEMA_VERSION
        assert store_files(s) == want  # nothing rewritten yet
        assert pointers(s) == 0
        while not upkeep.upgrade(s, stop=lambda: True):  # one batch per call, pre-empted
            assert store_files(s) == want
        assert pointers(s) > 40
        assert store_files(s) == want
        check_invariants(s, deep=True)
        # (The Phase 3 tree was unpacked anew: other inodes, so it drifted from the point.)
        assert [p for p in problems(s, deep=True) if not p.startswith("phase3-")] == []


def test_compaction_leaves_a_pack_it_cannot_empty_and_does_not_spin(tmp_path: Path) -> None:
    rng = random.Random(13)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(600):
        (src / f"f{i:03d}").write_bytes(rng.randbytes(rng.randrange(500, 4000)))
    with Store.open(str(tmp_path / "s"), source=str(src), create=True) as s:
        migrate_everything(s)
        for i in range(0, 600, 2):
            s.unlink(ROOT_INO, f"f{i:03d}".encode())
        with s.backend.write() as txn:  # a live chunk of a victim points past its pack
            victim = packs.victims(txn)[0]
            d, v = next(
                (k, v)
                for k, v in txn.range("chunks", b"")
                if packs.is_pointer(v) and packs.locate(v).pack == victim
            )
            loc = packs.locate(v)
            bad = packs.Location(loc.pack, 1 << 30, loc.length, loc.codec, loc.dict_id)
            txn.put("chunks", d, packs.pointer(bad))
        assert upkeep.compact(s) >= 1  # the others went
        with s.backend.read() as txn:
            assert packs.victims(txn) == [victim]  # this one stays, for fsck to report
        calls = [upkeep.step(s) for _ in range(3)]
        assert calls[-1] is False  # idle work says there is nothing left: no spinning

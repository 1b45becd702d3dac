"""The `Txn` contract on both KV backends, and LMDB's map growing under the store."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from ferryfs.store import lmdbfile
from ferryfs.store.kv import DBS, Backend, LmdbBackend, MapFull
from ferryfs.store.kvmem import MemoryBackend
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store
from helpers.store import check_invariants, free_last_pages

KEYS = [b"a", b"ab", b"b", b"ba", b"c", b"\x00", b"\xff\xff", b"m" * 300]


@pytest.fixture(params=["memory", "lmdb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    be: Backend = MemoryBackend() if request.param == "memory" else LmdbBackend(str(tmp_path))
    yield be
    be.close()


def fill(be: Backend) -> None:
    with be.write() as txn:
        for k in KEYS:
            txn.put("meta", k, b"v" + k)
        txn.put("refs", b"b", b"other db")


def items(be: Backend, db: str = "meta") -> dict[bytes, bytes]:
    with be.read() as txn:
        return {k: bytes(v) for k, v in txn.range(db, b"")}


def test_get_put_delete(backend: Backend) -> None:
    fill(backend)
    with backend.read() as txn:
        assert txn.get("meta", b"ab") is not None
        assert bytes(txn.get("meta", b"ab") or b"") == b"vab"
        assert txn.get("meta", b"zz") is None
        assert bytes(txn.get("refs", b"b") or b"") == b"other db"
        assert txn.get("refs", b"a") is None  # databases are separate
    with backend.write() as txn:
        assert txn.delete("meta", b"ab") is True
        assert txn.delete("meta", b"ab") is False
        assert txn.get("meta", b"ab") is None  # a txn sees its own writes
        txn.put("meta", b"a", b"new")
        assert bytes(txn.get("meta", b"a") or b"") == b"new"
        txn.put("meta", b"mv", memoryview(b"from a view"))
    got = items(backend)
    assert b"ab" not in got
    assert got[b"a"] == b"new"
    assert got[b"mv"] == b"from a view"
    assert len(got) == len(KEYS)


@pytest.mark.parametrize(
    ("start", "stop"),
    [
        (b"", None),
        (b"a", b"b"),
        (b"ab", b"ba"),
        (b"b", None),
        (b"", b"a"),
        (b"d", b"zz"),
        (b"\xff\xff", None),
        (b"c", b"c"),
        (b"zz", None),
        (b"a", b"ab\x00"),
    ],
)
def test_range_bounds_forward_and_reverse(
    backend: Backend, start: bytes, stop: bytes | None
) -> None:
    fill(backend)
    want = sorted(k for k in KEYS if k >= start and (stop is None or k < stop))
    with backend.read() as txn:
        fwd = [(k, bytes(v)) for k, v in txn.range("meta", start, stop)]
        rev = [(k, bytes(v)) for k, v in txn.range("meta", start, stop, reverse=True)]
    assert [k for k, _ in fwd] == want
    assert all(type(k) is bytes for k, _ in fwd + rev)
    assert [v for _, v in fwd] == [b"v" + k for k in want]
    assert [k for k, _ in rev] == want[::-1]


def test_range_of_an_empty_db(backend: Backend) -> None:
    with backend.read() as txn:
        assert list(txn.range("chunks", b"")) == []
        assert list(txn.range("chunks", b"", reverse=True)) == []
        assert list(txn.range("chunks", b"a", b"b", reverse=True)) == []


def test_deleting_while_walking_a_materialised_range(backend: Backend) -> None:
    fill(backend)
    with backend.write() as txn:
        for k, _ in list(txn.range("meta", b"b")):
            txn.delete("meta", k)
    assert sorted(items(backend)) == sorted(k for k in KEYS if k < b"b")


def test_an_exception_rolls_the_transaction_back(backend: Backend) -> None:
    fill(backend)
    before = items(backend)
    with pytest.raises(RuntimeError), backend.write() as txn:
        txn.put("meta", b"new", b"x")
        txn.put("meta", b"a", b"changed")
        txn.delete("meta", b"b")
        txn.delete("meta", b"ba")
        txn.put("meta", b"ba", b"back again")
        raise RuntimeError("boom")
    assert items(backend) == before
    with backend.read() as txn:  # the key order survived the rollback too
        assert [k for k, _ in txn.range("meta", b"")] == sorted(before)
    with pytest.raises(KeyboardInterrupt), backend.write() as txn:
        txn.put("refs", b"zz", b"x")
        raise KeyboardInterrupt
    assert items(backend, "refs") == {b"b": b"other db"}


def test_every_named_database_exists(backend: Backend) -> None:
    with backend.write() as txn:
        for db in DBS:
            txn.put(db, b"k", db.encode())
    with backend.read() as txn:
        for db in DBS:
            assert bytes(txn.get(db, b"k") or b"") == db.encode()


# -- LMDB map growth -------------------------------------------------------------

SMALL_MAP = 64 << 10  # about the least LMDB opens our thirteen databases in


def small_store(path: Path) -> Store:
    be = LmdbBackend(str(path), map_size=SMALL_MAP)
    s = Store(be)
    s._init_or_check(None)
    return s


def test_put_past_the_map_raises_mapfull_and_keeps_the_old_state(tmp_path: Path) -> None:
    be = LmdbBackend(str(tmp_path), map_size=SMALL_MAP)
    with be.write() as txn:
        txn.put("meta", b"keep", b"me")
    with pytest.raises(MapFull), be.write() as txn:
        for i in range(1000):
            txn.put("chunks", i.to_bytes(4, "big"), bytes(1000))
    assert items(be) == {b"keep": b"me"}
    assert items(be, "chunks") == {}
    be.close()


def test_store_writes_grow_the_map_and_keep_everything(tmp_path: Path) -> None:
    s = small_store(tmp_path)
    rng = random.Random(1)
    files = {}
    for i in range(6):
        data = rng.randbytes(300_000)  # incompressible: the map must hold it all
        node = s.create(ROOT_INO, b"f%d" % i, 0o644, 0, 0)
        s.write(node.ino, 0, data)
        files[node.ino] = data
    be = s.backend
    assert isinstance(be, LmdbBackend)
    assert be.map_size() > SMALL_MAP
    for ino, data in files.items():
        assert s.read(ino, 0, len(data) + 1) == data
    check_invariants(s, deep=True)
    s.close()
    # Reopened with the small size asked for again: the file's size wins.
    s = small_store(tmp_path)
    for ino, data in files.items():
        assert s.read(ino, 0, len(data)) == data
    s.close()


def fill_up(be: LmdbBackend, db: str, rng: random.Random, size: int) -> None:
    """Put random items of `size` bytes into `db` until not one more fits."""
    batch, misses = 4096, 0
    while misses < 3:
        try:
            with be.write() as txn:
                for _ in range(batch):
                    txn.put(db, rng.randbytes(16), rng.randbytes(size))
            misses = 0
        except MapFull:
            batch = max(1, batch // 2)
            misses += batch == 1


def test_a_delete_on_a_full_map_raises_mapfull(tmp_path: Path) -> None:
    """Deleting copies pages too, so a delete can fill the map; it must say MapFull
    (which the store answers by growing), not leak lmdb's own error."""
    be = LmdbBackend(str(tmp_path), map_size=1 << 20)
    rng = random.Random(2)
    fill_up(be, "extents", rng, 56)
    fill_up(be, "refs", rng, 1)
    before = items(be, "extents")
    with pytest.raises(MapFull), be.write() as txn:
        for k in sorted(before)[::20]:
            txn.delete("extents", k)
    assert items(be, "extents") == before
    be.grow()
    with be.write() as txn:
        for k in sorted(before)[::20]:
            assert txn.delete("extents", k)
    assert len(items(be, "extents")) == len(before) - len(sorted(before)[::20])
    be.close()


def test_unlink_in_a_full_store_grows_the_map(tmp_path: Path) -> None:
    s = small_store(tmp_path)
    rng = random.Random(3)
    nodes = []
    for i in range(40):
        node = s.create(ROOT_INO, b"f%d" % i, 0o644, 0, 0)
        s.write(node.ino, 0, rng.randbytes(20_000))
        nodes.append(node)
    be = s.backend
    assert isinstance(be, LmdbBackend)
    # Fill the map to its last page, then free things: deletes need pages too.
    fill_up(be, "index", rng, 1)
    full = be.map_size()
    for i in range(40):
        s.unlink(ROOT_INO, b"f%d" % i)
    assert be.map_size() > full
    check_invariants(s)
    s.close()


# -- a short or damaged data.mdb --------------------------------------------------------------


def test_free_last_pages_are_not_truncation(tmp_path: Path) -> None:
    be = LmdbBackend(str(tmp_path))
    fill(be)
    be.close()
    size, need = free_last_pages(tmp_path)
    assert size < need
    ro = LmdbBackend(str(tmp_path), readonly=True)
    assert items(ro) == {k: b"v" + k for k in KEYS}
    assert ro.verify() is None
    ro.close()
    assert (tmp_path / "data.mdb").stat().st_size == size, "a reader changed the file"
    rw = LmdbBackend(str(tmp_path))  # a writer extends it, as a hole
    assert (tmp_path / "data.mdb").stat().st_size == need
    with rw.write() as txn:
        txn.put("meta", b"after", b"1")
    rw.close()


def test_a_cut_short_or_zeroed_file_is_damage_not_a_crash(tmp_path: Path) -> None:
    from ferryfs.store.errors import StoreDamaged

    be = LmdbBackend(str(tmp_path))
    with be.write() as txn:
        for i in range(3000):
            txn.put("inodes", i.to_bytes(8, "big"), bytes(100))
    be.close()
    data = tmp_path / "data.mdb"
    whole = data.read_bytes()
    data.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StoreDamaged, match="truncated"):
        LmdbBackend(str(tmp_path), readonly=True)
    page = 4096
    leaves = [
        n for n in range(2, len(whole) // page) if whole[n * page + 10] == 2
    ]  # leaf pages, by their flags
    zeroed = bytearray(whole)
    for n in leaves:  # some may be free (not in use): zero them all
        zeroed[n * page : (n + 1) * page] = bytes(page)
    data.write_bytes(zeroed)
    damage = lmdbfile.walk(str(data), page)
    assert damage is not None and damage.page in leaves, damage
    with pytest.raises(StoreDamaged, match=rf"page {damage.page}\b"):
        LmdbBackend(str(tmp_path), readonly=True, verify=True)


def test_a_group_commits_its_writes_together_and_undoes_a_failing_one_alone(
    backend: Backend,
) -> None:
    fill(backend)
    with backend.group():
        assert backend.grouped()
        with backend.write() as txn:
            txn.put("meta", b"one", b"1")
        with pytest.raises(ValueError), backend.write() as txn:
            txn.put("meta", b"two", b"2")
            txn.delete("meta", b"a")
            raise ValueError("this one fails")
        with backend.read() as txn:  # the group's reader sees what it wrote so far
            assert bytes(txn.get("meta", b"one") or b"") == b"1"
            assert txn.get("meta", b"two") is None and txn.get("meta", b"a") is not None
        with backend.write() as txn:
            txn.put("meta", b"three", b"3")
    assert not backend.grouped()
    got = items(backend)
    assert got[b"one"] == b"1" and got[b"three"] == b"3" and got[b"a"] == b"va"
    assert b"two" not in got


def test_a_group_that_fails_leaves_nothing(backend: Backend) -> None:
    fill(backend)
    with pytest.raises(RuntimeError), backend.group():
        with backend.write() as txn:
            txn.put("meta", b"one", b"1")
            txn.delete("meta", b"a")
        raise RuntimeError("the group's owner gives up")
    got = items(backend)
    assert b"one" not in got and got[b"a"] == b"va"

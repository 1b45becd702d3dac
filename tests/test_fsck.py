"""fsck on purpose-damaged stores: every kind of damage found (exit 4), repaired
(exit 1), clean afterwards (exit 0); exit 8 when it cannot run; --max-duration
stops and carries on; --deep's throughput printed."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import lmdb
import pytest
from ferryfs.store.records import U64, Inode
from ferryfs.store.store import Store
from mountutil import ferry


def fsck_json(store: Path, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = ferry("fsck", store, "--json", *args)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


@pytest.fixture
def migrated(sample_tree, tmp_path: Path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    src = tmp_path / "phase3"
    shutil.copytree(sample_tree.root, src, symlinks=True)
    store = tmp_path / "store"
    r = ferry("migrate", src, "--store", store)
    assert r.returncode == 0, r.stderr
    return src, store


def env(store: Path) -> lmdb.Environment:
    return lmdb.open(str(store / "db"), max_dbs=32)


def test_clean_store_is_clean_and_deep_prints_its_rate(migrated: tuple[Path, Path]) -> None:
    _, store = migrated
    code, rep = fsck_json(store)
    assert (code, rep["errors"]) == (0, 0)
    code, rep = fsck_json(store, "--deep")
    assert (code, rep["errors"]) == (0, 0)
    assert rep["chunks_checked"] > 0
    print(
        f"fsck --deep: {rep['bytes_checked'] / 1e6:.1f} MB of files in {rep['seconds']} s "
        f"= {rep['mb_per_s']} MB/s"
    )


def test_every_kind_of_damage_is_found_and_repaired(migrated: tuple[Path, Path]) -> None:
    src, store = migrated
    rng = random.Random(11)
    e = env(store)
    chunks, refs, dirents, inodes = (
        e.open_db(n) for n in (b"chunks", b"refs", b"dirents", b"inodes")
    )
    with e.begin(write=True) as t:
        keys = sorted(k for k, _ in t.cursor(db=chunks))
        flipped = rng.sample(keys, 3)
        for k in flipped:  # XOR one random bit of each, borg style
            v = bytearray(t.get(k, db=chunks))
            i = rng.randrange(len(v))
            v[i] ^= 1 << rng.randrange(8)
            t.put(k, bytes(v), db=chunks)
        ref_key = next(k for k in sorted(k for k, _ in t.cursor(db=refs)) if k not in flipped)
        t.put(ref_key, U64.pack(99), db=refs)  # a wrong reference count
        orphan = os.urandom(32)
        t.put(orphan, b"\x00\x00\x00\x00\x00junk", db=chunks)  # a chunk no one names
        t.put(U64.pack(1) + U64.pack(12345) + b"ghost", U64.pack(10**9), db=dirents)
        # A file whose link count is wrong.
        node = next(
            n
            for n in (Inode.unpack(U64.unpack(k)[0], v) for k, v in t.cursor(db=inodes))
            if n.is_reg and n.stored
        )
        node.nlink = 7
        t.put(U64.pack(node.ino), node.pack(), db=inodes)
    e.close()

    code, rep = fsck_json(store, "--deep")
    assert code == 4
    kinds = {p["kind"] for p in rep["problems"]}
    assert {
        "corrupt-chunk",
        "bad-refcount",
        "orphan-chunk",
        "dangling-dirent",
        "bad-nlink",
    } <= kinds, kinds
    found = {p.get("chunk") for p in rep["problems"] if p["kind"] == "corrupt-chunk"}
    assert {k.hex() for k in flipped} <= found, "a flipped chunk went unnoticed"

    code, rep = fsck_json(store, "--deep", "--repair", "--yes")
    assert code == 1, rep
    assert rep["lost"] == []
    code, rep = fsck_json(store, "--deep")
    assert (code, rep["errors"]) == (0, 0), rep["problems"][:5]
    # Every file reads back byte-exact, the healed ones included.
    with Store.open(str(store), readonly=True) as s:
        checked = 0
        for p in src.rglob("*"):
            if p.is_file() and not p.is_symlink():
                ino = _lookup(s, p.relative_to(src))
                assert s.read(ino, 0, 1 << 30) == p.read_bytes(), p
                checked += 1
    assert checked > 0


def test_repair_refuses_a_store_in_use_and_bad_stores_exit_8(
    migrated: tuple[Path, Path], tmp_path: Path
) -> None:
    _, store = migrated
    with Store.open(str(store)):  # holds the writer lock, as a mount does
        r = ferry("fsck", store, "--repair", "--yes")
        assert r.returncode == 8
        assert len(r.stderr.strip().splitlines()) == 1 and "in use" in r.stderr
        assert ferry("fsck", store).returncode == 0  # a live check works beside it
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        r = ferry("fsck", bad)
        assert r.returncode == 8 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = ferry("fsck", store, "--max-duration", "-1")
    assert r.returncode == 8


def test_max_duration_stops_and_the_next_run_carries_on(migrated: tuple[Path, Path]) -> None:
    _, store = migrated
    code, rep = fsck_json(store, "--deep", "--max-duration", "0.000001")
    assert rep["partial"] is True and code == 0
    cursor = (store / "fsck.cursor").read_bytes()
    e = env(store)
    db = e.open_db(b"chunks")
    with e.begin() as t:
        keys = [k for k, _ in t.cursor(db=db)]
    e.close()
    done_before = sum(k < cursor for k in keys)
    code, rep = fsck_json(store, "--deep")
    assert rep["partial"] is False and code == 0
    # It carried on from the cursor rather than starting again.
    assert rep["chunks_checked"] == len(keys) - done_before
    assert not (store / "fsck.cursor").exists()


def _lookup(s: Store, rel: Path) -> int:
    ino = 1
    for part in rel.parts:
        ino = s.lookup(ino, os.fsencode(part)).ino
    return ino

"""The LMDB database rewritten with its B-tree pages full (kv.LmdbBackend.copy_compact,
which `migrate` and `recompress` end with): every item of every named database
exactly as it was, no page free, and leaf pages at least 90% full where LMDB's
own inserts left them 50-70% full (keys at random, and ascending runs that end
before other keys, as a rollback point's rows before its header)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import lmdb
from ferryfs.store.kv import LmdbBackend


def fill_like_a_migration(be: LmdbBackend) -> None:
    rng = random.Random(14)
    with be.write() as txn:
        txn.put("points", b"N", b"\0" * 8)
        txn.put("points", b"P" + b"\0" * 8, b'{"complete": false}')
    for batch in range(10):  # rows ascending, before the header: LMDB splits in the middle
        with be.write() as txn:
            for i in range(batch * 2000, (batch + 1) * 2000):
                txn.put("points", b"M" + i.to_bytes(8, "big") + b"/file", os.urandom(36))
            for _ in range(2000):  # digests: at random
                txn.put("refs", rng.randbytes(32), rng.randbytes(8))
            txn.put("packs", batch.to_bytes(8, "big"), rng.randbytes(300_000))  # overflow


def everything(path: Path) -> dict[bytes, dict[bytes, bytes]]:
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=32)
    try:
        out: dict[bytes, dict[bytes, bytes]] = {}
        with env.begin() as txn:
            for name, _ in txn.cursor():
                db = env.open_db(name, txn=txn, create=False)
                out[bytes(name)] = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
        return out
    finally:
        env.close()


def leaf_fill(path: Path, name: bytes) -> float:
    """Bytes of the items (keys, values, and LMDB's 8-byte node header and 2-byte
    slot each) over the bytes of the leaf pages holding them."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=32)
    try:
        with env.begin() as txn:
            db = env.open_db(name, txn=txn, create=False)
            st = txn.stat(db)
            kv = sum(len(k) + len(v) + 10 for k, v in txn.cursor(db=db))
            return kv / (st["leaf_pages"] * st["psize"])
    finally:
        env.close()


def test_the_copy_has_every_item_and_full_pages(tmp_path: Path) -> None:
    src, dest = tmp_path / "db", tmp_path / "copy"
    src.mkdir()
    dest.mkdir()
    be = LmdbBackend(str(src))
    try:
        fill_like_a_migration(be)
        be.copy_compact(str(dest))
    finally:
        be.close()
    assert everything(dest) == everything(src)
    for name in (b"points", b"refs"):
        assert leaf_fill(src, name) < 0.8  # what LMDB's own inserts leave
        assert leaf_fill(dest, name) >= 0.9, name
    env = lmdb.open(str(dest), readonly=True, lock=False, max_dbs=32)
    try:
        used = env.info()["last_pgno"] + 1
        with env.begin() as txn:
            named = [env.open_db(n, txn=txn, create=False) for n, _ in txn.cursor()]
            pages = sum(
                s["leaf_pages"] + s["branch_pages"] + s["overflow_pages"]
                for s in (txn.stat(db) for db in named)
            )
    finally:
        env.close()
    # Two meta pages, the main db, and the few the copy's own commits freed.
    assert used - pages <= 16


def test_values_led_are_laid_out_in_the_order_given(tmp_path: Path) -> None:
    """A file's large chunks stored alone come out one after the other in the
    file, in the order the caller gives (its files' order), not their digests'."""
    src, dest = tmp_path / "db", tmp_path / "copy"
    src.mkdir()
    dest.mkdir()
    rng = random.Random(7)
    values = {rng.randbytes(32): rng.randbytes(300_000) for _ in range(12)}
    order = list(values)
    rng.shuffle(order)
    be = LmdbBackend(str(src))
    try:
        with be.write() as txn:
            for k, v in values.items():
                txn.put("chunks", k, v)
                txn.put("refs", k, b"1")
        be.copy_compact(str(dest), lead={"chunks": order})
    finally:
        be.close()
    assert everything(dest) == everything(src)
    data = (dest / "data.mdb").read_bytes()
    where = [data.find(values[k][:64]) for k in order]
    assert -1 not in where
    assert where == sorted(where)
    assert order != sorted(order)  # (so key order would not pass)

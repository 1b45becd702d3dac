"""The offline rewrite of a store's database (upkeep.shrink_file, which `migrate`
and `recompress` end with) swaps data.mdb only while no other process has the
environment open: lock.mdb, shared by every process with it open, records the
last transaction, which picks the meta page a reader reads, and the new file's
transactions are numbered afresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lmdb
from ferryfs.store import upkeep
from ferryfs.store.store import Store

HOLD = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=32)
with env.begin() as txn:
    txn.get(b"x")
print("open", flush=True)
sys.stdin.read()
"""


def contents(db: Path) -> dict[bytes, dict[bytes, bytes]]:
    """Every item of every named database, read by a new process (as `ferryfs
    stats` beside the store would be) through lock.mdb."""
    code = (
        "import sys, lmdb\n"
        "env = lmdb.open(sys.argv[1], readonly=True, max_dbs=32)\n"
        "out = {}\n"
        "with env.begin() as txn:\n"
        "    for name, _ in txn.cursor():\n"
        "        d = env.open_db(bytes(name), txn=txn, create=False)\n"
        "        out[bytes(name)] = {bytes(k): bytes(v) for k, v in txn.cursor(db=d)}\n"
        "print(repr(out))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, check=True)
    got: dict[bytes, dict[bytes, bytes]] = eval(out.stdout)  # our own repr of bytes
    return got


def a_store(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "p3"
    src.mkdir()
    for i in range(300):
        (src / f"s{i}.json").write_text(json.dumps({"n": i, "text": "word " * i}))
    path = tmp_path / "store"
    with Store.open(str(path), source=str(src), create=True) as s:
        s.import_all()
        for _ in range(3):  # some transactions, so the old file's count is not the copy's
            s.transact(lambda txn: txn.put("meta", b"test.k", os.urandom(8)))
    return path, path / "db"


def test_no_swap_while_another_process_has_the_store_open(tmp_path: Path) -> None:
    path, db = a_store(tmp_path)
    before = contents(db)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        ino = os.stat(db / "data.mdb").st_ino
        with Store.open(str(path)) as s:
            assert upkeep.shrink_file(s) is None
        assert os.stat(db / "data.mdb").st_ino == ino  # not swapped under the holder
        assert not (db / "shrink.tmp").exists()
        assert contents(db) == before  # a process opening now reads it all
    finally:
        holder.kill()
        holder.wait()
    with Store.open(str(path)) as s:
        assert upkeep.shrink_file(s) is not None  # alone now: swapped
    assert os.stat(db / "data.mdb").st_ino != ino
    assert contents(db) == before
    with Store.open(str(path)) as s:  # and the store opens and writes as ever
        s.transact(lambda txn: txn.put("meta", b"test.after", b"1"))
    env = lmdb.open(str(db), readonly=True, max_dbs=32)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            assert txn.get(b"test.after", db=meta) == b"1"
    finally:
        env.close()

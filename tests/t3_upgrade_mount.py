"""A store of the previous format (schema 1, every chunk record alone: a3f786f,
tests/data, with the Phase 3 tree it was made from) mounted over its tree: it
opens and reads exactly; with the sweep off nothing is rewritten; the idle sweep
then moves its small records into packs (packs.upgraded), every file still reads
exactly, and `fsck --deep` is clean."""

from __future__ import annotations

import os
from pathlib import Path

from ferryfs.store import packs
from ferryfs.store.records import SCHEMA_VERSION, U64
from ferryfs.store.store import Store
from helpers.mount import ferry, mounted, wait_for
from helpers.store import schema1_store
from helpers.trees import files_of

FAST = ("--idle-ms", "50", "--max-load", "64", "--batch-delay-ms", "0")


def records(path: Path) -> tuple[int, bool, int, int]:
    """(schema version, packs.upgraded, chunks in packs, small chunks stored alone)."""
    with Store.open(str(path), readonly=True) as s, s.backend.read() as txn:
        schema = U64.unpack(txn.get("meta", b"schema") or b"")[0]
        packed = alone = 0
        for _k, v in txn.range("chunks", b""):
            if packs.is_pointer(v):
                packed += 1
            elif len(v) <= packs.PACK_MAX:
                alone += 1
        return schema, packs.upgraded(txn), packed, alone


def test_a_store_of_the_previous_format_upgrades_in_idle_time_through_a_mount(
    tmp_path: Path,
) -> None:
    src, store = schema1_store(tmp_path)
    want = files_of(src)
    assert len(want) > 40
    schema, upgraded, packed, alone = records(store)
    assert (schema, upgraded, packed) == (1, False, 0) and alone > 40
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    # Opened by a mount with no sweep: read exactly, records as they were.
    with mounted(src, mnt, store, args=("--no-sweep",)):
        assert files_of(mnt) == want
    schema, upgraded, packed, alone_after = records(store)
    assert (schema, upgraded, packed, alone_after) == (SCHEMA_VERSION, False, 0, alone)

    # The idle sweep upgrades the records; reads stay exact.
    with mounted(src, mnt, store, args=FAST) as m:
        wait_for(lambda: m.status()["sweep_state"] == "done", 120, "the idle sweep to finish")
        assert files_of(mnt) == want
        assert m.status()["chunks_packed"] > 40
    schema, upgraded, packed, alone = records(store)
    assert schema == SCHEMA_VERSION and upgraded and packed > 40 and alone == 0

    # fsck compares the Phase 3 tree with the store's rollback point: this tree was
    # unpacked here (another path, new inode numbers), so point the store at it and
    # record its point again first (migrate finds nothing to do but that), as an
    # operator who moved the tree would.
    with Store.open(str(store)) as s:
        s.transact(lambda txn: txn.put("meta", b"source", os.fsencode(src.resolve())))
    for cmd in (("points", "delete", store, "1"), ("migrate", src, "--store", store)):
        r = ferry(*cmd)
        assert r.returncode == 0, r.stderr
    r = ferry("fsck", store, "--deep")
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 problems" in r.stdout

"""Idle upkeep on a live mount: once the sweep has nothing left to migrate, the
chunks of cold files (unmodified for 30 days) are recompressed, hot files' are
not, and everything still reads exactly through the mount."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from ferryfs.store import cas, codec, content
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store
from helpers.mount import mounted, wait_for
from helpers.trees import prose

FAST = ("--idle-ms", "50", "--max-load", "64", "--batch-delay-ms", "0")
DAY = 86400


def test_idle_sweep_recompresses_cold_files_only(tmp_path: Path) -> None:
    rng = random.Random(50)
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    now = time.time()
    for i in range(12):
        name = f"{'cold' if i < 8 else 'hot'}{i:02d}.jsonl"
        body = prose(rng, rng.randrange(2000, 20000)).encode()
        (src / name).write_bytes(body)
        age = 60 if name.startswith("cold") else 1
        os.utime(src / name, (now - age * DAY, now - age * DAY))
        files[name] = body
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = tmp_path / "store"
    with mounted(src, mnt, store, args=FAST) as m:
        # "done" comes after the idle upkeep found nothing more to do.
        wait_for(lambda: m.status()["sweep_state"] == "done", 120, "the sweep to finish")
        for name, body in files.items():
            assert (mnt / name).read_bytes() == body
    with Store.open(str(store), readonly=True) as s:
        for name in files:
            ino = s.lookup(ROOT_INO, name.encode()).ino
            with s.backend.read() as txn:
                recs = [cas.record(txn, d) for _o, d, _n in content.all_extents(txn, ino)]
            cold = [bool(r is not None and r[0] & codec.COLD) for r in recs]
            assert all(cold) if name.startswith("cold") else not any(cold), name
        assert s.stats().bytes_cold_compressed > 0

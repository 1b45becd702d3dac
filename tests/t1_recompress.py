"""Cold recompression (store/recompress.py) and the idle upkeep that runs it.

Chunks of cold files are recompressed (smaller, marked cold) and read back
exactly; a chunk shared by a hot file and a cold one stays as it was; a crash
in any batch (simulated) and a kill -9 leave a store that reads exactly and
that the next run finishes; idle upkeep walks once per WALK_EVERY; stats
separates the figures.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
from ferryfs.store import cas, codec, content, recompress, upkeep
from ferryfs.store.fsck import Checker
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store
from helpers.damage import Crash, crash_at_transaction, kill_midway
from helpers.store import check_invariants
from helpers.trees import prose

DAY = 86400 * 10**9
NOW = 1_800_000_000 * 10**9


def text(rng: random.Random, n: int) -> bytes:
    return prose(rng, n // 5 + 1).encode()[:n]


def make(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A Phase 3 tree of cold (60 days) and hot (1 day) files, one chunk of
    `shared` held by both a cold and a hot file; migrated into a store."""
    rng = random.Random(30)
    src = tmp_path / "src"
    src.mkdir()
    files: dict[str, bytes] = {}
    for i in range(40):
        files[f"cold{i:02d}.jsonl"] = text(rng, rng.randrange(3000, 300_000))
    for i in range(10):
        files[f"hot{i:02d}.jsonl"] = text(rng, rng.randrange(3000, 30_000))
    shared = text(rng, 20_000)
    files["cold-shared.jsonl"] = shared
    files["hot-shared.jsonl"] = shared
    files["cold.bin"] = rng.randbytes(100_000)
    for name, body in files.items():
        (src / name).write_bytes(body)
        age = 60 if name.startswith("cold") else 1
        os.utime(src / name, ns=(NOW - age * DAY, NOW - age * DAY))
    path = tmp_path / "s"
    with Store.open(str(path), source=str(src), create=True) as s:
        s.import_all()
        for name in files:
            s.migrate(s.lookup(ROOT_INO, name.encode()).ino)
    return src, path, files


def chunk_records(s: Store, name: str) -> list[bytes]:
    ino = s.lookup(ROOT_INO, name.encode()).ino
    with s.backend.read() as txn:
        return [bytes(cas.record(txn, d) or b"") for _o, d, _n in content.all_extents(txn, ino)]


def all_read(s: Store, files: dict[str, bytes]) -> None:
    s.cache = cas.ChunkCache()
    for name, body in files.items():
        ino = s.lookup(ROOT_INO, name.encode()).ino
        assert s.read(ino, 0, len(body) + 1) == body, name


def clean(s: Store) -> None:
    check_invariants(s, deep=True)
    assert [p.kind for p in Checker(s, deep=True, resume=False).run().problems] == []


def test_cold_chunks_are_recompressed_and_hot_ones_are_not(tmp_path: Path) -> None:
    _src, path, files = make(tmp_path)
    with Store.open(str(path)) as s:
        before = s.stats().bytes_compressed
        hot_before = {n: chunk_records(s, n) for n in files if n.startswith("hot")}
        r = recompress.run(s, cold_days=30, now_ns=NOW)
        assert r.done and r.files_cold == 42 and r.files_hot == 11
        assert r.chunks_recompressed > 40 and r.bytes_after < r.bytes_before
        for name in files:
            recs = chunk_records(s, name)
            if name.startswith("hot"):
                assert recs == hot_before[name], name
            elif name != "cold-shared.jsonl":  # its chunk is hot-shared's too: hot
                assert all(rec[0] & codec.COLD for rec in recs), name
        assert chunk_records(s, "cold-shared.jsonl") == hot_before["hot-shared.jsonl"]
        assert s.dictionary is not None  # trained first: text was there
        assert any(
            rec[0] & codec.KIND == codec.ZSTD_DICT for rec in chunk_records(s, "cold00.jsonl")
        )
        all_read(s, files)
        clean(s)
        st = s.stats()
        assert st.bytes_compressed < before
        assert st.bytes_cold_compressed > 0 and st.bytes_cold_plain > st.bytes_cold_compressed
        again = recompress.run(s, cold_days=30, now_ns=NOW)
        assert again.chunks_recompressed == 0 and again.chunks_already == r.chunks_recompressed


def test_a_crash_in_any_batch_loses_nothing_and_the_next_run_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recompress, "BATCH", 200_000)  # many batches
    _src, path, files = make(tmp_path)
    crashes = 0
    for k in range(1, 100):
        with Store.open(str(path)) as s:
            try:
                with crash_at_transaction(s, k):
                    r = recompress.run(s, cold_days=30, now_ns=NOW)
            except Crash:
                crashes += 1
                r = None
        with Store.open(str(path)) as s:
            all_read(s, files)
            check_invariants(s)
        if r is not None and r.done:
            break
    assert crashes > 3
    with Store.open(str(path)) as s:
        assert recompress.run(s, cold_days=30, now_ns=NOW).chunks_recompressed == 0
        clean(s)


KILLED = """
import sys
from ferryfs.store import recompress
from ferryfs.store.store import Store
recompress.BATCH = 100_000
with Store.open(sys.argv[1]) as s:
    recompress.run(s, cold_days=30, now_ns=int(sys.argv[2]),
                   progress=lambda r: print("batch", r.chunks_recompressed, flush=True))
print("done", flush=True)
"""


def test_recompression_survives_kill_9(tmp_path: Path) -> None:
    _src, path, files = make(tmp_path)
    rng = random.Random(31)
    for _attempt in range(3):
        kill_midway([sys.executable, "-c", KILLED, str(path), str(NOW)], rng, 6)
        with Store.open(str(path)) as s:
            all_read(s, files)
            check_invariants(s, deep=True)
    with Store.open(str(path)) as s:
        recompress.run(s, cold_days=30, now_ns=NOW)
        assert recompress.run(s, cold_days=30, now_ns=NOW).chunks_recompressed == 0
        all_read(s, files)
        clean(s)


def test_idle_upkeep_recompresses_once_per_walk_period(tmp_path: Path) -> None:
    _src, path, files = make(tmp_path)
    with Store.open(str(path)) as s:
        never = lambda: False  # noqa: E731
        while upkeep.idle(s, never, cold_days=30, now_ns=NOW):
            pass
        assert all(rec[0] & codec.COLD for rec in chunk_records(s, "cold00.jsonl"))
        assert not upkeep.idle(s, never, cold_days=30, now_ns=NOW + 10**9)  # walked lately
        all_read(s, files)
        clean(s)
        # Pre-empted before it starts: nothing done, nothing said.
        s.transact(lambda txn: txn.delete("meta", upkeep.WALKED))
        assert not upkeep.idle(s, lambda: True, cold_days=30, now_ns=NOW)

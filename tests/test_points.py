"""Rollback points: made by the first migrate, verify sees drift, expire refuses
without --yes or before the point expires, and deletes Phase 3 files only when
everything is migrated and verified."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ferryfs.store import points
from ferryfs.store.records import U64
from ferryfs.store.store import Store
from mountutil import ferry


def setup(sample_tree, tmp_path: Path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    src = tmp_path / "phase3"
    shutil.copytree(sample_tree.root, src, symlinks=True)
    store = tmp_path / "store"
    assert ferry("migrate", src, "--store", store).returncode == 0
    return src, store


def test_first_point_and_drift(sample_tree, tmp_path: Path) -> None:
    src, store = setup(sample_tree, tmp_path)
    rows = json.loads(ferry("points", "list", store, "--json").stdout)
    assert [r["id"] for r in rows] == [1] and rows[0]["retention_days"] == 30
    assert rows[0]["expired"] is False
    r = ferry("points", "verify", store, "--deep", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["matches"] is True
    victim = next(p for p in sorted(src.rglob("*.jsonl")))
    st = victim.stat()
    victim.write_bytes(victim.read_bytes()[:-1] + b"X")  # same size and mtime:
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # only --deep can see it
    assert ferry("points", "verify", store).returncode == 0
    r = ferry("points", "verify", store, "--deep", "--json")
    drifted = [d["path"] for d in json.loads(r.stdout)["drifted"]]
    assert r.returncode == 4 and drifted == ["/" + str(victim.relative_to(src))]


def test_expire_is_conservative(sample_tree, tmp_path: Path) -> None:
    src, store = setup(sample_tree, tmp_path)
    r = ferry("points", "expire", store, "--yes")
    assert r.returncode == 0 and "no expired" in r.stdout
    # Age the point past its retention.
    age_first_point(store, days=31)
    r = ferry("points", "expire", store)
    assert r.returncode == 1 and "--yes" in r.stdout
    assert any(src.rglob("*.jsonl")), "nothing may go without --yes"
    # A drifted Phase 3 file: fsck --deep is not clean, so nothing is deleted.
    victim = next(p for p in sorted(src.rglob("*.json")))
    victim.write_bytes(b"changed")
    r = ferry("points", "expire", store, "--yes")
    assert r.returncode == 1 and "nothing deleted" in r.stderr
    assert victim.exists()


def test_expire_deletes_phase3_when_all_is_verified(sample_tree, tmp_path: Path) -> None:
    src, store = setup(sample_tree, tmp_path)
    before = {
        p.relative_to(src): p.read_bytes()
        for p in src.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    age_first_point(store, days=31)
    r = ferry("points", "expire", store, "--yes")
    assert r.returncode == 0, r.stderr
    left = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
    assert left == []
    # Everything is still in the store, byte for byte.
    with Store.open(str(store), readonly=True) as s:
        for rel, data in before.items():
            ino = 1
            for part in rel.parts:
                ino = s.lookup(ino, os.fsencode(part)).ino
            assert s.read(ino, 0, len(data) + 1) == data
        assert points.released(s)


def age_first_point(store: Path, days: int) -> None:
    """Make the first rollback point `days` old (its retention is 30 days)."""
    with Store.open(str(store)) as s:
        old = time.time_ns() - days * points.DAY_NS
        record = json.dumps({"created_ns": old, "retention_days": 30}).encode()
        s._write(lambda t: t.put("points", U64.pack(1), record))

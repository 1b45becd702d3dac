"""`ferryfs recompress STORE [--cold-days N] [--level L] [--dry-run] [--json]` and
the figures `ferryfs stats --json` gives about it, end to end."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ferryfs.store.store import Store
from helpers.mount import ferry
from helpers.trees import files_of, prose


def tree(tmp_path: Path) -> Path:
    rng = random.Random(40)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        body = prose(rng, rng.randrange(500, 40_000))
        (src / f"s{i:02d}.jsonl").write_text(body)
    (src / "shot.png").write_bytes(rng.randbytes(60_000))
    return src


def stats(store: Path) -> dict[str, int]:
    r = ferry("stats", store, "--json")
    assert r.returncode == 0, r.stderr
    out: dict[str, int] = json.loads(r.stdout)
    return out


def test_recompress_dry_run_then_for_real(tmp_path: Path) -> None:
    src = tree(tmp_path)
    store = tmp_path / "store"
    assert ferry("migrate", src, "--store", store, "--no-index").returncode == 0
    before = stats(store)
    for k in ("bytes_logical", "bytes_after_dedup", "bytes_compressed", "bytes_stored"):
        assert before[k] > 0, k
    assert before["bytes_logical"] >= before["bytes_after_dedup"] > before["bytes_compressed"]
    assert before["bytes_cold_compressed"] == 0

    # Files written just now are hot at the default 30 days: nothing to do.
    r = ferry("recompress", store, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chunks_recompressed"] == 0

    r = ferry("recompress", store, "--cold-days", "0", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    dry = json.loads(r.stdout)
    assert dry["dry_run"] and dry["chunks_recompressed"] > 0 and dry["files_cold"] == 31
    assert stats(store)["bytes_compressed"] == before["bytes_compressed"]  # nothing changed

    r = ferry("recompress", store, "--cold-days", "0", "--level", "19")
    assert r.returncode == 0, r.stderr
    assert "recompressed" in r.stdout and not r.stderr
    after = stats(store)
    assert after["bytes_compressed"] < before["bytes_compressed"]
    assert after["bytes_cold_plain"] > after["bytes_cold_compressed"] > 0
    assert after["bytes_stored"] <= before["bytes_stored"]  # the file gave its pages back
    assert os.stat(store / "db" / "data.mdb").st_mode & 0o077 == 0

    r = ferry("fsck", store, "--deep")
    assert r.returncode == 0, r.stdout + r.stderr
    with Store.open(str(store), readonly=True) as s:
        for rel, body in files_of(src).items():
            ino = 1
            for part in rel.split("/"):
                ino = s.lookup(ino, os.fsencode(part)).ino
            assert s.read(ino, 0, len(body) + 1) == body, rel


def test_recompress_bad_arguments_one_line_exit_2(tmp_path: Path) -> None:
    src = tree(tmp_path)
    store = tmp_path / "store"
    assert ferry("migrate", src, "--store", store, "--no-index").returncode == 0
    for args in (("--cold-days", "-1"), ("--level", "0"), ("--level", "x")):
        r = ferry("recompress", store, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = ferry("recompress", tmp_path / "nothing-here")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr

"""`status` of a live mount shows the idle sweep's cold recompression as it goes,
as it shows the sweep's migration: bytes of cold files looked at of the walk's
total, chunks recompressed and their bytes before and after, rate and ETA; the
figures move while it runs and end at done, in `--json` and in the text."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

from helpers.mount import cli, mounted
from helpers.trees import prose

FAST = ("--idle-ms", "50", "--max-load", "64", "--batch-delay-ms", "0")
DAY = 86400
# Cold text enough for a walk of a few seconds at zstd 19 (a few MB/s), so that
# status is read while it runs, not only once it is over.
COLD_BYTES = 6 << 20


def cold_tree(src: Path) -> int:
    rng = random.Random(61)
    src.mkdir()
    old = time.time() - 60 * DAY
    total = i = 0
    while total < COLD_BYTES:
        body = prose(rng, rng.randrange(20_000, 120_000)).encode()
        path = src / f"s{i:03d}.jsonl"
        path.write_bytes(body)
        os.utime(path, (old, old))
        total += len(body)
        i += 1
    (src / "hot.jsonl").write_bytes(prose(rng, 5000).encode())  # new: left as it is
    return total


def test_status_shows_recompression_progress_until_done(tmp_path: Path) -> None:
    src, mnt, store = tmp_path / "src", tmp_path / "mnt", tmp_path / "store"
    cold = cold_tree(src)
    mnt.mkdir()
    seen: list[dict[str, Any]] = []
    with mounted(src, mnt, store, args=FAST) as m:
        first = m.status()
        assert first["recompress_state"] == "not run"
        assert first["recompress_bytes_done"] == first["recompress_bytes_total"] == 0
        deadline = time.monotonic() + 300
        while True:
            s = m.status()  # a getxattr: not a request that pre-empts the sweep
            seen.append(s)
            if s["recompress_state"] == "done":
                break
            assert time.monotonic() < deadline, f"recompression not done: {s}"
            time.sleep(0.02)
        text = cli("status", mnt)
        as_json = json.loads(cli("status", mnt, "--json"))

    running = [s for s in seen if s["recompress_state"] == "running"]
    assert running, "status never showed the recompression running"
    # Seen part way, with a rate and an ETA while it ran.
    assert any(0 < s["recompress_bytes_done"] < s["recompress_bytes_total"] for s in running)
    assert any(s["recompress_rate"] > 0 for s in running)
    assert any(s["recompress_eta_seconds"] is not None for s in running)
    done = [s["recompress_bytes_done"] for s in seen if s["recompress_state"] != "not run"]
    assert done == sorted(done), "the bytes looked at went backwards"
    chunks = [s["recompress_chunks"] for s in seen]
    assert chunks == sorted(chunks)

    end = seen[-1]
    # Every cold file's bytes (the hot one is not in the walk), looked at once.
    assert end["recompress_bytes_total"] == end["recompress_bytes_done"] == cold
    assert end["recompress_chunks"] > 0 and end["recompress_eta_seconds"] == 0
    assert 0 < end["recompress_bytes_after"] < end["recompress_bytes_before"]
    assert end["recompress_walks"] == 1
    assert as_json["recompress_state"] == "done"
    assert as_json["recompress_bytes_done"] == cold
    cold_row = next(ln for ln in text.splitlines() if ln.strip().startswith("cold"))
    assert "done" in cold_row and "(100%)" in cold_row, cold_row

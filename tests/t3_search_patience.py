"""The index catches up under an app that never pauses for the idle time: its
wait for a quiet period is bounded (fs/indexer.py PATIENCE), as first-open
migration's is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from conftest import SampleTree
from ferryfs.tools import cli
from helpers.mount import mounted, wait_for

FERRYFS = [sys.executable, "-m", "ferryfs.tools.cli"]


def test_index_catches_up_under_constant_light_load(
    sample_tree: SampleTree, tmp_path: Path
) -> None:
    src = tmp_path / "phase3"
    shutil.copytree(sample_tree.root, src, symlinks=True)
    store = tmp_path / "store"
    # Migrated with no index: the mount has every file to index.
    assert cli.main(["migrate", str(src), "--store", str(store), "--no-index"]) == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(src, mnt, store, args=("--idle-ms", "400")) as m:
        one = next(p for p in sorted(mnt.rglob("*.jsonl")))
        stop = threading.Event()
        opens = [0]

        def app() -> None:
            # A request every 20 ms, never a quiet 400 ms: without a bound on its
            # patience the indexer never starts.
            while not stop.is_set():
                fd = os.open(one, os.O_RDONLY)
                try:
                    os.read(fd, 4096)
                finally:
                    os.close(fd)
                opens[0] += 1
                stop.wait(0.02)

        t = threading.Thread(target=app)
        t.start()
        try:
            assert m.status()["index_pending"] > 0
            wait_for(lambda: m.status()["index_pending"] == 0, 180, "the index under load", 0.5)
            assert m.status()["index_impatient"] > 0
        finally:
            stop.set()
            t.join()
        assert opens[0] > 100
        out = subprocess.run(
            [*FERRYFS, "search", str(mnt), "user", "--json", "--limit", "0"], capture_output=True
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["index_used"] and doc["read_at_query_time"] == 0 and doc["total"] > 0

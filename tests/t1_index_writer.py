"""The search index's writer after a crash: files a killed writer left behind are
collected when the next one opens, before they can collide with its own."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ferryfs.store import index, index_writer
from ferryfs.store.store import Store
from ferryfs.tools import cli


def test_files_a_killed_writer_left_are_collected_at_open(tmp_path: Path) -> None:
    src = tmp_path / "phase3"
    (src / "sessions").mkdir(parents=True)
    for i in range(5):
        (src / "sessions" / f"s{i}.jsonl").write_text(f'{{"text": "hello world {i}"}}\n')
    store = tmp_path / "store"
    assert cli.main(["migrate", str(src), "--store", str(store)]) == 0
    d = Path(index.index_dir(str(store)))
    # What a writer killed between creating a file and committing leaves: a file
    # that tantivy's list of its own files names and no commit does.
    segment = json.loads((d / "meta.json").read_text())["segments"][0]["segment_id"]
    left = f"{segment.replace('-', '')}.999.del"
    managed = json.loads((d / ".managed.json").read_text())
    (d / ".managed.json").write_text(json.dumps([*managed, left]))
    (d / left).write_bytes(b"left by a killed writer")
    with Store.open(str(store)) as st:
        ix = index_writer.Indexer(st)
        ix.open()
        try:
            assert not (d / left).exists(), "the killed writer's file is still there"
            assert os.listdir(d)  # the index itself is untouched
        finally:
            ix.close()

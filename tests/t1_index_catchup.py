"""The offline indexer's economies, each still exact: migrating a file already
indexed leaves it trusted (its content and names did not change), and
`catch_up` commits tantivy once per group of batches, not once per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ferryfs.store import index, index_writer, search
from ferryfs.store.fsck import Checker
from ferryfs.store.store import Store


def _store(tmp_path: Path, files: int) -> Store:
    src = tmp_path / "src"
    for i in range(files):
        d = src / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        body = f'{{"role": "user", "content": "word{i} common"}}\n'
        (d / f"f{i:04d}.jsonl").write_text(body)
    s = Store.open(str(tmp_path / "store"), source=str(src), create=True)
    s.import_all()
    return s


def _hits(s: Store, *words: str) -> int:
    return len(search.search(s, search.parse_query(list(words)), search.StoreReader(s)).hits)


def test_migrating_an_indexed_file_leaves_it_trusted(tmp_path: Path) -> None:
    s = _store(tmp_path, 20)
    try:
        index_writer.build(s)
        with s.backend.read() as txn:
            assert list(index.dirty(txn)) == []
        for node in list(s.iter_inodes()):
            if node.is_reg:
                s.migrate(node.ino)
        with s.backend.read() as txn:
            assert list(index.dirty(txn)) == []  # nothing for the indexer to look at again
            findings, _ = index.check(txn, str(s.path))
        assert findings == []
        assert _hits(s, "word7") == 1
        assert _hits(s, "common") == 20
        assert not Checker(s).run().problems
    finally:
        s.close()


class _Counting:
    """A tantivy writer whose commits are counted."""

    def __init__(self, w: Any) -> None:
        self.w = w
        self.commits = 0

    def commit(self) -> Any:
        self.commits += 1
        return self.w.commit()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.w, name)


def test_catch_up_commits_once_for_many_batches(tmp_path: Path) -> None:
    files = index_writer.BATCH_FILES * 2 + 10
    s = _store(tmp_path, files)
    try:
        ix = index_writer.Indexer(s)
        ix.open()
        counting = _Counting(ix.writer)
        ix.writer = counting
        try:
            p = ix.catch_up()
        finally:
            ix.writer = counting.w
            ix.close()
        assert counting.commits == 1
        assert p.files == files
        with s.backend.read() as txn:
            assert list(index.dirty(txn)) == []
            findings, _ = index.check(txn, str(s.path))
        assert findings == []
        assert _hits(s, f"word{files - 1}") == 1
        assert _hits(s, "common") == files
    finally:
        s.close()

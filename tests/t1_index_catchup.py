"""The offline indexer's economies, each still exact: `catch_up` commits
tantivy once per group of batches, not once per batch; `migrate` reads a
migrated file unchanged since Phase 3 from there; words cut by a worker
process are the same; a batch holds at most its bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ferryfs.store import index, index_writer, search
from ferryfs.store.records import ROOT_INO
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


def test_an_unchanged_migrated_file_is_indexed_from_phase3_a_changed_one_from_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _store(tmp_path, 3)
    try:

        def ino(i: int) -> int:
            d = s.lookup(ROOT_INO, f"d{i}".encode()).ino
            return s.lookup(d, f"f{i:04d}.jsonl".encode()).ino

        changed, drifted, same = ino(0), ino(1), ino(2)
        for i in (changed, drifted, same):
            s.migrate(i)
        new = b'{"content": "rewritten"}\n'
        s.write(changed, 0, new)
        s.truncate(changed, len(new))
        # Phase 3 changed underneath (it is not supposed to): that copy is not trusted.
        (tmp_path / "src" / "d1" / "f0001.jsonl").write_text('{"content": "drifted"}\n')
        read = []
        real = Store.read_stored

        def spy(self: Store, ino: int, off: int, n: int) -> object:
            read.append(ino)
            return real(self, ino, off, n)

        monkeypatch.setattr(Store, "read_stored", spy)
        ix = index_writer.Indexer(s)
        ix.phase3_first = True  # as `migrate` has it
        ix.open()
        try:
            assert ix.catch_up().errors == 0
        finally:
            ix.close()
        assert same not in read  # from its Phase 3 copy
        assert changed in read and drifted in read
        assert _hits(s, "rewritten") == 1
        assert _hits(s, "drifted") == 0
        assert _hits(s, "word1") == 1 and _hits(s, "word2") == 1
    finally:
        s.close()


def test_words_cut_by_a_worker_process_are_the_same(tmp_path: Path) -> None:
    s = _store(tmp_path, index_writer.CUT_CHUNK * 3 + 5)
    try:
        ix = index_writer.Indexer(s)
        ix.open(workers=1)
        assert ix.pool is not None
        try:
            batch = ix.prepare()
        finally:
            ix.close()
        assert batch is not None and ix.pool is None
        docs = sorted(batch.docs)
        files = [words for _, ver, _, words in docs if ver >= 0]  # (not the directories)
        assert len(files) == index_writer.CUT_CHUNK * 3 + 5
        assert all(words is not None and "common" in words.split() for words in files)
        ix = index_writer.Indexer(s)
        ix.open()
        try:
            inline = ix.prepare()
        finally:
            ix.close()
        assert inline is not None and sorted(inline.docs) == docs
    finally:
        s.close()


def test_a_batch_reads_up_to_its_bytes(tmp_path: Path) -> None:
    s = _store(tmp_path, 40)
    try:
        size = len('{"role": "user", "content": "word10 common"}\n')
        ix = index_writer.Indexer(s)
        ix.batch_bytes = size * 5
        ix.open()
        try:
            batch = ix.prepare()
        finally:
            ix.close()
        assert batch is not None
        assert 5 <= sum(1 for _, ver, _, _ in batch.docs if ver >= 0) <= 6
        assert batch.bytes < size * 7
    finally:
        s.close()

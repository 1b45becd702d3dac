"""The index as a cache that knows what it has not seen: a file the indexer
cannot read stays unknown (read at query time), never "no words", and the
indexer's catching up ends whatever files it has to leave marked."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from ferryfs.store import index, index_writer, search
from ferryfs.store.errors import FerryError
from ferryfs.store.fsck import Checker
from ferryfs.store.store import Store

WORDS = b"a zebrafish met a quokka\n"


def _tree(root: Path) -> Path:
    root.mkdir()
    (root / "hit.txt").write_bytes(WORDS)
    (root / "log.jsonl").write_bytes(b'{"content": "nothing to see"}\n')
    (root / "other.txt").write_bytes(b"plain words\n")
    return root


def _store(tmp_path: Path, migrate: bool) -> Store:
    s = Store.open(str(tmp_path / "store"), source=str(_tree(tmp_path / "src")), create=True)
    s.import_all()
    if migrate:
        for node in list(s.iter_inodes()):
            if node.is_reg:
                s.migrate(node.ino)
    return s


def _ask(s: Store, *words: str) -> search.Result:
    return search.search(s, search.parse_query(list(words)), search.StoreReader(s))


def _catch_up(ix: index_writer.Indexer) -> int:
    """Steps of `catch_up`, bounded: an indexer that loops is a failure, not a hang."""
    steps = 0
    while ix.step():
        steps += 1
        assert steps < 20, "the indexer keeps coming back to the same files"
    return steps


@pytest.mark.parametrize("migrated", [True, False], ids=["stored", "legacy"])
@pytest.mark.parametrize("err", [errno.EMFILE, errno.EIO])
def test_a_file_the_indexer_cannot_read_is_read_at_query_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated: bool, err: int
) -> None:
    s = _store(tmp_path, migrated)
    try:
        hit = s.lookup(1, b"hit.txt").ino
        real_stored, real_legacy = Store.read_stored, Store.open_legacy

        def failing_stored(self: Store, ino: int, off: int, n: int) -> object:
            if ino == hit:
                raise OSError(err, os.strerror(err))
            return real_stored(self, ino, off, n)

        def failing_legacy(self: Store, ino: int, record: bool = True) -> object:
            if ino == hit:
                raise OSError(err, os.strerror(err))
            return real_legacy(self, ino, record)

        ix = index_writer.Indexer(s)
        ix.open()
        with monkeypatch.context() as m:
            m.setattr(Store, "read_stored", failing_stored)
            m.setattr(Store, "open_legacy", failing_legacy)
            _catch_up(ix)  # ends, with the file it could not read left marked
        assert ix.progress.errors == 1
        with s.backend.read() as txn:
            assert hit in set(index.dirty(txn))
            assert index.indexed(txn, hit) is None
        # The read failed for the indexer only: a query reads the file, and finds it.
        res = _ask(s, "zebrafish", "quokka")
        assert res.indexed
        assert [h.path for h in res.hits] == [b"hit.txt"]
        assert res.read_now == 1 and not res.errors
        # Tried again once it changed, or by the next process; then the index has it.
        assert _catch_up(ix) == 0  # parked: unchanged, and not yet due for a retry
        ix.close()
        again = index_writer.Indexer(s)
        again.open()
        _catch_up(again)
        again.close()
        res = _ask(s, "zebrafish", "quokka")
        assert [h.path for h in res.hits] == [b"hit.txt"] and res.read_now == 0
        assert not Checker(s).run().problems
    finally:
        s.close()


def test_a_file_whose_content_fails_its_hash_is_an_error_never_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupt chunk (FerryError from the read): the indexer leaves the file
    unknown, and the query that reads it says it could not, rather than
    answering as if the file held no words."""
    s = _store(tmp_path, True)
    try:
        hit = s.lookup(1, b"hit.txt").ino
        real = Store.read_stored

        def corrupt(self: Store, ino: int, off: int, n: int) -> object:
            if ino == hit:
                raise FerryError(f"chunk of inode {ino} fails its hash")
            return real(self, ino, off, n)

        monkeypatch.setattr(Store, "read_stored", corrupt)
        index_writer.build(s)
        res = _ask(s, "zebrafish")
        assert res.hits == [] and len(res.errors) == 1 and "hit.txt" in res.errors[0]
        monkeypatch.undo()
        res = _ask(s, "zebrafish")
        assert [h.path for h in res.hits] == [b"hit.txt"] and res.read_now == 1
    finally:
        s.close()


def test_a_file_named_as_two_kinds_of_text_ends_the_catching_up(tmp_path: Path) -> None:
    """`a.json` and a hard link `a.txt` to it: one document serves one kind, the
    other name is read at query time, and the indexer does not come back to it
    for ever."""
    s = _store(tmp_path, True)
    try:
        d = s.create(1, b"a.json", 0o100644, 0, 0)
        s.write(d.ino, 0, b'{"title": "zebrafish", "quokka": 1}')
        s.link(d.ino, 1, b"a.txt")
        ix = index_writer.Indexer(s)
        ix.open()
        _catch_up(ix)
        ix.close()
        # The .txt name holds the key "quokka" as a word; the .json name does not.
        assert {h.path for h in _ask(s, "zebrafish", "quokka").hits} == {b"hit.txt", b"a.txt"}
        assert {h.path for h in _ask(s, "zebrafish").hits} == {b"hit.txt", b"a.json", b"a.txt"}
        assert not Checker(s).run().problems
    finally:
        s.close()


def test_unlisted_directories_neither_hold_up_nor_keep_the_indexer_going(tmp_path: Path) -> None:
    """Directories the sweep has not listed yet stay marked (their files are
    walked at query time) without the indexer coming back to them in a loop;
    once listed, their files are indexed."""
    src = _tree(tmp_path / "src")
    for i in range(30):
        (src / f"d{i:02}").mkdir()
        (src / f"d{i:02}" / "note.txt").write_bytes(b"quokka %d\n" % i)
    s = Store.open(str(tmp_path / "store"), source=str(src), create=True)
    try:
        s.ensure_listed(1)  # the root only: d00..d29 stay UNLISTED
        index_writer.BATCH_FILES, saved = 8, index_writer.BATCH_FILES
        try:
            ix = index_writer.Indexer(s)
            ix.open()
            _catch_up(ix)
            res = _ask(s, "quokka")
            assert len(res.hits) == 31 and res.read_now == 30  # walked, not indexed
            assert [h.path for h in _ask(s, "zebrafish").hits] == [b"hit.txt"]
            s.import_all()
            _catch_up(ix)
            ix.close()
        finally:
            index_writer.BATCH_FILES = saved
        res = _ask(s, "quokka")
        assert len(res.hits) == 31 and res.read_now == 0
        assert not Checker(s).run().problems
    finally:
        s.close()


def test_records_digest_size_is_the_chunkers() -> None:
    """records.py states blake3's size rather than importing the chunker (which
    would load pyfastcdc and blake3 into every `ferryfs search`)."""
    from ferryfs.store import chunker, records

    assert records.DIGEST_SIZE == chunker.DIGEST_SIZE

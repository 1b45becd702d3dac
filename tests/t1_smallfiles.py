"""The per-file cost of small files in a migration: a file shorter than the
minimum chunk is one chunk, read with one pread and no chunker; bigger files
still go through content-defined chunking; both byte-exact, with the Phase 3
hash recorded."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from ferryfs.store import migration as ingest
from ferryfs.store.chunker import Chunker, digest
from ferryfs.store.store import Store
from helpers.store import check_invariants

MIN = Chunker().min_size
FILES = {
    "empty": b"",
    "one-byte": b"x",
    "small.jsonl": b'{"turn": 1}\n' * 1000,
    "just-under": random.Random(1).randbytes(MIN - 1),
    "at-min": random.Random(2).randbytes(MIN),
    "big.bin": random.Random(3).randbytes(5 * MIN + 123),
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    src = tmp_path / "phase3"
    (src / "d").mkdir(parents=True)
    for name, data in FILES.items():
        (src / "d" / name).write_bytes(data)
    s = Store.open(str(tmp_path / "store"), source=str(src), create=True)
    s.import_all()
    try:
        yield s
    finally:
        s.close()


def ino_of(store: Store, name: str) -> int:
    d = store.lookup(1, b"d")
    return store.lookup(d.ino, name.encode()).ino


def test_a_file_under_the_minimum_chunk_is_one_chunk_without_the_chunker(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    streamed: list[int] = []
    real = Chunker.stream

    def counting(self: Chunker, f: object) -> Iterator[bytes]:
        streamed.append(1)
        return real(self, f)  # type: ignore[arg-type]

    monkeypatch.setattr(Chunker, "stream", counting)
    for name in ("empty", "one-byte", "small.jsonl", "just-under"):
        m = store.prepare_migration(ino_of(store, name))
        assert m is not None
        data = FILES[name]
        assert m.extents == ([(0, digest(data), len(data))] if data else [])
        assert m.legacy.blake3 == blake3.blake3(data).digest()
        store.commit_migrations([m])
        assert bytes(store.read(m.ino, 0, len(data) + 10)) == data
    assert streamed == []
    check_invariants(store, deep=True)


def test_files_from_the_minimum_chunk_up_are_still_cut_by_the_chunker(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    streamed: list[int] = []
    real = Chunker.stream

    def counting(self: Chunker, f: object) -> Iterator[bytes]:
        streamed.append(1)
        return real(self, f)  # type: ignore[arg-type]

    monkeypatch.setattr(Chunker, "stream", counting)
    for name in ("at-min", "big.bin"):
        data = FILES[name]
        m = store.prepare_migration(ino_of(store, name))
        assert m is not None
        cuts = list(Chunker().cuts(data))
        assert [(off, n) for off, _d, n in m.extents] == cuts
        assert m.legacy.blake3 == blake3.blake3(data).digest()
        store.commit_migrations([m])
        assert bytes(store.read(m.ino, 0, len(data) + 10)) == data
    assert len(streamed) == 2
    check_invariants(store, deep=True)


def test_a_small_file_that_grows_while_read_is_not_migrated(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one pread asks for a byte more than the stat said: a file that grew
    between the stat and the read is seen to have changed."""
    ino = ino_of(store, "small.jsonl")
    real = ingest._read_small

    def grow_first(fd: int, want: int) -> bytes:
        with open(tmp_path / "phase3" / "d" / "small.jsonl", "ab") as f:
            f.write(b"more\n")
        return real(fd, want)

    monkeypatch.setattr(ingest, "_read_small", grow_first)
    with pytest.raises(ingest.SourceError):
        store.prepare_migration(ino)

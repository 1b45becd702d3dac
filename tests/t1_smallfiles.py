"""The per-file cost of small files in a migration: a file shorter than the
minimum chunk is one chunk, read with one pread and no chunker; bigger files
still go through content-defined chunking; both byte-exact, with the Phase 3
hash recorded."""

from __future__ import annotations

import os
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


@pytest.fixture
def streamed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One item per file the chunker streams (Chunker.stream calls)."""
    calls: list[int] = []
    real = Chunker.stream

    def counting(self: Chunker, f: object) -> Iterator[bytes]:
        calls.append(1)
        return real(self, f)  # type: ignore[arg-type]

    monkeypatch.setattr(Chunker, "stream", counting)
    return calls


def test_a_file_under_the_minimum_chunk_is_one_chunk_without_the_chunker(
    store: Store, streamed: list[int]
) -> None:
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
    store: Store, streamed: list[int]
) -> None:
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


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[Store]:
    """40 small files four directories down, and one that vanishes from Phase 3."""
    src = tmp_path / "deep"
    leaf = src / "a" / "b" / "c" / "d"
    leaf.mkdir(parents=True)
    for i in range(40):
        (leaf / f"f{i:02d}.json").write_bytes(b'{"i": %d}\n' % i * (i + 1))
    (leaf / "gone.json").write_bytes(b"{}")
    s = Store.open(str(tmp_path / "deep.store"), source=str(src), create=True)
    s.import_all()
    (leaf / "gone.json").unlink()
    try:
        yield s
    finally:
        s.close()


def test_a_batch_prepares_each_file_and_opens_its_directory_once(
    deep: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    inos = list(ingest.legacy_files_by_path(deep))
    assert len(inos) == 41
    opens: list[object] = []
    real_open = os.open

    def counting(path: object, *a: object, **k: object) -> int:
        opens.append(path)
        return real_open(path, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting)
    out = ingest.prepare_batch(deep, inos)
    monkeypatch.undo()
    # Without the cached walk, each file was 5 directory opens and its own.
    assert len(opens) < 2 * len(inos), len(opens)
    assert [type(m) for m in out] == [ingest.Migration] * 40 + [ingest.SourceError]
    ms = [m for m in out if isinstance(m, ingest.Migration)]
    assert [n.ino for n in deep.commit_migrations(ms)] == inos[:40]
    for i, ino in enumerate(inos[:40]):
        assert bytes(deep.read(ino, 0, 10**6)) == b'{"i": %d}\n' % i * (i + 1)
    check_invariants(deep, deep=True)


def test_legacy_files_come_with_their_sizes_in_path_order(deep: Store) -> None:
    sized = list(ingest.legacy_files_sized(deep))
    assert [ino for ino, _ in sized] == list(ingest.legacy_files_by_path(deep))
    assert [n for _, n in sized] == [len(b'{"i": %d}\n' % i) * (i + 1) for i in range(40)] + [2]


def test_a_batch_given_way_ends_early_and_keeps_nothing_of_the_rest(deep: Store) -> None:
    inos = list(ingest.legacy_files_by_path(deep))[:10]
    polls = 0

    def stop() -> bool:
        nonlocal polls
        polls += 1
        return polls > 7  # some files in, then a foreground request

    out = ingest.prepare_batch(deep, inos, stop=stop)
    assert 0 < len(out) < len(inos)
    assert all(isinstance(m, ingest.Migration) for m in out)
    assert [m.ino for m in out if isinstance(m, ingest.Migration)] == inos[: len(out)]
    assert all(deep.getattr(i).state == "legacy" for i in inos)

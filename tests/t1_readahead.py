"""Read-ahead: sequential reads of a stored file are decoded ahead on threads,
give the same bytes, and a damaged chunk ahead still reaches the reader as
CorruptChunk, never as wrong bytes."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
from ferryfs.store import content, readahead
from ferryfs.store.cas import ChunkCache
from ferryfs.store.errors import CorruptChunk
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store
from helpers.damage import damage_chunk

STEP = 256 << 10


def _stored_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    # Compressible, never repeating: many distinct chunks.
    data = b"".join(b"%08d %s\n" % (i, os.urandom(24).hex().encode()) for i in range(size // 58))
    (src / "log.jsonl").write_bytes(data)
    store = tmp_path / "store"
    with Store.open(str(store), source=str(src), create=True) as s:
        s.import_all()
        s.migrate(s.lookup(ROOT_INO, b"log.jsonl").ino)
    return store, data


def _read_all(s: Store, ino: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += s.read(ino, len(out), STEP)
    return bytes(out)


def test_sequential_reads_are_decoded_ahead_and_give_the_same_bytes(tmp_path: Path) -> None:
    store, data = _stored_file(tmp_path, 12 << 20)
    with Store.open(str(store)) as s:
        ino = s.lookup(ROOT_INO, b"log.jsonl").ino
        s.read(ino, 0, STEP)
        s.read(ino, STEP, STEP)  # sequential: the next WINDOW bytes are queued
        with s.backend.read() as txn:
            ahead = [d for off, d, _ in content.overlapping(txn, ino, 4 << 20, 6 << 20)]
        deadline = time.monotonic() + 30
        while not all(s.cache.get(d) for d in ahead):
            assert time.monotonic() < deadline, "nothing was decoded ahead"
            time.sleep(0.01)
        assert len(s.readahead._threads) == readahead.THREADS
        assert _read_all(s, ino, len(data)) == data
    assert s.readahead._threads == []  # close stopped them


def test_a_damaged_chunk_ahead_reaches_the_reader_as_corrupt(
    tmp_path: Path, rng: random.Random
) -> None:
    store, data = _stored_file(tmp_path, 6 << 20)
    with Store.open(str(store)) as s:
        ino = s.lookup(ROOT_INO, b"log.jsonl").ino
        with s.backend.read() as txn:
            extents = list(content.all_extents(txn, ino))
    bad_off, bad, _ = extents[len(extents) // 2]
    damage_chunk(store, bad, rng)
    with Store.open(str(store)) as s:
        good = bytearray()
        with pytest.raises(CorruptChunk):
            while len(good) < len(data):
                good += s.read(ino, len(good), STEP)
        assert len(good) <= bad_off  # the bytes before it, and nothing else
        assert bytes(good) == data[: len(good)]


def test_a_claimed_chunk_is_waited_for_not_decoded_twice() -> None:
    cache = ChunkCache()
    assert cache.claim(b"d")
    assert not cache.claim(b"d")
    got: list[bytes | None] = []
    t = threading.Thread(target=lambda: got.append(cache.get(b"d")))
    t.start()
    time.sleep(0.05)
    assert t.is_alive(), "get did not wait for the claimed chunk"
    cache.settle(b"d", b"plain")
    t.join(5)
    assert got == [b"plain"]
    assert cache.claim(b"e")
    cache.settle(b"e", None)  # a failed decode: the reader decodes (and fails) itself
    assert cache.get(b"e") is None

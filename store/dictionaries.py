"""zstd dictionaries trained on the store's own text chunks: training one, keeping
it (`dicts`: id -> the dictionary's bytes; meta `dict.current`: the one new text
chunks are compressed with), and making them known to the decoders.

A dictionary is trained once the store holds `TRAIN_MIN` bytes of text chunks,
from a sample of at most `SAMPLE_MAX` bytes of them (chunks are keyed by hash,
so key order is a fair sample), cut in pieces of `PIECE` bytes: zstd's trainer
learns from many small samples. Training takes a few seconds of one CPU, with
no transaction open; storing the result is one short transaction.

Dictionaries are never deleted: chunks name them (the record's dictionary id),
and fsck checks each one named exists (fsck_packs.py). `packs.place` stores a
dictionary a record names if the store lacks it (a record encoded in a process
that trained it for another store), so no write can leave a chunk naming a
dictionary its store does not hold (`packs.place` does it: see there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import zstandard

from . import cas, codec
from .errors import CorruptChunk
from .kv import Backend, Txn
from .records import U64

T = TypeVar("T")

TRAIN_MIN = 4 << 20
SAMPLE_MAX = 8 << 20
PIECE = 16 << 10
DICT_SIZE = 110 << 10
CURRENT = b"dict.current"

Dictionary = tuple[int, zstandard.ZstdCompressionDict]


class Host(Protocol):
    backend: Backend

    def transact(self, fn: Callable[[Txn], T]) -> T: ...


def key(dict_id: int) -> bytes:
    return U64.pack(dict_id)


def load_all(txn: Txn) -> Dictionary | None:
    """Register every dictionary of the store with this process's decoders; the
    current one (for new text chunks), if any."""
    for k, v in txn.range("dicts", b""):
        if len(k) == U64.size:
            codec.register(U64.unpack(k)[0], v)
    return current(txn)


def current(txn: Txn) -> Dictionary | None:
    v = txn.get("meta", CURRENT)
    if v is None:
        return None
    dict_id = U64.unpack(v)[0]
    data = txn.get("dicts", key(dict_id))
    if data is None:
        return None
    return dict_id, codec.register(dict_id, data)


def text_sample(
    txn: Txn, limit: int = SAMPLE_MAX
) -> tuple[list[bytes | bytearray | memoryview], int]:
    """Pieces of text chunks (at most `limit` bytes), and how many text bytes were seen."""
    pieces: list[bytes | bytearray | memoryview] = []
    taken = 0
    for k, _v in txn.range("chunks", b""):
        rec = cas.record(txn, k)
        if rec is None:
            continue
        try:
            plain = codec.decode(rec, k)
        except CorruptChunk:
            continue  # fsck's to report
        if not codec.is_text(plain):
            continue
        for i in range(0, len(plain), PIECE):
            pieces.append(plain[i : i + PIECE])
        taken += len(plain)
        if taken >= limit:
            break
    return pieces, taken


def train(s: Host, force: bool = False) -> Dictionary | None:
    """Train and store a dictionary if the store has none yet and holds enough text
    (`force`: whatever it holds, if any); the new one, or None."""
    with s.backend.read() as txn:
        if current(txn) is not None and not force:
            return None
        pieces, taken = text_sample(txn)
    if (taken < TRAIN_MIN and not force) or len(pieces) < 8:
        return None
    try:
        zd = zstandard.train_dictionary(DICT_SIZE, pieces)
    except zstandard.ZstdError:
        return None  # too little to learn from
    data = zd.as_bytes()
    dict_id = codec.dictionary_id(data)
    codec.register(dict_id, data)

    def op(txn: Txn) -> None:
        txn.put("dicts", key(dict_id), data)
        txn.put("meta", CURRENT, U64.pack(dict_id))

    s.transact(op)
    return dict_id, codec.register(dict_id, data)

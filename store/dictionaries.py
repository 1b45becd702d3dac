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

An offline `migrate` trains the store's first dictionary from the chunks it
makes itself (`Learner`): no scan of the store, and every text chunk after the
first `TRAIN_MIN` bytes of text is compressed with it (the idle upkeep and
`recompress` train from the store instead, and redo the chunks written before).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable
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
    return keep(s, zd.as_bytes())


def keep(s: Host, data: bytes) -> Dictionary:
    """Store the dictionary `data` as the store's current one (one transaction)."""
    dict_id = codec.dictionary_id(data)
    codec.register(dict_id, data)

    def op(txn: Txn) -> None:
        txn.put("dicts", key(dict_id), data)
        txn.put("meta", CURRENT, U64.pack(dict_id))

    s.transact(op)
    return dict_id, codec.register(dict_id, data)


class TrainHost(Host, Protocol):
    dictionary: Dictionary | None


class Learner:
    """Dictionaries trained from the records an offline migration makes (before
    they are committed), from the text it has just seen.

    The first once `TRAIN_MIN` bytes of text were seen, then each time the text
    seen has doubled (at most log2 of the text over TRAIN_MIN dictionaries, 110
    KB each), each from the last `SAMPLE_MAX` bytes of text: a tree is migrated
    in path order, so what comes next looks most like what came last (a tree of
    documentation and then of sessions wants a dictionary of each). Each one
    becomes the store's current dictionary, so the text chunks after it are
    compressed with it; the idle upkeep and `recompress` redo the others.

    Only the first 4 KiB of a record is decoded to tell text from the rest, so
    a tree of large binary files costs little; a text record is decoded whole
    (it was just compressed at zstd 3: hundreds of MB/s). A training takes
    about a second of this thread."""

    def __init__(self, s: TrainHost) -> None:
        self.s = s
        self.recent: deque[bytes] = deque()  # the last pieces of text, SAMPLE_MAX at most
        self.held = 0
        self.seen = 0
        self.next_at = TRAIN_MIN
        # The dictionaries records may be made with: this learner's, and the one
        # the store already had (a run resumed).
        self.mine: dict[int, zstandard.ZstdCompressionDict] = {}
        if s.dictionary is not None:
            self.mine[s.dictionary[0]] = s.dictionary[1]

    def feed(self, records: Iterable[bytes | memoryview]) -> Dictionary | None:
        """Look at new chunk records; when due, train a dictionary, store it, make it
        the store's current one (`s.dictionary`) and return it."""
        for rec in records:
            plain = _text_of(rec, self.mine)
            if plain is None:
                continue
            self.seen += len(plain)
            for i in range(0, len(plain), PIECE):
                piece = plain[i : i + PIECE]
                self.recent.append(piece)
                self.held += len(piece)
            while self.held - len(self.recent[0]) >= SAMPLE_MAX:
                self.held -= len(self.recent.popleft())
        if self.seen < self.next_at or len(self.recent) < 8:
            return None
        while self.next_at <= self.seen:
            self.next_at *= 2
        try:
            zd = zstandard.train_dictionary(DICT_SIZE, list(self.recent))
        except zstandard.ZstdError:
            return None  # too little to learn from: the next one, or the idle upkeep
        d = keep(self.s, zd.as_bytes())
        self.mine[d[0]] = d[1]
        self.s.dictionary = d
        return d


def _text_of(
    rec: bytes | memoryview, dicts: dict[int, zstandard.ZstdCompressionDict]
) -> bytes | None:
    """The plain bytes of a record, if they are text (a record made with a
    dictionary not in `dicts` is not looked at)."""
    try:
        kind, dict_id = codec.header(rec)
    except struct.error:
        return None
    kind &= codec.KIND
    body = memoryview(rec)[codec.HEADER_SIZE :]
    if kind == codec.RAW:
        plain = bytes(body)
        return plain if codec.is_text(plain) else None
    if kind == codec.ZSTD and not dict_id:
        zd = None
    elif kind == codec.ZSTD_DICT and dict_id in dicts:
        zd = dicts[dict_id]
    else:
        return None
    try:
        dec = zstandard.ZstdDecompressor(dict_data=zd)
        with dec.stream_reader(body) as r:
            head = r.read(4096)
        if not codec.is_text(head):
            return None
        out: bytes = dec.decompress(body)
    except zstandard.ZstdError:
        return None
    return out

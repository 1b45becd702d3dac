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
# What a migration trains from (Learner): measured on session logs, a dictionary
# from 2 MiB of them compresses the next 55 MB as well as one from 8 MiB (within
# 0.1%), trained in 0.15 s of CPU instead of 0.4.
LEARN_SAMPLE = 2 << 20

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
    KB each), each from the last `LEARN_SAMPLE` bytes of text before it: a tree is
    migrated in path order, so what comes next looks most like what came last
    (a tree of documentation and then of sessions wants a dictionary of each).
    Each one becomes the store's current dictionary, so the text chunks after it
    are compressed with it; the idle upkeep and `recompress` redo the others.

    Cost, on the commit thread: until the first dictionary, the first 4 KiB of
    each record are decoded to tell text from the rest (after it, a record made
    with a dictionary is text: codec.encode uses one for text only); only the
    `LEARN_SAMPLE` bytes of text before a training are decoded whole; a training
    takes about 0.15 s (the small-file tree, 430 MB of text, has 7)."""

    def __init__(self, s: TrainHost) -> None:
        self.s = s
        self.recent: deque[bytes] = deque()  # the last pieces of text, LEARN_SAMPLE at most
        self.held = 0
        self.seen = 0
        self.next_at = TRAIN_MIN
        # Decoders of the dictionaries records may be made with: this learner's,
        # and the one the store already had (a run resumed). 0: no dictionary.
        self.decoders: dict[int, zstandard.ZstdDecompressor] = {0: zstandard.ZstdDecompressor()}
        if s.dictionary is not None:
            self._know(s.dictionary)

    def _know(self, d: Dictionary) -> None:
        self.decoders[d[0]] = zstandard.ZstdDecompressor(dict_data=d[1])

    def feed(self, records: Iterable[bytes | memoryview]) -> Dictionary | None:
        """Look at new chunk records; when due, train a dictionary, store it, make it
        the store's current one (`s.dictionary`) and return it."""
        for rec in records:
            text = self._text(rec)
            if text is None:
                continue
            n, plain = text
            self.seen += n
            if self.seen <= self.next_at - LEARN_SAMPLE:
                continue  # not in the sample of the next training: not decoded
            try:
                whole = plain()
            except zstandard.ZstdError:
                continue
            for i in range(0, len(whole), PIECE):
                piece = whole[i : i + PIECE]
                self.recent.append(piece)
                self.held += len(piece)
            while self.held - len(self.recent[0]) >= LEARN_SAMPLE:
                self.held -= len(self.recent.popleft())
        if self.seen < self.next_at or len(self.recent) < 8:
            return None
        while self.next_at <= self.seen:
            self.next_at *= 2
        pieces: list[bytes | bytearray | memoryview] = list(self.recent)
        self.recent.clear()
        self.held = 0
        try:
            zd = zstandard.train_dictionary(DICT_SIZE, pieces)
        except zstandard.ZstdError:
            return None  # too little to learn from: the next one, or the idle upkeep
        d = keep(self.s, zd.as_bytes())
        self._know(d)
        self.s.dictionary = d
        return d

    def _text(self, rec: bytes | memoryview) -> tuple[int, Callable[[], bytes]] | None:
        """(plain length, a function decoding it) of a record whose plain bytes are
        text; None for anything else (a record made with a dictionary this learner
        has no decoder of is not looked at)."""
        try:
            kind, dict_id = codec.header(rec)
        except struct.error:
            return None
        kind &= codec.KIND
        body = memoryview(rec)[codec.HEADER_SIZE :]
        if kind == codec.RAW:
            return (len(body), body.tobytes) if codec.is_text(body[:4096]) else None
        dec = self.decoders.get(dict_id) if kind in (codec.ZSTD, codec.ZSTD_DICT) else None
        if dec is None or (kind == codec.ZSTD) != (dict_id == 0):
            return None
        try:
            n = zstandard.frame_content_size(body)
            # Only text is compressed with a dictionary (codec.encode); once there is
            # one, a record without is taken for binary (a text one prepared before
            # the dictionary is then not counted: a training comes a little later).
            if kind == codec.ZSTD and len(self.decoders) > 1:
                return None
            if kind == codec.ZSTD:
                with dec.stream_reader(body) as r:
                    if not codec.is_text(r.read(4096)):
                        return None
        except zstandard.ZstdError:
            return None
        if n < 0:
            return None

        def plain() -> bytes:
            out: bytes = dec.decompress(body)
            return out

        return n, plain

"""The content-addressed chunk store: records keyed by blake3, reference counts,
freeing at zero in the same transaction, and a small cache of plain chunks.

Where a record lies (alone, or in a pack) is packs.py's business: everything here
and above reads a chunk's record with `record` and stores one with `put`.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict

import zstandard

from . import codec, packs
from .errors import CorruptChunk
from .kv import Buf, Txn
from .records import HOLE, U64


class MissingChunk(Exception):
    """A chunk a prepared change counted on was freed meanwhile: prepare it again."""


def add_ref(txn: Txn, digest: bytes, record: bytes | None) -> bool:
    """Count one more reference to `digest`, storing `record` if it is new.

    Returns True when the chunk was new. Raises MissingChunk when it is absent
    and no record was supplied.
    """
    cur = txn.get("refs", digest)
    if cur is None:
        if record is None:
            if txn.get("chunks", digest) is None:
                raise MissingChunk(digest.hex())
        elif txn.get("chunks", digest) is None:  # (a staged record is there already)
            packs.place(txn, digest, record)
        txn.put("refs", digest, U64.pack(1))
        return True
    txn.put("refs", digest, U64.pack(U64.unpack(cur)[0] + 1))
    return False


def drop_ref(txn: Txn, digest: bytes) -> int:
    """Count one reference less; free the chunk at zero. Returns the bytes freed."""
    cur = txn.get("refs", digest)
    n = U64.unpack(cur)[0] if cur is not None else 0
    if n <= 1:
        txn.delete("refs", digest)
        if txn.get("pending", digest) is None:
            return packs.free(txn, digest)
        return 0
    txn.put("refs", digest, U64.pack(n - 1))
    return 0


def record(txn: Txn, digest: bytes) -> Buf | None:
    """The record of chunk `digest` (codec.py), or None: a view, never a copy, of a
    pack's slice when packed (see packs.record)."""
    return packs.record(txn, digest)


def put(txn: Txn, digest: bytes, record: Buf) -> None:
    """Store (or replace) the record of `digest`, references untouched."""
    packs.place(txn, digest, record)


def put_new(txn: Txn, records: dict[bytes, bytes]) -> None:
    """Store those of `records` not stored yet (packed together where small)."""
    for d, rec in records.items():
        if txn.get("chunks", d) is None:
            packs.place(txn, d, rec)


def free(txn: Txn, digest: bytes) -> int:
    """Delete the record of `digest`, references untouched; the record bytes freed."""
    return packs.free(txn, digest)


def has(txn: Txn, digest: bytes) -> bool:
    return digest == HOLE or txn.get("chunks", digest) is not None


class ChunkCache:
    """Plain bytes of recently read chunks, bounded in bytes (thread-safe).

    A chunk another thread is decoding (the read-ahead) is "claimed": `get` waits
    for it rather than decoding it a second time beside it."""

    def __init__(self, limit: int = 32 << 20) -> None:
        self.limit = limit
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._claimed: dict[bytes, threading.Event] = {}

    def get(self, digest: bytes) -> bytes | None:
        with self._lock:
            v = self._items.get(digest)
            if v is not None:
                self._items.move_to_end(digest)
                return v
            pending = self._claimed.get(digest)
        if pending is None:
            return None
        pending.wait()
        with self._lock:
            return self._items.get(digest)

    def put(self, digest: bytes, plain: bytes) -> None:
        with self._lock:
            self._insert(digest, plain)

    def _insert(self, digest: bytes, plain: bytes) -> None:
        if len(plain) > self.limit // 4 or digest in self._items:
            return
        self._items[digest] = plain
        self._bytes += len(plain)
        while self._bytes > self.limit:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)

    def claim(self, digest: bytes) -> bool:
        """Mark `digest` as being decoded by the caller; False if it is cached or
        claimed already. The caller must `settle` it, with its bytes or None."""
        with self._lock:
            if digest in self._items or digest in self._claimed:
                return False
            self._claimed[digest] = threading.Event()
            return True

    def settle(self, digest: bytes, plain: bytes | None) -> None:
        with self._lock:
            if plain is not None:
                self._insert(digest, plain)
            pending = self._claimed.pop(digest, None)
        if pending is not None:
            pending.set()

    def discard(self, digest: bytes) -> None:
        with self._lock:
            v = self._items.pop(digest, None)
            if v is not None:
                self._bytes -= len(v)


def load(txn: Txn, digest: bytes, length: int, cache: ChunkCache | None) -> bytes:
    """The plain bytes of a chunk, verified against its digest (CorruptChunk if not).

    A HOLE names no chunk: callers answer holes themselves, in the size they need
    (a hole may be terabytes long), so asking for one here is a CorruptChunk."""
    plain = cache.get(digest) if cache is not None else None
    if plain is None:
        rec = packs.record(txn, digest)
        if rec is None:
            raise CorruptChunk(digest)
        plain = codec.decode(rec, digest, length)
        if cache is not None:
            cache.put(digest, plain)
    if len(plain) != length:  # the extent and the chunk disagree: never short bytes
        raise CorruptChunk(digest)
    return plain


def plain_length(record: bytes | memoryview) -> int | None:
    """How many plain bytes a chunk record says it holds, read from its header
    without decoding it; None when the header does not say (or is unreadable)."""
    try:
        kind, _ = struct.unpack_from(">BI", record, 0)
        body = memoryview(record)[codec.HEADER_SIZE :]
        kind &= codec.KIND
        if kind == codec.RAW:
            return len(body)
        if kind in (codec.ZSTD, codec.ZSTD_DICT):
            n = zstandard.frame_content_size(body)
            return n if n >= 0 else None
    except (struct.error, zstandard.ZstdError, ValueError):
        pass
    return None

"""Damaging chunk records on purpose, and telling a damaged record apart.

Every flip is one random bit of one random byte, drawn from an `rng` the caller
seeded and recorded (the `rng` fixture in conftest prints its seed when a test
fails), so a failure can be replayed and no byte is favoured.

`chunk_damaged` is the oracle: it decodes a record with zstandard and blake3
directly, not with `ferryfs.store.codec.decode`, the code under test.
"""

from __future__ import annotations

import contextlib
import random
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blake3
import zstandard
from ferryfs.store import cas, packs
from ferryfs.store.codec import decode
from ferryfs.store.errors import CorruptChunk
from ferryfs.store.kv import LmdbBackend, Txn
from ferryfs.store.store import Store

HEADER = struct.Struct(">BI")  # codec, dictionary id: what ferryfs writes first
RAW, ZSTD, ZSTD_DICT = 0, 1, 2
COLD = 0x10  # the codec byte's "recompressed cold" bit: decoded alike
BIGGEST = 1 << 24  # bytes; the chunker's largest chunk is far smaller


def chunk_damaged(key: bytes, record: bytes) -> bool:
    """Is `record` not what ferryfs writes for the chunk `key`? Codecs 0 and 1, with
    or without the cold bit, are known here; a record naming a dictionary is
    decoded by ferryfs itself (its dictionaries are known to this process)."""
    if len(record) < HEADER.size:
        return True
    codec, dict_id = HEADER.unpack_from(record)
    body = record[HEADER.size :]
    if codec & ~COLD == ZSTD_DICT and dict_id != 0:
        try:
            decode(record, key)
        except CorruptChunk:
            return True
        return False
    codec &= ~COLD
    if dict_id != 0 or codec not in (RAW, ZSTD):
        return True
    if codec == RAW:
        plain = body
    elif len(body) < 5 or body[4] & 0x10:  # the zstd frame descriptor's unused bit
        return True
    else:
        try:
            # A flipped bit in the frame header can claim any size: no chunk is this big.
            if not 0 <= zstandard.frame_content_size(body) <= BIGGEST:
                return True
            plain = zstandard.ZstdDecompressor().decompress(body, max_output_size=BIGGEST)
        except (zstandard.ZstdError, MemoryError):
            return True
    return blake3.blake3(plain).digest() != key


def flip_bit(record: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> bytes:
    """`record` with one random bit of one random byte in [lo, hi) flipped."""
    out = bytearray(record)
    i = rng.randrange(lo, min(len(out) if hi is None else hi, len(out)))
    out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def damaged(
    key: bytes, record: bytes, rng: random.Random, lo: int = 0, hi: int | None = None
) -> bytes:
    """`record` with one random bit in [lo, hi) flipped such that it is damaged."""
    for _ in range(1000):
        bad = flip_bit(record, rng, lo, hi)
        if chunk_damaged(key, bad):
            return bad
    raise AssertionError(f"no bit of chunk {key.hex()[:12]} in [{lo}, {hi}) damages it")


def damage_chunk(
    where: Store | Path | str,
    digest: bytes,
    rng: random.Random,
    lo: int = 0,
    hi: int | None = None,
) -> bytes:
    """Flip one random bit (in bytes [lo, hi) if given) of chunk `digest`'s record,
    in an open `Store` (its chunk cache is dropped) or in the store directory at a
    path (unmounted); the record as it was. The flip is drawn again until
    `chunk_damaged` says the record is damaged: a few bits (zstd's optional
    checksum flag, say) change nothing a decoder checks."""
    if isinstance(where, Store):
        with where.backend.write() as txn:
            old = bytes(cas.record(txn, digest) or b"")
            overwrite_record(txn, digest, damaged(digest, old, rng, lo, hi))
        where.cache = cas.ChunkCache()
        return old
    backend = LmdbBackend(str(Path(where) / "db"))
    try:
        with backend.write() as txn:
            rec = cas.record(txn, digest)
            assert rec is not None, f"no chunk {digest.hex()[:12]} in {where}"
            old = bytes(rec)
            overwrite_record(txn, digest, damaged(digest, old, rng, lo, hi))
        backend.sync()
    finally:
        backend.close()
    return old


def overwrite_record(txn: Txn, digest: bytes, new: bytes) -> None:
    """Put `new` where chunk `digest`'s record lies (alone, or in its pack's slice, of
    the same length), touching nothing else: damage, not a store's write."""
    v = txn.get("chunks", digest)
    if v is None or not packs.is_pointer(v):
        txn.put("chunks", digest, new)
        return
    loc = packs.locate(v)
    assert len(new) == loc.length
    p = bytearray(txn.get("packs", packs.pack_key(loc.pack)) or b"")
    p[loc.offset : loc.offset + loc.length] = new
    txn.put("packs", packs.pack_key(loc.pack), p)


def stored_chunk(store: Store, digest: bytes) -> bytes:
    """The record of chunk `digest` as it is now in an open store."""
    with store.backend.read() as txn:
        return bytes(cas.record(txn, digest) or b"")


def kill_midway(argv: list[str], rng: random.Random, most: int) -> None:
    """Run `argv`, a script that prints a line after each step it commits (and
    "done" at the end), and kill -9 it after 1 to `most` - 1 of them, drawn from
    `rng`: a crash between two transactions, at a point the test cannot steer."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        for _ in range(rng.randrange(1, most)):
            line = p.stdout.readline()
            if not line or line.startswith("done"):
                break
        p.kill()
    finally:
        p.wait()


class Crash(Exception):
    """Stands for a kill inside a transaction: its work done, its commit never made."""


@contextlib.contextmanager
def crash_at_transaction(s: Store, k: int) -> Iterator[None]:
    """Inside the block, the `k`-th transaction `s.transact` runs does all its work
    and then raises Crash instead of committing (the ones before it commit)."""
    real = s.transact
    calls = 0

    def crashing(fn):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == k:

            def boom(txn):  # type: ignore[no-untyped-def]
                fn(txn)
                raise Crash()

            return real(boom)
        return real(fn)

    s.transact = crashing  # type: ignore[method-assign]
    try:
        yield
    finally:
        s.transact = real  # type: ignore[method-assign]

"""Cold recompression (the report's Step 4): the chunks of files not modified for
`cold_days` days are compressed again at a high zstd level, text ones with the
store's dictionary, and marked cold (codec.COLD) so they are not tried again.

A chunk shared by a hot file and a cold one is hot: the hot files' chunks are
put in a Bloom filter first (fixed size, so memory does not grow with the
store; a false positive only leaves a cold chunk as it is). The cold files are
then walked in inode order; their chunks are decoded (verified against their
key), encoded again, and written in batches of at most `BATCH` plain bytes,
each one short transaction that re-checks every chunk is still the record it
read. The key does not change (it is the hash of the plain bytes), so nothing
above the chunk index changes. A record that does not get smaller keeps its
bytes, with the cold bit set.

Resumable: the next file to look at is kept in meta (`recompress.next`, with
the parameters it was for) in the transaction that writes the batch; after a
crash the walk carries on from there, and chunks already cold are skipped
anyway. `stop` is polled between chunks: what is done is committed and the
walk returns, to carry on next time.

Progress (`progress`, called at most every `REPORT_EVERY` seconds and after
each batch; a Result): `bytes_walked` of `bytes_total`, the plain bytes of the
cold files' chunks in the walk's order, each extent once (a chunk two cold
files share counts twice, as the walk meets it twice). A resumed walk starts
at the bytes of the files before its cursor, so a walk pre-empted many times
still goes from 0 to 100% once. The offline command's bar and a mount's status
show these.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

from . import cas, codec, content, dictionaries, packs
from .dictionaries import Dictionary
from .errors import CorruptChunk
from .kv import Backend, Txn
from .records import HOLE, U64, Inode

T = TypeVar("T")

LEVEL = 19
COLD_DAYS = 30
BATCH = 8 << 20
BLOOM_BYTES = 8 << 20
CURSOR = b"recompress.next"
REPORT_EVERY = 0.25  # seconds between progress reports within a batch


class Host(Protocol):
    backend: Backend
    dictionary: Dictionary | None

    def transact(self, fn: Callable[[Txn], T]) -> T: ...


class Bloom:
    """A set of chunk digests that may say yes wrongly, never no wrongly. Digests
    are uniform hashes: their bytes are the filter's hash functions."""

    K = 4

    def __init__(self, nbytes: int = BLOOM_BYTES) -> None:
        self.bits = bytearray(nbytes)
        self.n = nbytes * 8

    def _spots(self, d: bytes) -> list[int]:
        return [int.from_bytes(d[i * 8 : i * 8 + 8], "big") % self.n for i in range(self.K)]

    def add(self, d: bytes) -> None:
        for i in self._spots(d):
            self.bits[i >> 3] |= 1 << (i & 7)

    def __contains__(self, d: bytes) -> bool:
        return all(self.bits[i >> 3] & (1 << (i & 7)) for i in self._spots(d))


@dataclass
class Result:
    cold_days: float
    level: int
    dry_run: bool
    files_cold: int = 0
    files_hot: int = 0
    chunks_cold: int = 0  # chunks of cold files only, looked at
    chunks_already: int = 0  # cold already
    chunks_recompressed: int = 0  # (or, in a dry run, that would be)
    bytes_plain: int = 0
    bytes_before: int = 0
    bytes_after: int = 0  # in a dry run: as before (nothing is compressed)
    bytes_total: int = 0  # plain bytes of the cold files' chunks: the walk's 100%
    bytes_walked: int = 0  # of those, walked (see the module's docstring)
    done: bool = False  # the walk reached the end (not pre-empted)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def hot_chunks(txn: Txn, cutoff_ns: int) -> tuple[Bloom, int, int]:
    """The chunks of files modified since `cutoff_ns`; (filter, hot files, cold files)."""
    bloom = Bloom()
    hot = cold = 0
    for k, v in txn.range("inodes", b""):
        node = Inode.unpack(U64.unpack(k)[0], v)
        if not node.is_migrated:
            continue
        if node.mtime_ns >= cutoff_ns:
            hot += 1
            for _o, d, _n in content.all_extents(txn, node.ino):
                if d != HOLE:
                    bloom.add(d)
        else:
            cold += 1
    return bloom, hot, cold


def cold_bytes(txn: Txn, cutoff_ns: int, start: int) -> tuple[int, int]:
    """(plain bytes of every cold file's chunks, those of the cold files before
    inode `start`): the walk's total, and where a walk resumed at `start` is."""
    total = before = 0
    for node in _cold_files(txn, 0, cutoff_ns, 1 << 62):
        n = sum(length for _d, length in _chunks_of(txn, node.ino))
        total += n
        if node.ino < start:
            before += n
    return total, before


def run(
    s: Host,
    cold_days: float = COLD_DAYS,
    level: int = LEVEL,
    dry_run: bool = False,
    stop: Callable[[], bool] | None = None,
    progress: Callable[[Result], None] | None = None,
    now_ns: int | None = None,
) -> Result:
    """Recompress the chunks of cold files (see the module's docstring)."""
    t0 = time.monotonic()
    now_ns = time.time_ns() if now_ns is None else now_ns
    # Whole days of the cursor's parameters, so a resumed run counts the same files cold.
    cutoff = now_ns - int(cold_days * 86400e9)
    r = Result(cold_days, level, dry_run)
    if not dry_run and s.dictionary is None:
        trained = dictionaries.train(s)
        if trained is not None:
            s.dictionary = trained
    with s.backend.read() as txn:
        bloom, r.files_hot, r.files_cold = hot_chunks(txn, cutoff)
        start = 0
        cv = txn.get("meta", CURSOR)
        if cv is not None and not dry_run and bytes(cv[8:]) == U64.pack(level):
            start = U64.unpack_from(cv, 0)[0]
        r.bytes_total, r.bytes_walked = cold_bytes(txn, cutoff, start)
    reported = time.monotonic()
    if progress is not None:
        progress(r)
    resume = (-1, 0)  # (file left half done, its plain bytes walked already)
    batch: list[tuple[bytes, bytes, bytes]] = []  # digest, value read, new record
    seen: set[bytes] = set()  # of this batch only: memory stays bounded
    ino = start
    while True:
        held = 0
        again: int | None = None  # a file left half done: looked at again next batch
        with s.backend.read() as txn:
            files = _cold_files(txn, ino, cutoff, 64)
            if not files:
                break
            for node in files:
                pos = 0
                for d, n in _chunks_of(txn, node.ino):
                    pos += n
                    if node.ino != resume[0] or pos > resume[1]:
                        r.bytes_walked += n
                    if progress is not None and time.monotonic() - reported >= REPORT_EVERY:
                        progress(r)
                        reported = time.monotonic()
                    if d in seen or d in bloom:
                        continue
                    seen.add(d)
                    r.chunks_cold += 1
                    got = _recompressed(txn, d, n, level, s.dictionary, dry_run)
                    if got is None:
                        r.chunks_already += 1
                        continue
                    value, before, rec = got
                    r.chunks_recompressed += 1
                    r.bytes_plain += n
                    r.bytes_before += before
                    r.bytes_after += len(rec) if not dry_run else before
                    if not dry_run:  # (a dry run holds nothing: no batches)
                        batch.append((d, value, rec))
                        held += n
                    if held >= BATCH or (stop is not None and stop()):
                        again = node.ino  # done chunks are cold: skipped then
                        resume = (node.ino, max(pos, resume[1]) if node.ino == resume[0] else pos)
                        break
                if again is not None:
                    break
                ino = node.ino + 1
                if held >= BATCH:
                    break
        # Written with no read transaction open on this thread.
        if not dry_run:
            nxt = ino if again is None else again
            s.transact(partial(_write, batch=batch, next_ino=nxt, level=level))
        batch.clear()
        if not dry_run:  # (then a chunk seen before is cold: skipped all the same)
            seen.clear()
        if progress is not None:
            progress(r)
            reported = time.monotonic()
        if again is not None:
            if stop is not None and stop():
                r.seconds = time.monotonic() - t0
                return r
            ino = again
    if not dry_run:
        s.transact(partial(_write, batch=[], next_ino=None, level=level))
    r.done = True
    r.seconds = time.monotonic() - t0
    if progress is not None:
        progress(r)
    return r


def _cold_files(txn: Txn, start: int, cutoff: int, n: int) -> list[Inode]:
    out = []
    for k, v in txn.range("inodes", U64.pack(start)):
        node = Inode.unpack(U64.unpack(k)[0], v)
        if node.is_migrated and node.mtime_ns < cutoff:
            out.append(node)
            if len(out) >= n:
                break
    return out


def _chunks_of(txn: Txn, ino: int) -> list[tuple[bytes, int]]:
    return [(d, n) for _o, d, n in content.all_extents(txn, ino) if d != HOLE]


def _recompressed(
    txn: Txn, d: bytes, n: int, level: int, dictionary: Dictionary | None, dry_run: bool
) -> tuple[bytes, int, bytes] | None:
    """(the chunk's value as read, its record's size, the cold record) of a chunk not
    cold yet; None if it is cold already, gone or damaged."""
    v = txn.get("chunks", d)
    rec = cas.record(txn, d)
    if v is None or not rec:
        return None
    kind = rec[0]
    if kind & codec.COLD:
        return None
    if dry_run:
        return bytes(v), len(rec), b""
    if kind & codec.KIND == codec.RAW:
        # Did not compress at ingest: it will not now. Marked cold as it is.
        return bytes(v), len(rec), bytes([kind | codec.COLD]) + bytes(rec[1:])
    try:
        plain = codec.decode(rec, d, n)
    except CorruptChunk:
        return None  # fsck's to report; reads give EIO
    new = codec.encode(plain, level, dictionary, cold=True)
    if len(new) >= len(rec):
        new = bytes([kind | codec.COLD]) + bytes(rec[1:])
    return bytes(v), len(rec), new


def _write(
    txn: Txn, batch: list[tuple[bytes, bytes, bytes]], next_ino: int | None, level: int
) -> None:
    for d, value, rec in batch:
        now = txn.get("chunks", d)
        if now is not None and bytes(now) == value:  # unchanged since it was read
            packs.place(txn, d, rec)
    if next_ino is None:
        txn.delete("meta", CURSOR)
    else:
        txn.put("meta", CURSOR, U64.pack(next_ino) + U64.pack(level))


def pending(txn: Txn, cutoff_ns: int) -> int:
    """Chunks of cold files that are not cold yet (a count for status; a full walk)."""
    bloom, _hot, _cold = hot_chunks(txn, cutoff_ns)
    n = 0
    for node in _cold_files(txn, 0, cutoff_ns, 1 << 62):
        for d, _len in _chunks_of(txn, node.ino):
            rec = cas.record(txn, d)
            if d not in bloom and rec and not rec[0] & codec.COLD:
                n += 1
    return n

"""File contents as extents: reading any range, and planning and applying rewrites.

A file's extents tile [0, size): key (ino, offset), value (digest, length);
HOLE extents are zeros that name no chunk. A change is planned under a read
transaction (chunking, hashing and compression, the CPU work, with no lock
held) and applied in one write transaction that first checks the inode's
`version` is still the one planned against, so a crash or a race leaves the
file at its old content or its new one.

Writes re-chunk only the regions they touch: from the start of the first
extent a write overlaps to the end of the last, so appending 4 KiB to a large
file reads and re-chunks only its last chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from . import cas, codec
from .chunker import Chunker, digest
from .errors import CorruptChunk
from .kv import Txn
from .records import HOLE, extent_key, extent_value, unpack_extent

# Writes further apart than this are re-chunked as separate regions.
CLUSTER_GAP = 1 << 20

Extent = tuple[int, bytes, int]  # offset, digest, length


def overlapping(txn: Txn, ino: int, start: int, stop: int) -> Iterator[Extent]:
    """Extents of `ino` that overlap [start, stop), in order."""
    first = next(
        txn.range("extents", extent_key(ino, 0), extent_key(ino, start + 1), reverse=True), None
    )
    s = unpack_extent(*first)[0] if first is not None else start
    for k, v in txn.range("extents", extent_key(ino, s), extent_key(ino, stop)):
        off, d, n = unpack_extent(k, v)
        if off + n > start:
            yield off, d, n


def all_extents(txn: Txn, ino: int) -> Iterator[Extent]:
    for k, v in txn.range("extents", extent_key(ino, 0), extent_key(ino + 1, 0)):
        yield unpack_extent(k, v)


def read(txn: Txn, ino: int, size: int, off: int, n: int, cache: cas.ChunkCache | None) -> bytes:
    """Bytes [off, off+n) of a stored file of `size` bytes; CorruptChunk on a bad chunk."""
    return bytes(read_view(txn, ino, size, off, n, cache))


def read_view(
    txn: Txn, ino: int, size: int, off: int, n: int, cache: cas.ChunkCache | None
) -> bytes | memoryview:
    """As `read`, but a range within one chunk comes back as a view of the chunk's
    plain bytes, not a copy (most reads of small files are one chunk)."""
    end = min(size, off + n)
    if off >= end:
        return b""
    parts: list[bytes | memoryview] = []
    pos = off
    for eoff, d, length in overlapping(txn, ino, off, end):
        if eoff > pos:  # a gap would break invariant 2; never invent bytes
            raise CorruptChunk(d)
        plain = cas.load(txn, d, length, cache)
        lo = pos - eoff
        hi = min(length, end - eoff)
        parts.append(memoryview(plain)[lo:hi] if (lo, hi) != (0, length) else plain)
        pos = eoff + hi
        if pos >= end:
            break
    if pos < end:
        raise CorruptChunk(HOLE)
    return parts[0] if len(parts) == 1 else b"".join(parts)


@dataclass
class Edit:
    """Replace every extent starting in [start, stop) by `extents`."""

    start: int
    stop: int
    extents: list[Extent]


@dataclass
class Rewrite:
    """A planned change of one file's content, applied by `apply`."""

    ino: int
    base_version: int
    base_size: int
    new_size: int
    edits: list[Edit] = field(default_factory=list)
    records: dict[bytes, bytes] = field(default_factory=dict)  # new chunks only


def chunk_into(
    txn: Txn,
    data: bytes | bytearray | memoryview,
    base: int,
    chunker: Chunker,
    rw: Rewrite,
    level: int = 3,
) -> list[Extent]:
    """Cut `data` (at file offset `base`) into chunks, encoding those not stored yet."""
    out: list[Extent] = []
    mv = memoryview(data)
    for off, n in chunker.cuts(mv):
        piece = mv[off : off + n]
        d = digest(piece)
        if d not in rw.records and not cas.has(txn, d):
            rw.records[d] = codec.encode(piece, level)
        out.append((base + off, d, n))
    return out


def plan_write(
    txn: Txn,
    ino: int,
    version: int,
    size: int,
    spans: list[tuple[int, bytes]],
    chunker: Chunker,
    cache: cas.ChunkCache | None,
) -> Rewrite:
    """Plan writing `spans` (sorted, disjoint (offset, bytes)) into a file of `size` bytes."""
    spans = [(o, b) for o, b in spans if len(b)]  # writing nothing extends nothing
    new_size = max([size] + [o + len(b) for o, b in spans])
    rw = Rewrite(ino, version, size, new_size)
    # Regions: [S, E) aligned to old extent boundaries (or past the old end).
    regions: list[list[int]] = []
    for a, b in _clusters(spans):
        s, e = a, b
        if a < size or (a == size and size > 0):
            probe = a if a < size else size - 1
            ext = next(overlapping(txn, ino, probe, probe + 1), None)
            if ext is not None and ext[1] != HOLE:
                s = ext[0]
        if b < size:
            ext = next(overlapping(txn, ino, b - 1, b), None)
            if ext is not None and ext[1] != HOLE:
                e = ext[0] + ext[2]
        if regions and s <= regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], e)
        else:
            regions.append([s, e])
    covered = 0
    for s, e in regions:
        if s > max(covered, size):  # zeros between the old end and this region
            rw.edits.append(
                Edit(max(covered, size), s, [(max(covered, size), HOLE, s - max(covered, size))])
            )
        buf, old, lo, hi = _region_bytes(txn, ino, size, s, e, spans, cache)
        new = chunk_into(txn, buf, s, chunker, rw)
        out: list[Extent] = []
        start = lo
        if lo < covered:
            # The previous region split the same hole and ends with its tail:
            # cut that tail at s rather than replace the previous edit's extents.
            toff, _, _ = rw.edits[-1].extents[-1]
            rw.edits[-1].extents[-1] = (toff, HOLE, s - toff)
            start = s
        elif lo < s:
            out.append((lo, HOLE, s - lo))
        out.extend(new)
        if hi > e:
            out.append((e, HOLE, hi - e))
        rw.edits.append(Edit(start, max(hi, e), out))
        covered = max(hi, e)
        del old
    return rw


def _clusters(spans: list[tuple[int, bytes]]) -> Iterator[tuple[int, int]]:
    cur: list[int] | None = None
    for off, data in spans:
        end = off + len(data)
        if cur is not None and off - cur[1] <= CLUSTER_GAP:
            cur[1] = max(cur[1], end)
            continue
        if cur is not None:
            yield cur[0], cur[1]
        cur = [off, end]
    if cur is not None:
        yield cur[0], cur[1]


def _region_bytes(
    txn: Txn,
    ino: int,
    size: int,
    s: int,
    e: int,
    spans: list[tuple[int, bytes]],
    cache: cas.ChunkCache | None,
) -> tuple[bytearray, list[Extent], int, int]:
    """The new bytes of [s, e), and the old extents it replaces with their span [lo, hi)."""
    buf = bytearray(e - s)
    old = list(overlapping(txn, ino, s, e)) if s < size else []
    lo, hi = s, e
    for eoff, d, n in old:
        lo, hi = min(lo, eoff), max(hi, eoff + n)
        if d == HOLE:
            continue
        plain = cas.load(txn, d, n, cache)
        a, b = max(s, eoff), min(e, eoff + n)
        buf[a - s : b - s] = plain[a - eoff : b - eoff]
    for off, data in spans:
        a, b = max(s, off), min(e, off + len(data))
        if a < b:
            buf[a - s : b - s] = data[a - off : b - off]
    return buf, old, lo, hi


def plan_truncate(
    txn: Txn, ino: int, version: int, size: int, new_size: int, cache: cas.ChunkCache | None
) -> Rewrite:
    """Plan cutting or extending a file to `new_size` (extensions are holes)."""
    rw = Rewrite(ino, version, size, new_size)
    if new_size >= size:
        if new_size > size:
            rw.edits.append(Edit(size, new_size, [(size, HOLE, new_size - size)]))
        return rw
    tail: list[Extent] = []
    ext = next(overlapping(txn, ino, new_size, new_size + 1), None)
    start = new_size
    if ext is not None and ext[0] < new_size:
        eoff, d, n = ext
        start = eoff
        keep = new_size - eoff
        if d == HOLE:
            tail.append((eoff, HOLE, keep))
        else:
            piece = cas.load(txn, d, n, cache)[:keep]
            nd = digest(piece)
            if not cas.has(txn, nd):
                rw.records[nd] = codec.encode(piece)
            tail.append((eoff, nd, keep))
    rw.edits.append(Edit(start, size, tail))
    return rw


def apply(txn: Txn, rw: Rewrite) -> int:
    """Apply a planned rewrite. Returns bytes freed.

    Every edit's new references are counted before any old one drops: a chunk
    one edit gives up may be the one a later edit takes (planned as present).
    """
    freed = 0
    dropped: list[bytes] = []
    for ed in rw.edits:
        old = [
            (k, bytes(v[:32]))
            for k, v in txn.range(
                "extents", extent_key(rw.ino, ed.start), extent_key(rw.ino, ed.stop)
            )
        ]
        for k, d in old:
            txn.delete("extents", k)
            if d != HOLE:
                dropped.append(d)
        for off, d, n in ed.extents:
            if d != HOLE:
                cas.add_ref(txn, d, rw.records.get(d))
            txn.put("extents", extent_key(rw.ino, off), extent_value(d, n))
    for d in dropped:
        freed += cas.drop_ref(txn, d)
    return freed


def delete_all(txn: Txn, ino: int) -> int:
    """Drop every extent of `ino` and its references. Returns bytes freed."""
    freed = 0
    # Copy the digests first: LMDB values are views into pages a write may move.
    old = [
        (k, bytes(v[:32]))
        for k, v in txn.range("extents", extent_key(ino, 0), extent_key(ino + 1, 0))
    ]
    for k, d in old:
        txn.delete("extents", k)
        if d != HOLE:
            freed += cas.drop_ref(txn, d)
    return freed

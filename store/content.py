"""File contents as extents: reading any range, and planning and applying rewrites.

A file's extents tile [0, size): key (ino, offset), value (digest, length).

Holes are explicit extents, not gaps: an extent whose digest is `HOLE` (32 zero
bytes; no blake3 output is that in practice) stands for `length` zero bytes and
names no chunk. So the tiling invariant counts holes like any extent, reference
counts ignore them, and a gap between extents stays an error (never read as
zeros). The record layout is the one data extents have, so stores written
before holes were used read unchanged. A hole costs one extent record whatever
its length: growing a file (truncate, a write past the end) adds a hole, and a
read of a hole makes only the zeros it returns. Nothing here ever builds a
buffer as long as a hole: reads of holes are sized by the read, writes into a
hole chunk only the bytes written (and gaps of at most `HOLE_BRIDGE` zeros
between them), and hashing a hole goes through `zeros()`.

A change is planned under a read
transaction (chunking, hashing and compression, the CPU work, with no lock
held) and applied in one write transaction that first checks the inode's
`version` is still the one planned against, so a crash or a race leaves the
file at its old content or its new one.

Writes re-chunk only the regions they touch: from the start of the first
extent a write overlaps to the end of the last. An append re-chunks the file's
last chunk with it only while that chunk is shorter than the chunker's minimum:
appending 4 KiB to a file costs at most that minimum plus its own bytes, and a
file grown by appends ends in chunks of about the minimum size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import blake3

from . import cas, codec
from .chunker import Chunker, digest
from .dictionaries import Dictionary
from .errors import CorruptChunk
from .kv import Buf, Txn
from .records import HOLE, extent_key, extent_value, unpack_extent

# Writes further apart than this are re-chunked as separate regions.
CLUSTER_GAP = 1 << 20
# ...and so are writes with a gap of more than this in a hole or past the end: the
# zeros between them are chunked only when few, as a 4 KiB-block filesystem fills
# the rest of a block, so a write costs at most this much beyond its own bytes.
HOLE_BRIDGE = 4096
# A region of one rewrite (the bytes chunked together) stops growing past this at
# the next old extent boundary: scattered writes over a large file re-chunk it in
# pieces, never as one buffer as long as the file.
REGION_MAX = 16 << 20
# Zeros shared by whoever must hash or write a hole, in pieces of this size.
_ZEROS = bytes(1 << 20)

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


def zeros(n: int) -> Iterator[memoryview]:
    """`n` zero bytes as views of one shared 1 MiB buffer (hashing a hole)."""
    mv = memoryview(_ZEROS)
    while n > 0:
        k = min(n, len(_ZEROS))
        yield mv[:k]
        n -= k


def data_ranges(txn: Txn, ino: int, size: int) -> list[tuple[int, int, bool]]:
    """(offset, length, is_hole) runs tiling [0, size) of a stored file: adjacent
    extents of the same kind merged, so a file without holes is one run. What a
    copy needs to make the same sparse file: write the data runs, seek over the
    holes (and set the size at the end)."""
    out: list[tuple[int, int, bool]] = []
    for off, d, n in all_extents(txn, ino):
        if off >= size:
            break
        n = min(n, size - off)
        hole = d == HOLE
        if out and out[-1][2] == hole and out[-1][0] + out[-1][1] == off:
            o, m, _ = out[-1]
            out[-1] = (o, m + n, hole)
        else:
            out.append((off, n, hole))
    return out


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
        lo = pos - eoff
        hi = min(length, end - eoff)
        if d == HOLE:  # only the zeros asked for, never the whole hole
            parts.append(bytes(hi - lo))
        else:
            plain = cas.load(txn, d, length, cache)
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
    dictionary: Dictionary | None = None,
) -> list[Extent]:
    """Cut `data` (at file offset `base`) into chunks, encoding those not stored yet
    (text ones with `dictionary`, if given)."""
    out: list[Extent] = []
    mv = memoryview(data)
    for off, n in chunker.cuts(mv):
        piece = mv[off : off + n]
        d = digest(piece)
        if d not in rw.records and not cas.has(txn, d):
            rw.records[d] = codec.encode(piece, level, dictionary)
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
    dictionary: Dictionary | None = None,
) -> Rewrite:
    """Plan writing `spans` (sorted, disjoint (offset, bytes)) into a file of `size` bytes.

    The spans are cut into regions, each re-chunked from one buffer: a region
    spreads to the old data extents it touches (CDC then resynchronises at
    their edges) but never into a hole, so a write far into a hole or past the
    end chunks its own bytes and the hole around it stays a hole extent."""
    spans = [(o, b) for o, b in spans if len(b)]  # writing nothing extends nothing
    new_size = max([size] + [o + len(b) for o, b in spans])
    rw = Rewrite(ino, version, size, new_size)
    # Regions: [S, E) aligned to old data extent boundaries (or in a hole, or past
    # the old end), and the slice [I, J) of `spans` they hold.
    regions: list[list[int]] = []
    for a, b, i, j in _clusters(txn, ino, size, spans):
        s, e = a, b
        if a < size or (a == size and size > 0):
            probe = a if a < size else size - 1
            ext = next(overlapping(txn, ino, probe, probe + 1), None)
            # An append leaves a last chunk of at least the minimum size as it is:
            # re-chunking it with every appended line made each close cost the whole
            # chunk (decode, hash, compress up to 512 KiB). A shorter one is joined.
            appended = a == size and ext is not None and ext[2] >= chunker.min_size
            if ext is not None and ext[1] != HOLE and not appended:
                s = ext[0]
        if b < size:
            ext = next(overlapping(txn, ino, b - 1, b), None)
            if ext is not None and ext[1] != HOLE:
                e = ext[0] + ext[2]
        if regions and _joins(txn, ino, size, regions[-1], s):
            regions[-1][1] = max(regions[-1][1], e)
            regions[-1][3] = j
        else:
            regions.append([s, e, i, j])
    covered = 0
    for s, e, i, j in regions:
        gap = max(covered, size)
        if s > gap:  # zeros between the old end and this region: a hole
            rw.edits.append(_grow_hole(txn, ino, size, covered, s))
        buf, lo, hi = _region_bytes(txn, ino, size, s, e, spans[i:j], cache)
        new = chunk_into(txn, buf, s, chunker, rw, dictionary=dictionary)
        del buf
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
    return rw


def _grow_hole(txn: Txn, ino: int, size: int, covered: int, stop: int) -> Edit:
    """The edit making [max(covered, size), stop) zeros: the file's trailing hole
    lengthened if it has one no earlier edit touched, else a new hole extent."""
    start = max(covered, size)
    if size > 0 and covered <= size:
        last = next(overlapping(txn, ino, size - 1, size), None)
        if last is not None and last[1] == HOLE and last[0] >= covered:
            return Edit(last[0], stop, [(last[0], HOLE, stop - last[0])])
    return Edit(start, stop, [(start, HOLE, stop - start)])


def _joins(txn: Txn, ino: int, size: int, prev: list[int], s: int) -> bool:
    """Whether a region starting at `s` must (or may usefully) join the one before.

    Overlapping regions share an old extent: they must. Touching ones may stay
    apart once the first is REGION_MAX long, but only where `s` is an extent
    boundary (inside a hole, the two edits would each claim the hole)."""
    if s != prev[1]:
        return s < prev[1]
    if prev[1] - prev[0] < REGION_MAX:
        return True
    if s >= size:
        return False
    ext = next(overlapping(txn, ino, s, s + 1), None)
    return ext is not None and ext[0] != s


def _clusters(
    txn: Txn, ino: int, size: int, spans: list[tuple[int, bytes]]
) -> Iterator[tuple[int, int, int, int]]:
    """(start, end, first span, end span) of runs of spans chunked together.

    A gap joins two spans when it is at most HOLE_BRIDGE, or at most CLUSTER_GAP
    of old data (re-chunked with them); a gap in a hole or past the end stays a
    hole. A run stops growing at REGION_MAX, so its buffer stays bounded."""
    first = 0
    lo = end = -1
    for k, (off, data) in enumerate(spans):
        if k and not _bridge(txn, ino, size, lo, end, off):
            yield lo, end, first, k
            first = k
        if k == first:
            lo, end = off, off + len(data)
        else:
            end = max(end, off + len(data))
    if spans:
        yield lo, end, first, len(spans)


def _bridge(txn: Txn, ino: int, size: int, lo: int, end: int, nxt: int) -> bool:
    if end - lo >= REGION_MAX and _apart(txn, ino, size, end, nxt):
        return False
    gap = nxt - end
    if gap <= HOLE_BRIDGE:
        return True
    if gap > CLUSTER_GAP or nxt > size:
        return False
    return all(d != HOLE for _, d, _ in overlapping(txn, ino, end, nxt))


def _apart(txn: Txn, ino: int, size: int, end: int, nxt: int) -> bool:
    """Whether spans ending at `end` and starting at `nxt` can be planned as separate
    regions: no old data extent holds both (its re-chunking would join them), and
    they do not touch inside a hole (two edits would each claim it)."""
    if nxt >= size:
        return True
    ext = next(overlapping(txn, ino, nxt, nxt + 1), None)
    if ext is None:
        return True
    if ext[1] == HOLE:
        return nxt > end or ext[0] == nxt
    return ext[0] >= end


def _region_bytes(
    txn: Txn,
    ino: int,
    size: int,
    s: int,
    e: int,
    spans: list[tuple[int, bytes]],
    cache: cas.ChunkCache | None,
) -> tuple[bytearray, int, int]:
    """The new bytes of [s, e) (`spans` those that fall in it), and the span [lo, hi)
    of the old extents it replaces (a hole it lies in may reach far beyond it)."""
    buf = bytearray(e - s)
    lo, hi = s, e
    if s < size:
        for eoff, d, n in overlapping(txn, ino, s, e):
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
    return buf, lo, hi


def plan_truncate(
    txn: Txn, ino: int, version: int, size: int, new_size: int, cache: cas.ChunkCache | None
) -> Rewrite:
    """Plan cutting or extending a file to `new_size` (extensions are holes: one
    record, whatever their length; a trailing hole is lengthened, not followed)."""
    rw = Rewrite(ino, version, size, new_size)
    if new_size >= size:
        if new_size > size:
            rw.edits.append(_grow_hole(txn, ino, size, 0, new_size))
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


@dataclass
class Hashed:
    """What hashing a file's content from its chunk records found. `status`: "ok"
    (every chunk decoded to its length: `digest` is the content's blake3), or
    "missing" / "damaged" (`bad` names the chunk) or "short" (a chunk decoded to
    another length than its extent's)."""

    status: str
    digest: bytes | None = None
    bad: bytes | None = None
    verified: list[bytes] = field(default_factory=list)  # chunks that decoded
    decoded: int = 0  # plain bytes decoded


def hash_chunks(items: Iterable[tuple[bytes, Buf | None, int]]) -> Hashed:
    """blake3 of a file's content from its extents in order, each (digest, its chunk
    record or None if there is none, length). Needs no transaction when the records
    were read before (fsck hashes on a thread pool)."""
    h = blake3.blake3()
    out = Hashed("ok")
    for d, rec, length in items:
        if d == HOLE:  # bounded memory, however long the hole
            for z in zeros(length):
                h.update(z)
            continue
        if rec is None:
            out.status, out.bad = "missing", d
            return out
        try:
            plain = codec.decode(rec, d, length)
        except CorruptChunk:
            out.status, out.bad = "damaged", d
            return out
        out.verified.append(d)
        out.decoded += len(plain)
        if len(plain) != length:
            out.status = "short"
            return out
        h.update(plain)
    out.digest = h.digest()
    return out


def stored_hash(txn: Txn, ino: int) -> bytes | None:
    """blake3 of a stored file's content, or None if a chunk is missing or bad."""
    items = (
        (d, None if d == HOLE else cas.record(txn, d), n) for _o, d, n in all_extents(txn, ino)
    )
    return hash_chunks(items).digest

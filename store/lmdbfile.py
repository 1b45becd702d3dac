"""LMDB's file format read directly (pread, never the map): a walk of every tree
page a snapshot references, checking what LMDB itself takes on trust.

LMDB believes its pages: a page past the end of a cut-short file is a SIGBUS when
touched, a zeroed or garbled page header an assertion that aborts the process
(`IS_LEAF(mp)` in mdb_cursor_next). So before LMDB reads a database that may be
damaged, this walk looks at each page the trees reference (the main database,
each named one, and the freelist): it is in the file, its header names its own
page number, it is the kind of page its parent expects, and its nodes lie inside
it. `walk()` returns the first thing wrong, or None.

For reclaim.py, which gives free pages back to the filesystem: `metas()` (both
meta pages), `free_records()` (the freelist: which transaction freed which
pages) and `in_use()` (every page a snapshot references, overflow runs whole).

The layout is LMDB 0.9's on a 64-bit machine (lmdb.h, mdb.c): a page header of
16 bytes (pgno u64, pad u16, flags u16, lower and upper u16, or an overflow
page's count u32), then u16 node offsets; a node is lo, hi, flags, ksize (u16
each), the key, then the value (or the first overflow page's number). A meta page
holds, after the header, magic, version, address, map size, two database records
(the freelist's and the main one's, 48 bytes each, the root page last), the last
page number and the transaction id.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2, P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
PAGEHDR = 16
NODEHDR = 8
MAGIC = 0xBEEFC0DE
DB_SIZE = 48
DB_ROOT = 40  # of a database record
META = PAGEHDR
META_DBS = META + 24
META_LAST_PG = META_DBS + 2 * DB_SIZE
META_TXNID = META_LAST_PG + 8
INVALID = (1 << 64) - 1
_KINDS = P_BRANCH | P_LEAF | P_OVERFLOW | P_META | P_LEAF2 | P_SUBP


@dataclass
class Damage:
    page: int
    what: str
    past_end: bool = False  # the file is cut short (a page in use is not in it)

    def __str__(self) -> str:
        return f"page {self.page}: {self.what}"


def walk(data: str, psize: int, txnid: int | None = None) -> Damage | None:
    """The first damage in the trees of snapshot `txnid` (default: the newest meta
    page) of the LMDB file `data`, or None. The caller holds a read transaction of
    that snapshot, so a live writer does not reuse its pages meanwhile."""
    fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _Walk(fd, psize).run(txnid)
    finally:
        os.close(fd)


class _Walk:
    def __init__(self, fd: int, psize: int) -> None:
        self.fd = fd
        self.psize = psize
        self.npages = os.fstat(fd).st_size // psize
        self.seen: set[int] = set()
        self.spans: list[tuple[int, int]] | None = None  # overflow runs, when asked for

    def page(self, pg: int, n: int | None = None) -> bytes:
        return os.pread(self.fd, n or self.psize, pg * self.psize)

    def run(self, txnid: int | None) -> Damage | None:
        if self.npages < 2:
            return Damage(0, "the file is shorter than its two meta pages", past_end=True)
        metas = []
        for i in (0, 1):
            m = self.page(i)
            if struct.unpack_from("<I", m, META)[0] == MAGIC:
                metas.append(m)
        if not metas:
            return Damage(0, "neither meta page is an LMDB meta page")

        def tid(m: bytes) -> int:
            t: int = struct.unpack_from("<Q", m, META_TXNID)[0]
            return t

        meta = next((m for m in metas if tid(m) == txnid), max(metas, key=tid))
        last: int = struct.unpack_from("<Q", meta, META_LAST_PG)[0]
        stack: list[tuple[int, int]] = []  # (page, the page number whose node named it)
        for db in range(2):
            root: int = struct.unpack_from("<Q", meta, META_DBS + db * DB_SIZE + DB_ROOT)[0]
            stack.append((root, 0))
        while stack:
            pg, parent = stack.pop()
            if pg == INVALID:
                continue
            if pg > last:
                return Damage(parent, f"names page {pg}, past the last page {last}")
            if pg in self.seen:
                return Damage(parent, f"names page {pg}, which another node names too")
            self.seen.add(pg)
            bad = self.tree_page(pg, stack)
            if bad is not None:
                return bad
        return None

    def tree_page(self, pg: int, stack: list[tuple[int, int]]) -> Damage | None:
        if pg >= self.npages:
            return Damage(pg, "past the end of the file (cut short)", past_end=True)
        p = self.page(pg)
        own, flags, lower, upper = struct.unpack_from("<QxxHHH", p, 0)
        if own != pg:
            return Damage(pg, f"its header says page {own}")
        kind = flags & _KINDS
        if kind not in (P_BRANCH, P_LEAF):
            return Damage(pg, f"a branch or leaf page expected, flags {flags:#x}")
        if not (PAGEHDR <= lower <= upper <= self.psize) or (lower - PAGEHDR) % 2:
            return Damage(pg, f"bounds {lower}..{upper} do not fit a page")
        n = (lower - PAGEHDR) // 2
        if kind == P_BRANCH and n == 0:
            return Damage(pg, "a branch page with no children")
        for i in range(n):
            off: int = struct.unpack_from("<H", p, PAGEHDR + 2 * i)[0]
            if not upper <= off <= self.psize - NODEHDR:
                return Damage(pg, f"node {i} at {off}, outside the page's nodes")
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", p, off)
            at = off + NODEHDR + ksize
            if kind == P_BRANCH:
                if at > self.psize:
                    return Damage(pg, f"node {i}'s key runs past the page")
                stack.append((lo | hi << 16 | nflags << 32, pg))
                continue
            size = lo | hi << 16
            if nflags & ~(F_BIGDATA | F_SUBDATA) or nflags == F_BIGDATA | F_SUBDATA:
                return Damage(pg, f"node {i} has flags {nflags:#x}")
            if nflags & F_BIGDATA:
                if at + 8 > self.psize:
                    return Damage(pg, f"node {i}'s overflow page number runs past the page")
                ov: int = struct.unpack_from("<Q", p, at)[0]
                bad = self.overflow(ov, size, pg)
                if bad is not None:
                    return bad
            elif at + size > self.psize:
                return Damage(pg, f"node {i}'s value runs past the page")
            elif nflags & F_SUBDATA:
                if size != DB_SIZE:
                    return Damage(pg, f"node {i} names a database with a {size}-byte record")
                stack.append((struct.unpack_from("<Q", p, at + DB_ROOT)[0], pg))
        return None

    def overflow(self, ov: int, size: int, parent: int) -> Damage | None:
        if ov in self.seen:
            return Damage(parent, f"names overflow page {ov}, which another node names too")
        if ov >= self.npages:
            return Damage(ov, "past the end of the file (cut short)", past_end=True)
        self.seen.add(ov)
        own, flags, pages = struct.unpack_from("<QxxHI", self.page(ov, PAGEHDR), 0)
        if own != ov or flags & _KINDS != P_OVERFLOW:
            return Damage(ov, f"an overflow page expected, header says page {own} flags {flags:#x}")
        if pages * self.psize < size + PAGEHDR:
            return Damage(ov, f"{pages} overflow pages cannot hold {size} bytes")
        if ov + pages > self.npages:
            return Damage(self.npages, "past the end of the file (cut short)", past_end=True)
        if self.spans is not None:
            self.spans.append((ov, pages))
        return None


# -- what reclaim.py needs: the meta pages, the freelist, the pages in use --------


@dataclass(frozen=True)
class Meta:
    page: int  # 0 or 1
    txnid: int
    last_pg: int
    free_root: int  # the freelist tree's root page (INVALID: empty)
    main_root: int


def metas(fd: int, psize: int) -> list[Meta]:
    """The file's valid meta pages, newest last."""
    out = []
    for i in (0, 1):
        m = os.pread(fd, psize, i * psize)
        if len(m) < META_TXNID + 8 or struct.unpack_from("<I", m, META)[0] != MAGIC:
            continue
        roots = [struct.unpack_from("<Q", m, META_DBS + db * DB_SIZE + DB_ROOT)[0] for db in (0, 1)]
        last, txnid = struct.unpack_from("<QQ", m, META_LAST_PG)
        out.append(Meta(i, txnid, last, roots[0], roots[1]))
    return sorted(out, key=lambda m: m.txnid)


class FormatError(Exception):
    """A page is not what LMDB's format says it should be (a parsing bug, or damage)."""


def free_records(fd: int, psize: int, meta: Meta) -> dict[int, list[int]]:
    """The freelist of snapshot `meta`: for each record, the id of the transaction
    that freed the pages (its key) -> the page numbers. A record's value is an IDL:
    a count, then that many page numbers, u64 each (mdb.c, mdb_freelist_save); a
    long one sits in overflow pages."""
    out: dict[int, list[int]] = {}
    stack = [meta.free_root]
    while stack:
        pg = stack.pop()
        if pg == INVALID:
            continue
        p = os.pread(fd, psize, pg * psize)
        if len(p) < psize:
            raise FormatError(f"freelist page {pg} is past the end of the file")
        own, flags, lower, _upper = struct.unpack_from("<QxxHHH", p, 0)
        kind = flags & _KINDS
        if own != pg or kind not in (P_BRANCH, P_LEAF):
            raise FormatError(f"freelist page {pg}: header says page {own}, flags {flags:#x}")
        for i in range((lower - PAGEHDR) // 2):
            off: int = struct.unpack_from("<H", p, PAGEHDR + 2 * i)[0]
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", p, off)
            if kind == P_BRANCH:
                stack.append(lo | hi << 16 | nflags << 32)
                continue
            if ksize != 8:
                raise FormatError(f"freelist page {pg}: node {i} has a {ksize}-byte key")
            (key,) = struct.unpack_from("<Q", p, off + NODEHDR)
            size = lo | hi << 16
            at = off + NODEHDR + ksize
            if nflags & F_BIGDATA:
                (ov,) = struct.unpack_from("<Q", p, at)
                value = os.pread(fd, size, ov * psize + PAGEHDR)
            else:
                value = p[at : at + size]
            if len(value) != size or size % 8 or size < 8:
                raise FormatError(f"freelist record {key}: {size} bytes is not an IDL")
            n = struct.unpack_from("<Q", value, 0)[0]
            if (n + 1) * 8 > size:
                raise FormatError(f"freelist record {key}: {n} pages in {size} bytes")
            out[key] = list(struct.unpack_from(f"<{n}Q", value, 8))
    return out


def in_use(fd: int, psize: int, meta: Meta) -> list[tuple[int, int]]:
    """Every page snapshot `meta` references (the meta pages, every tree's pages,
    overflow runs whole), as sorted (first page, count) runs. FormatError if the
    walk finds damage: nothing may then be called free."""
    w = _Walk(fd, psize)
    w.spans = []
    bad = w.run(meta.txnid)
    if bad is not None:
        raise FormatError(str(bad))
    runs = sorted([(0, 2), *((pg, 1) for pg in w.seen), *w.spans])
    return runs

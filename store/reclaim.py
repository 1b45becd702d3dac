"""Giving LMDB's free pages back to the filesystem on a live store, by punching
holes in data.mdb (fallocate PUNCH_HOLE | KEEP_SIZE).

LMDB never shrinks its file: the pages a transaction frees go on its freelist
(FREE_DBI) and wait for later writes. After a mass delete and the compaction of
the packs it left mostly dead, `du` of the store therefore stays where it was;
only the offline `recompress` rewrites the file (upkeep.shrink_file), which a
live mount cannot do (other processes may have the environment open). A hole in
a free page gives its disk back while the file, and every page number, stays
as it is.

Which pages (the same rule LMDB uses to reuse a page, mdb.c mdb_page_alloc and
mdb_find_oldest): those of freelist records whose key, the transaction that
freed them, is below both the last committed transaction and the oldest
snapshot any reader of any process holds (lock.mdb's reader table). No snapshot
a reader can still be reading references them, nor the previous meta page's
(what a system crash falls back to, metasync being off). Plus the pages past the
last page in use, which no snapshot references.

Why nothing changes for LMDB:
- Punching runs inside an empty write transaction of our own, never inside a
  group (on a mount: a job on the writer thread). So no write transaction of
  this process or another (LMDB's writer lock) takes a page from the freelist
  meanwhile, and nothing is committed between the plan and the punch (checked:
  the newest meta page must still be the plan's, else the plan is dropped).
- Without MDB_WRITEMAP, LMDB never reads a page it takes from the freelist: it
  builds the page in memory and writes it whole at commit. A hole reads zeros
  and is never read.
- Belt and braces: the plan walks the trees of both meta pages
  (lmdbfile.in_use); a page both free and referenced means the format was
  misread: nothing is punched, and it is logged.
- A crash mid-punch leaves the same database: only free pages lost their bytes.
- A punched page takes disk again when LMDB reuses it; on a full disk that
  commit fails with ENOSPC like any write growing the store (kv.py, NoSpace).

Cost: planning (the tree walk) runs on the caller's thread holding only a read
transaction; punching holds the writer in batches of at most BATCH_SECONDS.
Filesystems that cannot punch holes (EOPNOTSUPP) are skipped quietly.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol, TypeVar

from . import lmdbfile
from .kv import Backend, LmdbBackend, Txn

if TYPE_CHECKING:
    from .lmdbfile import Meta

log = logging.getLogger("ferryfs.reclaim")

T = TypeVar("T")

MIN_BYTES = 256 << 10  # less than this on disk in free pages is not worth a walk
BATCH_SECONDS = 0.005  # the writer is held at most about this long at a time
MAX_RUN = 4096  # pages punched by one call (16 MiB): each call stays short

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class Host(Protocol):
    backend: Backend

    def transact(self, fn: Callable[[Txn], T]) -> T: ...


@dataclass
class Plan:
    """Free pages worth punching, as found in snapshot `txnid`."""

    txnid: int
    psize: int
    runs: list[tuple[int, int, int]]  # (first page, pages, newest freeing txnid; 0: past the end)
    data_bytes: int  # of those pages on disk now
    freed_by: dict[int, int]  # page -> the transaction that freed it (runs' pages, tail aside)

    def pieces(self, run: tuple[int, int, int], limit: int) -> list[tuple[int, int]]:
        """The parts of `run` whose pages were freed before transaction `limit`."""
        pg, n, newest = run
        if newest < limit:
            return [(pg, n)]
        out: list[tuple[int, int]] = []
        for p in range(pg, pg + n):
            if self.freed_by[p] >= limit:
                continue
            if out and out[-1][0] + out[-1][1] == p:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((p, 1))
        return out


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    out: Callable[[int, int, int, int], int] = fn
    return out


_fallocate = _libc_fallocate()


def punch(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of `fd`, keeping its size. OSError on failure."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def data_bytes(fd: int, start: int, end: int) -> int:
    """Bytes of [start, end) that hold data on disk (not holes): SEEK_DATA/SEEK_HOLE."""
    total, off = 0, start
    while off < end:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole to the end of the file
                break
            raise
        if d >= end:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        total += min(h, end) - d
        off = h
    return total


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for pg, n in sorted(runs):
        if out and pg <= out[-1][0] + out[-1][1]:
            first, m = out[-1]
            out[-1] = (first, max(m, pg + n - first))
        else:
            out.append((pg, n))
    return out


def _overlap(a: list[tuple[int, int, int]], used: list[tuple[int, int]]) -> int | None:
    """A page in both sorted run lists, or None."""
    i = j = 0
    while i < len(a) and j < len(used):
        s1, e1 = a[i][0], a[i][0] + a[i][1]
        s2, e2 = used[j][0], used[j][0] + used[j][1]
        if max(s1, s2) < min(e1, e2):
            return max(s1, s2)
        if e1 <= e2:
            i += 1
        else:
            j += 1
    return None


def plan(backend: LmdbBackend) -> Plan | None:
    """The free pages of the newest snapshot that hold data on disk, or None if the
    database changed while looking (look again later). FormatError if a page is
    both free and in use."""
    data, psize = backend.data_file()
    with backend.read():  # our snapshot and the one before keep their pages meanwhile
        fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ms = lmdbfile.metas(fd, psize)
            if not ms:
                return None
            try:
                p = _plan(fd, psize, ms)
            except lmdbfile.FormatError:
                if lmdbfile.metas(fd, psize) != ms:  # a commit moved the pages under us
                    return None
                raise
            if lmdbfile.metas(fd, psize) != ms:
                return None
            return p
        finally:
            os.close(fd)


def _plan(fd: int, psize: int, ms: list[Meta]) -> Plan:
    new = ms[-1]
    newest: dict[int, int] = {}  # page -> the transaction that freed it
    for key, pages in lmdbfile.free_records(fd, psize, new).items():
        if key < new.txnid:  # the last transaction's own are still the meta before's
            for pg in pages:
                newest[pg] = key
    runs: list[tuple[int, int, int]] = []
    for pg in sorted(newest):
        if runs and runs[-1][0] + runs[-1][1] == pg and runs[-1][1] < MAX_RUN:
            first, n, k = runs[-1]
            runs[-1] = (first, n + 1, max(k, newest[pg]))
        else:
            runs.append((pg, 1, newest[pg]))
    npages = os.fstat(fd).st_size // psize
    tail = new.last_pg + 1
    while tail < npages:
        n = min(MAX_RUN, npages - tail)
        runs.append((tail, n, 0))
        tail += n
    kept, total = [], 0
    for r in runs:
        b = data_bytes(fd, r[0] * psize, (r[0] + r[1]) * psize)
        if b:
            kept.append(r)
            total += b
    if total < MIN_BYTES:
        return Plan(new.txnid, psize, [], total, {})  # not worth the walk below
    used = _merge([r for m in ms for r in lmdbfile.in_use(fd, psize, m)])
    both = _overlap(kept, used)
    if both is not None:
        raise lmdbfile.FormatError(f"page {both} is on the freelist and in use")
    return Plan(new.txnid, psize, kept, total, newest)


class _Stale(Exception):
    """The database changed since the plan: drop it."""


def _punch_batch(backend: LmdbBackend, p: Plan, start: int) -> tuple[int, int]:
    """Punch runs of `p` from index `start` for at most BATCH_SECONDS, inside the
    caller's (empty, top-level) write transaction; (next index, bytes given back)."""
    if backend.grouped():
        raise _Stale("inside a shared transaction")
    data, psize = backend.data_file()
    fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
    try:
        ms = lmdbfile.metas(fd, psize)
        if not ms or ms[-1].txnid != p.txnid:
            raise _Stale("a transaction was committed since the plan")
        oldest = backend.oldest_reader()
        limit = p.txnid if oldest is None else min(p.txnid, oldest)
        before = os.fstat(fd).st_blocks
        deadline = time.monotonic() + BATCH_SECONDS
        i = start
        while i < len(p.runs) and (i == start or time.monotonic() < deadline):
            # (A reader that began since the plan may read the pages freed since it.)
            for pg, n in p.pieces(p.runs[i], limit):
                punch(fd, pg * psize, n * psize)
            i += 1
        return i, max(0, before - os.fstat(fd).st_blocks) * 512
    finally:
        os.close(fd)


def _job(b: LmdbBackend, p: Plan, start: int, _txn: Txn) -> tuple[int, int]:
    return _punch_batch(b, p, start)


def run(s: Host, stop: Callable[[], bool] | None = None) -> int:
    """Give back the free pages of `s`'s database that hold disk, if at least
    MIN_BYTES do, as long as `stop` allows; the bytes given back. A store not in
    LMDB, read-only, or on a filesystem without hole punching: 0."""
    b = s.backend
    if not isinstance(b, LmdbBackend) or b.readonly or _fallocate is None:
        return 0
    data, psize = b.data_file()
    fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ms = lmdbfile.metas(fd, psize)
    finally:
        os.close(fd)
    if not ms or ms[-1].txnid == b.reclaim_looked:
        return 0  # nothing committed since we last found nothing worth giving back
    try:
        p = plan(b)
    except lmdbfile.FormatError as e:
        log.error("not giving free pages back: %s (a misread of LMDB's format?)", e)
        b.reclaim_looked = ms[-1].txnid
        return 0
    if p is None:
        return 0
    if p.data_bytes < MIN_BYTES:
        b.reclaim_looked = p.txnid
        return 0
    done, i = 0, 0
    while i < len(p.runs):
        if stop is not None and stop():
            return done
        try:
            i, n = s.transact(partial(_job, b, p, i))
        except _Stale:
            return done  # looked at again once the store is quiet
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                log.info("the store's filesystem cannot punch holes (%s): free pages kept", e)
                b.reclaim_looked = p.txnid
                return done
            raise
        done += n
        b.given_back += n
    b.reclaim_looked = p.txnid
    if done:
        log.info("gave %.1f MB of free database pages back to the filesystem", done / 1e6)
    return done

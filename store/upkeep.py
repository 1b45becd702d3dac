"""Idle-time work on chunk records: moving small records stored alone (schema 1)
into packs, compacting mostly dead packs, training the store's zstd dictionary
(dictionaries.py), and (recompress.py) cold recompression.

Each piece is one short write transaction (a few milliseconds: at most one pack,
about 512 KiB, copied), so the writer is never held long; `stop` is polled
between pieces, so a foreground request pre-empts the work as it does the sweep.
A crash between pieces loses nothing: each piece moves its chunks whole, and
the next run finds what is left from the store itself (the upgrade's cursor is
in meta; compaction looks for victims afresh).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Protocol, TypeVar

import lmdb

from . import dictionaries, packs, reclaim, recompress
from .dictionaries import Dictionary
from .kv import DBS, Backend, LmdbBackend, Txn
from .records import HOLE, U64, unpack_extent
from .storedir import fsync_dir

if TYPE_CHECKING:
    from .store import Store

T = TypeVar("T")
log = logging.getLogger("ferryfs.upkeep")

# A store without enough text to train a dictionary is looked at again once this
# many packs (512 KiB each) were made since.
RETRY_PACKS = 8
TRIED = b"dict.tried"  # packs.next when training was last tried and found too little
WALKED = b"recompress.walked"  # when idle recompression last walked the whole store
WALK_EVERY = 3600  # seconds: files turn cold by the day, a walk an hour is plenty


class Host(Protocol):
    backend: Backend
    dictionary: Dictionary | None

    def transact(self, fn: Callable[[Txn], T]) -> T: ...


def upgrade(s: Host, stop: Callable[[], bool] | None = None) -> bool:
    """Move schema 1's small records into packs until done (True) or `stop` says so."""
    while True:
        with s.backend.read() as txn:
            if packs.upgraded(txn):
                return True
        if s.transact(packs.upgrade_batch):
            return True
        if stop is not None and stop():
            return False


def compact(s: Host, stop: Callable[[], bool] | None = None) -> int:
    """Compact the mostly dead packs, one per transaction; the packs compacted.
    Stops early when `stop` says so (what is left is found again next time)."""
    done = 0
    stuck: set[int] = set()  # kept by chunks that cannot be moved (damage: fsck's)
    while True:
        with s.backend.read() as txn:
            victims = packs.victims(txn, skip=stuck)
            if not victims:
                return done
            members = packs.members(txn, set(victims))
        for pack in victims:
            if stop is not None and stop():
                return done
            chunks = members[pack]
            s.transact(partial(packs.move_out, pack=pack, chunks=chunks))
            with s.backend.read() as txn:
                if packs.info(txn, pack) is None:
                    done += 1
                else:
                    stuck.add(pack)


def train(s: Host) -> bool:
    """Train the store's dictionary if it has none and enough text (dictionaries.py);
    tried again only once the store has grown by `RETRY_PACKS` packs since."""
    if s.dictionary is not None:
        return False
    with s.backend.read() as txn:
        nv = txn.get("meta", packs.NEXT_KEY)
        made = U64.unpack(nv)[0] if nv is not None else 0
        tv = txn.get("meta", TRIED)
        if tv is not None and made < U64.unpack(tv)[0] + RETRY_PACKS:
            return False
    d = dictionaries.train(s)
    if d is None:
        s.transact(lambda txn: txn.put("meta", TRIED, U64.pack(made)))
        return False
    s.dictionary = d
    return True


def step(s: Host, stop: Callable[[], bool] | None = None) -> bool:
    """Do what chunk upkeep there is (upgrade, compaction, training a dictionary),
    as long as `stop` allows; True if there was anything to do."""
    with s.backend.read() as txn:
        todo = not packs.upgraded(txn)  # (each upgrade batch moves its cursor on)
    if upgrade(s, stop) and compact(s, stop):
        todo = True
    if stop is not None and stop():
        return todo
    return train(s) or todo


class OnWriter:
    """A store as upkeep needs it, whose transactions run on another thread (a
    mount's writer: `call` hands a function over and waits for its result), so
    the CPU work (decoding, compressing, training) runs on the caller's thread."""

    def __init__(self, store: Host, call: Callable[[Callable[[], object]], object]) -> None:
        self.store = store
        self.backend = store.backend
        self._call = call

    @property
    def dictionary(self) -> Dictionary | None:
        return self.store.dictionary

    @dictionary.setter
    def dictionary(self, d: Dictionary | None) -> None:
        self.store.dictionary = d

    def transact(self, fn: Callable[[Txn], T]) -> T:
        out = self._call(partial(self.store.transact, fn))
        return out  # type: ignore[return-value]


def idle(
    s: Host,
    stop: Callable[[], bool],
    cold_days: float = recompress.COLD_DAYS,
    now_ns: int | None = None,
    progress: Callable[[recompress.Result], None] | None = None,
) -> bool:
    """All the idle work on chunk records, for a sweep with nothing left to migrate:
    `step`, then cold recompression (its full walk at most once per `WALK_EVERY`
    seconds; `progress` as recompress.run's), then giving the database's free pages
    back to the filesystem (reclaim.py). True if there was work (done, or left for
    next time by `stop`)."""
    if step(s, stop):
        return True
    if stop():
        return False
    now_ns = time.time_ns() if now_ns is None else now_ns
    with s.backend.read() as txn:
        v = txn.get("meta", WALKED)
        due = v is None or now_ns - U64.unpack(v)[0] >= WALK_EVERY * 1e9
    if due:
        r = recompress.run(s, cold_days, stop=stop, progress=progress, now_ns=now_ns)
        if r.done:
            s.transact(lambda txn: txn.put("meta", WALKED, U64.pack(now_ns)))
        if r.chunks_recompressed:
            compact(s, stop)
        if not r.done or r.chunks_recompressed > 0:
            return True
    if stop():
        return False
    # Last: compaction and recompression free the pages this gives back.
    return reclaim.run(s, stop) > 0


def shrink_file(s: Store) -> tuple[int, int] | None:
    """Rewrite the store's database without its free pages and with full B-tree
    pages (kv.copy_compact), for an offline command that holds the store's writer
    lock and writes nothing after: the Store's database is closed here (only
    `close()` may follow). LMDB never gives pages back to the filesystem, and a
    large value needs contiguous free pages, so after a recompression or a mass
    delete the file keeps the old records' pages. The copy replaces data.mdb by
    rename: a crash leaves the old file or the new one. (before, after) bytes on
    disk, or None for a store not on disk or one another process has open.

    Another process with the environment open (`ferryfs stats` or `search`
    beside the command) shares lock.mdb, whose record of the last transaction
    decides which of the two meta pages a reader reads: the new file's
    transactions are numbered afresh, so after a swap under it that process, and
    any process opening the store while it still has lock.mdb, would read the
    wrong meta page. So the swap happens only while no other process has the
    environment open (LMDB's own test: an exclusive lock on lock.mdb's first
    byte, which every open environment holds shared), holding that lock until
    LMDB, opening the new file as its first user, has reset lock.mdb."""
    if not isinstance(s.backend, LmdbBackend) or s.readonly:
        return None
    db = s.backend.path
    tmp = os.path.join(db, "shrink.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a copy a crash left behind
    os.mkdir(tmp, 0o700)
    try:
        before = s.backend.disk_bytes()
        s.backend.copy_compact(tmp, lead={"chunks": _alone_in_file_order(s)})
        new = os.path.join(tmp, "data.mdb")
        fd = os.open(new, os.O_RDONLY)
        try:
            os.fchmod(fd, 0o600)  # the store is private (LMDB made it by the umask)
            os.fsync(fd)
            after = os.fstat(fd).st_blocks * 512
        finally:
            os.close(fd)
        s.readahead.close()  # (its thread reads the environment)
        s.backend.close()  # this process's own locks on lock.mdb go with it
        with _alone(db) as alone:
            if not alone:
                log.warning("database not rewritten: another process has the store open")
                return None
            os.rename(new, os.path.join(db, "data.mdb"))
            fsync_dir(db)
            # First user of the new file (the lock above is this process's, so LMDB's
            # own exclusive lock succeeds): LMDB resets lock.mdb from its meta pages.
            lmdb.open(db, readonly=True, max_dbs=len(DBS) + 1, lock=True).close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return before, after


def _alone_in_file_order(s: Store) -> list[bytes]:
    """The digests of the chunks stored alone (not in a pack: the large ones), in
    the order the files hold them, each once: the order the rewrite lays their
    pages out in (kv.copy_compact), so that reading a file reads its pages in
    turn."""
    seen: set[bytes] = set()
    out: list[bytes] = []
    with s.backend.read() as txn:
        for k, v in txn.range("extents", b""):
            _off, digest, _n = unpack_extent(k, v)
            if digest == HOLE or digest in seen:
                continue
            seen.add(digest)
            rec = txn.get("chunks", digest)
            if rec is not None and not packs.is_pointer(rec):
                out.append(digest)
    return out


@contextlib.contextmanager
def _alone(db: str) -> Iterator[bool]:
    """Whether no other process has the LMDB environment in `db` open, holding
    lock.mdb's first byte exclusively meanwhile (a process opening it waits)."""
    try:
        fd = os.open(os.path.join(db, "lock.mdb"), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True  # no lock file: nobody has it open
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)  # (releases the lock: POSIX record locks go with any close)

"""The key-value layer under the store: named, ordered databases in transactions.

Two backends honour one contract (the store's contract tests run on both):
`LmdbBackend` (the real one) and `MemoryBackend` (kvmem.py, for tests). Everything above
this module speaks only `Txn`, so no LMDB handle leaks into the rest of the store.

A transaction is used inside one function call and never across an `await`:
LMDB write transactions belong to the thread that began them. Which threads of
a mount may begin one (its writer: `write_guard` checks): docs/concurrency.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Protocol

import lmdb

from . import lmdbcopy, lmdbfile
from .errors import StoreDamaged, StoreUnusable

DBS = (
    "meta",
    "inodes",
    "dirents",
    "extents",
    "chunks",
    "refs",
    "pending",
    "legacy",
    "p3ino",
    "xattrs",
    "index",
    "points",
    "errors",
    "packs",
    "packinfo",
    "dicts",
)

Buf = bytes | memoryview


class MapFull(Exception):
    """The LMDB map is full; the backend grows it and the caller retries."""


class GroupBroken(Exception):
    """A shared write transaction (`Backend.group`) cannot commit: one of its
    nested transactions met what only a transaction of its own can handle (a full
    map, a transaction too big). Nothing of the group is committed; its jobs are
    to be run again, each in its own transaction."""


# What LMDB raises when a page is not what it should be: the database is damaged.
# (MapFull, a full disk and usage errors are not among them.)
_DAMAGE: tuple[type[lmdb.Error], ...] = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.BadTxnError,
    lmdb.InvalidError,
    lmdb.PanicError,
    lmdb.PageFullError,
    lmdb.IncompatibleError,
    lmdb.VersionMismatchError,
    lmdb.ProblemError,
)


# At open, EINVAL or ENOMEM come from a meta page's garbage (a page size or map
# size no LMDB wrote), not from our arguments.
_DAMAGE_AT_OPEN: tuple[type[lmdb.Error], ...] = (
    *_DAMAGE,
    lmdb.InvalidParameterError,
    lmdb.MemoryError,
)


def _damaged(e: lmdb.Error) -> StoreDamaged:
    return StoreDamaged(f"the store's database is damaged ({e}); {StoreDamaged.advice}")


class Txn(Protocol):
    # Per-transaction state of the layers above (packs.py's pack being filled),
    # dropped with the transaction whether it commits or not.
    local: dict[str, object]

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Run `fn` in this write transaction just before it commits (not on abort)."""
        ...

    def get(self, db: str, key: bytes) -> Buf | None: ...
    def put(self, db: str, key: bytes, value: Buf) -> None: ...
    def delete(self, db: str, key: bytes) -> bool: ...
    def range(
        self, db: str, start: bytes, stop: bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, Buf]]:
        """Items with start <= key < stop (stop None: to the end), in key order,
        or in reverse order from the greatest key below `stop` down to `start`."""
        ...


def delete_first(txn: Txn, db: str, start: bytes, stop: bytes, n: int) -> int:
    """Delete the first `n` keys of `db` in [start, stop); how many went. Callers that
    empty a large range call it once a transaction, until it returns less than `n`."""
    keys = [k for k, _ in islice(txn.range(db, start, stop), n)]
    for k in keys:
        txn.delete(db, k)
    return len(keys)


# Called as a write transaction begins, on the thread that begins it: a mount
# installs its writer's check here (fs/writer.py, docs/concurrency.md).
WriteGuard = Callable[[], None]


class Backend(Protocol):
    write_guard: WriteGuard | None

    def read(self) -> contextlib.AbstractContextManager[Txn]: ...
    def write(self) -> contextlib.AbstractContextManager[Txn]: ...
    def group(self) -> contextlib.AbstractContextManager[None]:
        """Group commit: every `write()` this thread begins inside the block is a
        nested transaction of one shared transaction (a failing one is undone alone;
        the others stay), and `read()` on this thread sees the group's changes. The
        block's end commits the group, with one sync; GroupBroken (nothing
        committed) if a nested transaction hit MapFull or the like, or the commit
        itself failed as `write()`'s would."""
        ...

    def grouped(self) -> bool:
        """Whether this thread is inside `group()` (MapFull must not grow the map there)."""
        ...

    def grow(self) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...
    def disk_bytes(self) -> int: ...


class _LmdbTxn:
    __slots__ = ("_dbs", "_txn", "hooks", "local")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, lmdb._Database]) -> None:
        self._txn = txn
        self._dbs = dbs
        self.hooks: list[Callable[[], None]] = []
        self.local: dict[str, object] = {}

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.hooks.append(fn)

    def get(self, db: str, key: bytes) -> Buf | None:
        h = self._dbs.get(db)
        if h is None:  # read-only, a store from before this database existed
            return None
        v: Buf | None = self._txn.get(key, db=h)
        return v

    def put(self, db: str, key: bytes, value: Buf) -> None:
        try:
            self._txn.put(key, value, db=self._dbs[db])
        except lmdb.MapFullError as e:
            raise MapFull() from e

    def delete(self, db: str, key: bytes) -> bool:
        try:
            ok: bool = self._txn.delete(key, db=self._dbs[db])
        except lmdb.MapFullError as e:  # a delete copies pages too
            raise MapFull() from e
        return ok

    def range(
        self, db: str, start: bytes, stop: bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, Buf]]:
        if db not in self._dbs:  # read-only, a store from before this database existed
            return
        with self._txn.cursor(db=self._dbs[db]) as cur:
            if not reverse:
                if not cur.set_range(start):
                    return
                for k, v in cur:
                    kb = bytes(k)
                    if stop is not None and kb >= stop:
                        return
                    yield kb, v
            else:
                if stop is None:
                    ok = cur.last()
                else:
                    ok = cur.set_range(stop)
                    ok = cur.prev() if ok else cur.last()
                while ok:
                    kb = bytes(cur.key())
                    if kb < start:
                        return
                    yield kb, cur.value()
                    ok = cur.prev()


class _GroupView:
    """Reads through the innermost transaction of a group, whichever it is at the
    time of each call (a nested write may begin while the view is held)."""

    __slots__ = ("_dbs", "_stack", "local")

    def __init__(self, stack: list[lmdb.Transaction], dbs: dict[str, lmdb._Database]) -> None:
        self._stack = stack
        self._dbs = dbs
        # A read's own: a pack a job is filling is written before its nested
        # transaction commits, so what a group reads is never in a fill.
        self.local: dict[str, object] = {}

    def on_commit(self, fn: Callable[[], None]) -> None:
        raise AssertionError("on_commit in a read transaction")

    def get(self, db: str, key: bytes) -> Buf | None:
        return _LmdbTxn(self._stack[-1], self._dbs).get(db, key)

    def put(self, db: str, key: bytes, value: Buf) -> None:
        raise AssertionError("put in a read transaction")

    def delete(self, db: str, key: bytes) -> bool:
        raise AssertionError("delete in a read transaction")

    def range(
        self, db: str, start: bytes, stop: bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, Buf]]:
        return _LmdbTxn(self._stack[-1], self._dbs).range(db, start, stop, reverse)


class LmdbBackend:
    """One LMDB environment in `path` with the named databases of DBS.

    Durability: `metasync=False` keeps the database intact on a system crash
    (data pages are synced, the meta page is not); a system crash may undo the
    last transactions, which `sync()` (called on fsync) makes durable.
    """

    INITIAL_MAP = 1 << 30

    def __init__(
        self,
        path: str,
        readonly: bool = False,
        map_size: int | None = None,
        shown: str | None = None,
        verify: bool = False,
        readahead: bool = True,
    ) -> None:
        """`shown`: the directory's name in messages, when `path` is a /proc/self/fd one.
        `verify`: walk every page in use first (fsck), so that damage is StoreDamaged
        before LMDB reads a page it would abort on. `readahead=False`: pages are read
        from disk one at a time (MADV_RANDOM), for a process that looks at a few
        records of a cold store (a search): the kernel's read-around would otherwise
        read megabytes for each."""
        self.path = path
        self.readonly = readonly
        # The map is address space, not disk (the file grows as pages are written), so
        # make it as big as the filesystem holding it: growing it later needs every
        # transaction of the process closed, and worker threads hold read ones.
        size = map_size or max(self.INITIAL_MAP, _capacity(path))
        data = self._data = os.path.join(path, "data.mdb")
        self._shown = os.path.join(shown or path, "data.mdb")
        had = os.path.getsize(data) if os.path.exists(data) else None
        if had == 0:
            # LMDB would quietly make a new, empty database of it.
            raise StoreDamaged(f"{self._shown} is empty (truncated?); {StoreDamaged.advice}")
        if had is not None:
            size = max(size, had * 2)
        try:
            self._env = lmdb.open(
                path,
                map_size=size,
                max_dbs=len(DBS) + 1,
                readonly=readonly,
                metasync=False,
                sync=not readonly,
                readahead=readahead,
                max_readers=256,
                lock=True,
                mode=0o600,
            )
        except _DAMAGE_AT_OPEN as e:
            raise StoreDamaged(
                f"{self._shown} is not a usable LMDB file ({e}); {StoreDamaged.advice}"
            ) from None
        except lmdb.Error as e:  # not allowed, no space, too many readers...
            raise StoreUnusable(f"cannot open {self._shown}: {e}") from None
        self.write_guard: WriteGuard | None = None
        self._lock = threading.Lock()
        self._gate = threading.Condition()
        self._readers = 0
        self._growing = False
        self._local = threading.local()
        self._dbs: dict[str, lmdb._Database] = {}
        # reclaim.py's, for this process: bytes given back to the filesystem, and the
        # transaction whose free pages it last found nothing left to give back of.
        self.given_back = 0
        self.reclaim_looked = -1
        try:
            self._check_length(data)
            damage = self.verify() if verify else None
            if damage is not None:
                raise StoreDamaged(f"{self._shown} is damaged ({damage}); {StoreDamaged.advice}")
            self._open_dbs()
        except _DAMAGE as e:
            self._env.close()
            raise _damaged(e) from e
        except BaseException:
            self._env.close()
            raise

    def data_file(self) -> tuple[str, int]:
        """data.mdb's path and LMDB's page size (reclaim.py reads the file itself)."""
        psize: int = self._env.stat()["psize"]
        return self._data, psize

    def oldest_reader(self) -> int | None:
        """The oldest snapshot a read transaction of any process holds now (lock.mdb's
        reader table, once the slots of dead processes are cleared), or None."""
        self._env.reader_check()
        ids = []
        for line in self._env.readers().splitlines()[1:]:
            f = line.split()
            if len(f) == 3 and f[2].isdigit():  # "-": a slot kept for reuse, no snapshot
                ids.append(int(f[2]))
        return min(ids, default=None)

    def _open_dbs(self) -> None:
        if self.readonly:
            for name in DBS:
                with contextlib.suppress(lmdb.NotFoundError):
                    self._dbs[name] = self._env.open_db(name.encode(), create=False)
        else:
            for name in DBS:
                self._dbs[name] = self._env.open_db(name.encode())

    def has_db(self, name: str) -> bool:
        return name in self._dbs

    # Pages past the end of a short file are mapped but not backed: touching one kills
    # the process with SIGBUS. But a file shorter than the meta page's last page is not
    # always cut short: LMDB never writes pages that the transaction which allocated
    # them also freed, so the last pages may be on the freelist and never written.
    # Only pages the trees reference must be in the file; a writer then extends the
    # file (sparsely) to the length the meta page names, so it is not short again.

    def _need(self) -> int:
        need: int = (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]
        return need

    def _check_length(self, data: str) -> None:
        # A live writer writes pages before the meta page: size the file after reading it.
        need = self._need()
        if os.path.getsize(data) >= need:
            return
        damage = self.verify()
        if damage is not None:
            size = os.path.getsize(data)
            raise StoreDamaged(
                f"{self._shown} is truncated ({size} bytes; {damage}); {StoreDamaged.advice}"
                if damage.past_end
                else f"{self._shown} is damaged ({damage}); {StoreDamaged.advice}"
            )
        if not self.readonly:
            self._cover()

    def verify(self) -> lmdbfile.Damage | None:
        """The first damage to the structure of the database (a page cut off, or not
        what its parent says), found without LMDB touching a page; None if sound."""
        with self._env.begin() as txn:  # a reader: the writer keeps this snapshot's pages
            return lmdbfile.walk(self._data, self._env.stat()["psize"], txn.id())

    def _cover(self) -> None:
        """Extend data.mdb, a hole, to the length the meta page names (writer only).
        Best effort: after a commit, a failure here must not look like the commit's."""
        need = self._need()
        with contextlib.suppress(OSError):
            if os.stat(self._data).st_size < need:
                os.truncate(self._data, need)

    @contextlib.contextmanager
    def read(self) -> Iterator[Txn]:
        stack = getattr(self._local, "group", None)
        if stack:
            # The writer inside a group reads what the group wrote so far (a snapshot
            # would not have it: a job after a create must find the new file).
            yield _GroupView(stack, self._dbs)
            return
        self._enter_read()
        try:
            try:
                txn = self._env.begin(buffers=True)
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)
                txn = self._env.begin(buffers=True)
            try:
                yield _LmdbTxn(txn, self._dbs)
            except _DAMAGE as e:
                raise _damaged(e) from e
            finally:
                txn.abort()
        finally:
            self._leave_read()

    # Growing the map remaps it: no other thread may hold a read transaction then
    # (its buffers point into the old mapping). Readers are counted per thread, so
    # a thread that grows, or nests reads, never waits for itself.

    def _enter_read(self) -> None:
        mine = getattr(self._local, "readers", 0)
        with self._gate:
            while self._growing and mine == 0:
                self._gate.wait()
            self._readers += 1
        self._local.readers = mine + 1

    def _leave_read(self) -> None:
        self._local.readers -= 1
        with self._gate:
            self._readers -= 1
            self._gate.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[Txn]:
        if self.write_guard is not None:
            self.write_guard()
        stack = getattr(self._local, "group", None)
        if stack:
            with self._nested(stack) as nested:
                yield nested
            return
        with self._lock:
            # Copies, not views: a view into a page goes stale when the same transaction
            # writes (a class of bug, not a case to remember at each call site).
            txn = self._env.begin(write=True, buffers=False)
            try:
                t = _LmdbTxn(txn, self._dbs)
                yield t
                for fn in t.hooks:
                    fn()
            except _DAMAGE as e:
                txn.abort()
                raise _damaged(e) from e
            except BaseException:
                txn.abort()
                raise
            self._commit(txn)
            self._cover()

    def _commit(self, txn: lmdb.Transaction) -> None:
        try:
            txn.commit()
        except lmdb.MapFullError as e:
            raise MapFull() from e
        except lmdb.Error as e:
            # A full disk shows as ENOSPC or, from some filesystems (tmpfs), as EIO
            # from the page flush: tell them apart by the space left.
            full = "No space" in str(e) or self._nearly_full()
            raise OSError(errno.ENOSPC if full else errno.EIO, str(e)) from e

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        if self.write_guard is not None:
            self.write_guard()
        with self._lock:
            txn = self._env.begin(write=True, buffers=False)
            self._local.group, self._local.broken = [txn], None
            try:
                yield
                if self._local.broken is not None:
                    raise GroupBroken(self._local.broken)
            except BaseException:
                txn.abort()
                raise
            finally:
                self._local.group = None
            try:
                self._commit(txn)  # the one sync of every job in the group
            except (MapFull, OSError) as e:
                raise GroupBroken(f"the shared commit failed: {e!r}") from e
            self._cover()

    def grouped(self) -> bool:
        return bool(getattr(self._local, "group", None))

    @contextlib.contextmanager
    def _nested(self, stack: list[lmdb.Transaction]) -> Iterator[Txn]:
        """A transaction nested in the group's: committed into it (no I/O), or
        aborted alone, leaving what the group's other jobs wrote."""
        if self._local.broken is not None:  # the group will be undone: do nothing more
            raise GroupBroken(self._local.broken)
        txn = self._env.begin(write=True, parent=stack[-1], buffers=False)
        stack.append(txn)
        try:
            try:
                t = _LmdbTxn(txn, self._dbs)
                yield t
                for fn in t.hooks:  # as write()'s: what the job left to write at its end
                    fn()
                txn.commit()
            except BaseException as e:
                if stack[-1] is txn:
                    with contextlib.suppress(lmdb.Error):
                        txn.abort()
                if isinstance(e, MapFull | lmdb.Error):  # a full map, a full transaction
                    self._local.broken = repr(e)
                if isinstance(e, _DAMAGE):
                    raise _damaged(e) from e
                if isinstance(e, lmdb.MapFullError):
                    raise MapFull() from e
                raise
        finally:
            stack.pop()

    def _nearly_full(self) -> bool:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize < 16 << 20

    def grow(self) -> None:
        """Double the map, once no other thread holds a read transaction."""
        with self._lock:
            mine = getattr(self._local, "readers", 0)
            with self._gate:
                self._growing = True
                while self._readers > mine:
                    self._gate.wait()
            try:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            finally:
                with self._gate:
                    self._growing = False
                    self._gate.notify_all()

    def map_size(self) -> int:
        size: int = self._env.info()["map_size"]
        return size

    def sync(self) -> None:
        self._env.sync(True)

    def close(self) -> None:
        self._env.close()

    def disk_bytes(self) -> int:
        st = os.stat(os.path.join(self.path, "data.mdb"))
        return st.st_blocks * 512

    def copy_compact(self, dest: str, lead: Mapping[str, Iterable[bytes]] | None = None) -> None:
        """Write this database as `dest`/data.mdb, without free pages and with full
        B-tree pages (lmdbcopy.py)."""
        lmdbcopy.copy(self._env, dest, self.map_size(), len(DBS) + 1, lead)


def create_environment(path: str) -> None:
    """An empty LMDB environment in the directory `path` (a new store's database)."""
    lmdb.open(path, map_size=1 << 20, max_dbs=len(DBS) + 1, mode=0o600).close()


def _capacity(path: str) -> int:
    """Bytes of the filesystem holding `path`, rounded up to GiB (at most 16 TiB)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    gib = 1 << 30
    return min(-(-st.f_blocks * st.f_frsize // gib) * gib, 16 << 40)

"""The store facade: one store directory, one LMDB environment, every operation
as one transaction inside one call.

`transact` is the one way to write: it runs a function of one write
transaction (the POSIX rules in namespace.py, rewrites in content.py,
migrations in migration.py), retries it when the map must grow, and refuses
when the store is read-only or in failsafe. Writes take the store's writer lock
(a flock on its data.mdb, see storedir.py), so one process writes a store at a
time; readers (`stats`, `fsck`, `search`) open it read-only beside a writer and
see consistent snapshots. Heavy work (chunking, hashing, compression) happens
in `prepare_*`/`plan_*` calls under read transactions only; the matching
`commit_*` call is a short write transaction that checks nothing moved
underneath (the inode's version). Never write: getattr, read_stored, data_ranges,
plan_write, prepare_migration (its `spill` may), stats, errors, the iterators. May
write: lookup/readdir (list an UNLISTED directory), read (migrates), read_or_heal,
open_legacy/read_legacy (record an error), and the rest (docs/concurrency.md).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TypeVar

from . import cas, content, dictionaries, file_errors, files, migration
from . import namespace as ns
from . import stats as figures
from .chunker import Chunker
from .dictionaries import Dictionary
from .errors import NoSpace, ReadOnly, SchemaMismatch, StoreMissing
from .kv import Backend, LmdbBackend, MapFull, Txn
from .kvmem import MemoryBackend
from .migration import LIST_AHEAD, Migration, Spill
from .phase3 import Phase3File, Phase3Tree
from .readahead import ReadAhead
from .records import READABLE_SCHEMAS, SCHEMA_VERSION, U64, Inode
from .stats import Stats
from .storedir import StoreDir

T = TypeVar("T")


class Store:
    """A Phase 4 store, optionally bound to the Phase 3 tree it imports from."""

    def __init__(
        self,
        backend: Backend,
        tree: Phase3Tree | None = None,
        path: str | None = None,
        readonly: bool = False,
        keep_orphans: bool = False,
    ) -> None:
        self.backend = backend
        self.tree = tree
        self.path = path
        self.readonly = readonly
        # The FUSE adapter keeps unlinked inodes while the kernel still knows them.
        self.keep_orphans = keep_orphans
        self.cache = cas.ChunkCache()
        self.readahead = ReadAhead(backend, lambda: self.cache)
        self.failsafe: str | None = None
        # Write transactions committed by this process: a cheap "has anything
        # changed" for callers that cache what they read (the mount's status).
        self.commits = 0
        self.dir: StoreDir | None = None  # the store directory, when on disk
        self.chunker = Chunker()
        # The zstd dictionary new text chunks are compressed with (dictionaries.py).
        self.dictionary: Dictionary | None = None

    # -- opening -------------------------------------------------------------

    @classmethod
    def memory(cls, source: str | None = None, keep_orphans: bool = False) -> Store:
        s = cls(MemoryBackend(), keep_orphans=keep_orphans)
        s.tree = Phase3Tree.open(source) if source else None
        s._init_or_check(source)
        return s

    @classmethod
    def open(
        cls,
        path: str,
        source: str | None = None,
        create: bool = False,
        readonly: bool = False,
        keep_orphans: bool = False,
        tree: Phase3Tree | None = None,
        verify: bool = False,
    ) -> Store:
        """Open the store at `path` (creating it from `source` if `create` and nothing
        is at `path`). The directory is checked and opened by `StoreDir`; a writer
        holds its lock until `close()`. `verify`: check every database page in use
        first (fsck; see LmdbBackend)."""
        sd = StoreDir.open(path, create=create and not readonly)
        try:
            if not readonly:
                sd.lock()
            shown = os.path.join(sd.path, "db")
            backend = LmdbBackend(sd.db_path, readonly=readonly, shown=shown, verify=verify)
        except BaseException:
            sd.close()
            raise
        s = cls(backend, path=path, readonly=readonly, keep_orphans=keep_orphans)
        s.dir = sd
        try:
            if tree is None and source is not None:
                tree = Phase3Tree.open(source)
            s.tree = tree
            s._init_or_check(source)
            if s.tree is None and not readonly:
                src = s.source_path()
                if src and os.path.isdir(src):
                    s.tree = Phase3Tree.open(src)
        except BaseException:
            s.close()
            raise
        return s

    def _init_or_check(self, source: str | None) -> None:
        with self.backend.read() as txn:
            # A new LMDB file has no `meta` db yet (LmdbBackend.has_db; memory has all).
            fresh = isinstance(self.backend, LmdbBackend) and not self.backend.has_db("meta")
            v = None if fresh else txn.get("meta", b"schema")
            existing = None if v is None else U64.unpack(v)[0]
        if existing is None:
            if self.readonly:
                raise StoreMissing("the store is empty (never initialised)")
            st = os.fstat(self.tree.root_fd) if self.tree is not None else os.stat(".")
            c = self.chunker
            sizes = (c.min_size, c.avg_size, c.max_size)
            t = time.time_ns()
            self.transact(
                lambda txn: ns.init_root(txn, st, self.tree is not None, t, sizes, source)
            )
            return
        if existing not in READABLE_SCHEMAS:
            raise SchemaMismatch(
                f"store has schema version {existing}; this ferryfs reads versions "
                f"{', '.join(map(str, READABLE_SCHEMAS))} only"
            )
        if existing != SCHEMA_VERSION and not self.readonly:
            # Old records stay readable as they are: only the version moves on.
            self.transact(lambda txn: txn.put("meta", b"schema", U64.pack(SCHEMA_VERSION)))
        with self.backend.read() as txn:
            self.dictionary = dictionaries.load_all(txn)
            params = txn.get("meta", b"chunker")
            if params is not None:
                # The sizes a store was made with stay its sizes: other cut points
                # would stop new chunks deduplicating against the old ones.
                mn, avg, mx = (int(x) for x in bytes(params).split(b","))
                self.chunker = Chunker(mn, avg, mx)
        if not self.readonly:
            self.transact(migration.free_pending)
            self.transact(ns.purge_orphans)

    def source_path(self) -> str | None:
        with self.backend.read() as txn:
            v = txn.get("meta", b"source")
            return os.fsdecode(bytes(v)) if v is not None else None

    def close(self) -> None:
        self.readahead.close()  # its thread reads the environment
        self.backend.close()
        if self.tree is not None:
            self.tree.close()
            self.tree = None
        if self.dir is not None:  # last: the writer lock goes once LMDB is closed
            self.dir.close()
            self.dir = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------

    def transact(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn` in one write transaction and commit it; its result. ReadOnly in
        a read-only store or in failsafe, NoSpace when the disk is full."""
        if self.readonly:
            raise ReadOnly("store opened read-only")
        if self.failsafe is not None:
            raise ReadOnly(self.failsafe)
        for _ in range(16):
            try:
                with self.backend.write() as txn:
                    out = fn(txn)
                self.commits += 1
                return out
            except MapFull:
                if self.backend.grouped():
                    raise  # growing waits for every transaction: the group's owner retries alone
                self.backend.grow()
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise NoSpace("no space left for the store") from e
                raise
        raise NoSpace("the store's map cannot grow further")

    def group(self) -> contextlib.AbstractContextManager[None]:
        """Group commit: the transactions this thread runs inside the block share one
        write transaction and one sync (see `Backend.group`). The mount's writer runs
        the jobs that reach it together this way (fs/writer.py)."""
        return self.backend.group()

    def sync(self) -> None:
        """Make every committed transaction durable (fsync)."""
        self.backend.sync()

    # -- namespace (the rules: namespace.py) ---------------------------------------

    def getattr(self, ino: int) -> Inode:
        with self.backend.read() as txn:
            return ns.get(txn, ino)

    def ensure_listed(self, ino: int, ahead: int = 0) -> Inode:
        return migration.ensure_listed(self, ino, ahead)

    def import_step(self, queue: deque[int], entries: int = 4096) -> int:
        return migration.import_step(self, queue, entries)

    def import_all(self, entries: int = 4096) -> int:
        return migration.import_all(self, entries)

    def lookup(self, parent: int, name: bytes) -> Inode:
        ns.check_name(name)  # before listing: a bad name imports nothing
        self.ensure_listed(parent, ahead=LIST_AHEAD)
        with self.backend.read() as txn:
            return ns.get(txn, ns.lookup(txn, parent, name))

    def lookup_listed(self, parent: int, name: bytes) -> Inode | None:
        """`lookup` in one read transaction, or None if `parent` must be listed
        first (a write: the caller runs `lookup` on the writer). The hot path of a
        mount's lookups, so it reads the parent once."""
        ns.check_name(name)
        with self.backend.read() as txn:
            if ns.get(txn, parent).is_unlisted:
                return None
            return ns.get(txn, ns.lookup(txn, parent, name))

    def readdir(
        self, ino: int, after: int = 0, limit: int = 1024
    ) -> list[tuple[int, bytes, Inode]]:
        """Up to `limit` entries after cookie `after`: (cookie, name, inode)."""
        self.ensure_listed(ino, ahead=LIST_AHEAD)
        with self.backend.read() as txn:
            return ns.listing(txn, ino, after, limit)

    def _new_node(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                  rdev: int = 0, target: bytes = b"") -> Inode:  # fmt: skip
        t = time.time_ns()
        tree = self.tree
        return self.transact(
            lambda txn: ns.new_node(txn, tree, parent, name, mode, uid, gid, t, rdev, target)
        )

    def mknod(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Inode:
        return self._new_node(parent, name, ns.mknod_mode(mode), uid, gid, rdev)

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return self._new_node(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return self._new_node(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        return self._new_node(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        with self.backend.read() as txn:
            return ns.readlink(txn, ino)

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        t = time.time_ns()
        return self.transact(lambda txn: ns.link(txn, self.tree, ino, parent, name, t))

    def forget(self, ino: int) -> None:
        """The kernel forgot `ino`: purge it if no directory entry names it any more.
        Not in failsafe (nor read-only): its mark stays, for the next writer's open."""
        if not self.readonly and self.failsafe is None:
            self.transact(lambda txn: ns.forget(txn, ino))

    def unlink(self, parent: int, name: bytes) -> Inode:
        return self._remove(parent, name, directory=False)

    def rmdir(self, parent: int, name: bytes) -> Inode:
        return self._remove(parent, name, directory=True)

    def _remove(self, parent: int, name: bytes, directory: bool) -> Inode:
        t, keep = time.time_ns(), self.keep_orphans
        return self.transact(
            lambda txn: ns.remove(txn, self.tree, parent, name, directory, t, keep)
        )

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        ns.check_rename(old_name, new_name, flags)
        t, keep = time.time_ns(), self.keep_orphans
        old, new = (old_parent, old_name), (new_parent, new_name)
        self.transact(lambda txn: ns.rename(txn, self.tree, *old, *new, flags, t, keep))

    def setattr(
        self,
        ino: int,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Inode:
        if size is not None:
            self.truncate(ino, size)
        t = time.time_ns()
        ids, times = (mode, uid, gid), (atime_ns, mtime_ns, ctime_ns)
        return self.transact(lambda txn: ns.setattr(txn, ino, t, *ids, *times))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        with self.backend.read() as txn:
            return ns.getxattr(txn, ino, name)

    def listxattr(self, ino: int) -> list[bytes]:
        with self.backend.read() as txn:
            return ns.listxattr(txn, ino)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        t = time.time_ns()
        self.transact(lambda txn: ns.setxattr(txn, ino, name, value, flags, t))

    def removexattr(self, ino: int, name: bytes) -> None:
        t = time.time_ns()
        self.transact(lambda txn: ns.removexattr(txn, ino, name, t))

    # -- contents (files.py) ---------------------------------------------------------

    def read(self, ino: int, off: int, n: int) -> bytes:
        return files.read(self, ino, off, n)

    def read_stored(self, ino: int, off: int, n: int) -> bytes | memoryview | None:
        return files.read_stored(self, ino, off, n)

    def read_or_heal(self, ino: int, off: int, n: int) -> tuple[bytes | memoryview | None, bool]:
        return files.read_or_heal(self, ino, off, n)

    def data_ranges(self, ino: int) -> list[tuple[int, int, bool]]:
        return files.data_ranges(self, ino)

    def plan_write(self, ino: int, spans: list[tuple[int, bytes]]) -> content.Rewrite:
        return files.plan_write(self, ino, spans)

    def commit(self, rw: content.Rewrite, mtime: bool = True) -> Inode | None:
        return files.commit(self, rw, mtime)

    def write_spans(self, ino: int, spans: list[tuple[int, bytes]]) -> Inode:
        return files.write_spans(self, ino, spans)

    def write(self, ino: int, off: int, data: bytes) -> Inode:
        return files.write_spans(self, ino, [(off, data)])

    def truncate(self, ino: int, size: int) -> Inode:
        return files.truncate(self, ino, size)

    # -- migration, healing, errors and walks (migration.py) ---------------------------

    def prepare_migration(
        self, ino: int, stop: Callable[[], bool] | None = None, spill: Spill | None = None
    ) -> Migration | None:
        return migration.prepare_migration(self, ino, stop, spill)

    def stage_chunks(self, records: dict[bytes, bytes]) -> None:
        migration.stage_chunks(self, records)

    def commit_migrations(self, ms: list[Migration]) -> list[Inode]:
        return migration.commit_migrations(self, ms)

    def migrate(self, ino: int) -> Inode:
        return migration.migrate(self, ino)

    def open_legacy(self, ino: int, record: bool = True) -> Phase3File:
        return migration.open_legacy(self, ino, record)

    def read_legacy(self, f: Phase3File, ino: int, off: int, n: int) -> bytes:
        return migration.read_legacy(self, f, ino, off, n)

    def heal(self, ino: int, bad: bytes) -> bool:
        return migration.heal(self, ino, bad)

    def record_error(self, ino: int, message: str) -> None:
        file_errors.record_error(self, ino, message)

    def errors(self) -> list[tuple[int, str]]:
        return file_errors.errors(self)

    def prune_errors(self) -> int:
        return file_errors.prune_errors(self)

    def legacy_files_by_path(self) -> Iterator[int]:
        return migration.legacy_files_by_path(self)

    # -- figures (stats.py) -----------------------------------------------------------

    def stats(self) -> Stats:
        return figures.stats(self.backend, self.path)

    def statfs(self) -> tuple[int, int, int, int]:
        """(block size, total blocks, free blocks, files) of the store's filesystem."""
        return figures.statfs(self.path)

    def iter_inodes(self) -> Iterator[Inode]:
        return figures.iter_inodes(self.backend)

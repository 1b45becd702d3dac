"""The store facade: one store directory, one LMDB environment, every operation
as one transaction inside one call.

Writes take an exclusive lock on the store directory, so one process writes a
store at a time; readers (`stats`, `fsck`, `search`) open it read-only beside
a writer and see consistent snapshots. Heavy work (chunking, hashing,
compression) happens in `prepare_*` calls under read transactions; the matching
`commit_*` call is a short write transaction that checks nothing moved
underneath (the inode's version) and retries otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from . import cas, codec, content, index, ingest
from . import namespace as ns
from .chunker import Chunker
from .chunker import digest as chunk_digest
from .errors import (
    Exists,
    FerryError,
    Invalid,
    IsADir,
    NoData,
    NoSpace,
    NotADir,
    NotEmpty,
    NotFound,
    NotPermitted,
    ReadOnly,
    SchemaMismatch,
    SourceError,
    StoreLocked,
    StoreMissing,
)
from .kv import Backend, LmdbBackend, MapFull, MemoryBackend, Txn
from .phase3 import Phase3Tree
from .readahead import ReadAhead
from .records import (
    CHANGED,
    ROOT_INO,
    SCHEMA_VERSION,
    STORED,
    U64,
    Inode,
    Legacy,
    ino_key,
    xattr_key,
)

T = TypeVar("T")

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
# Entries of UNLISTED subdirectories listed along with a directory a lookup or a
# readdir needs: ~20 ms of lstat and one commit, instead of a commit per directory.
LIST_AHEAD = 1024


def now_ns() -> int:
    return time.time_ns()


@dataclass
class Stats:
    files_total: int = 0
    files_migrated: int = 0
    files_legacy: int = 0
    dirs_total: int = 0
    dirs_listed: int = 0
    bytes_logical: int = 0
    bytes_migrated: int = 0
    bytes_legacy: int = 0
    bytes_unique: int = 0
    bytes_compressed: int = 0
    bytes_stored: int = 0
    chunks: int = 0
    errors: int = 0
    files_indexed: int = 0  # files whose current content the search index holds
    index_pending: int = 0  # files and directories marked for the index to look at
    bytes_index: int = 0  # the search index's files on disk (STORE/index)


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
        self._lock_fd: int | None = None
        self.chunker = Chunker()

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
    ) -> Store:
        """Open the store at `path` (creating it from `source` if `create`)."""
        db = os.path.join(path, "db")
        if not os.path.isdir(db):
            if not create or readonly:
                raise StoreMissing(f"{path} is not a ferryfs store (no {db})")
            os.makedirs(db, exist_ok=True)
        elif not os.path.exists(os.path.join(db, "data.mdb")) and (not create or readonly):
            raise StoreMissing(f"{path} is not a ferryfs store (its database is missing)")
        lock_fd = None
        if not readonly:
            lock_fd = os.open(
                os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                raise StoreLocked(
                    f"store {path} is in use by another ferryfs process (a mount or a migrate); "
                    "stop it first"
                ) from None
        try:
            backend = LmdbBackend(db, readonly=readonly)
        except Exception as e:
            if lock_fd is not None:
                os.close(lock_fd)
            raise StoreMissing(f"cannot open store {path}: {e}") from None
        s = cls(backend, path=path, readonly=readonly, keep_orphans=keep_orphans)
        s._lock_fd = lock_fd
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
            v = txn.get("meta", b"schema") if self._has_meta() else None
            existing = None if v is None else U64.unpack(v)[0]
        if existing is None:
            if self.readonly:
                raise StoreMissing("the store is empty (never initialised)")
            self._create(source)
            return
        if existing != SCHEMA_VERSION:
            raise SchemaMismatch(
                f"store has schema version {existing}; this ferryfs reads version "
                f"{SCHEMA_VERSION} only"
            )
        with self.backend.read() as txn:
            params = txn.get("meta", b"chunker")
            if params is not None:
                # The sizes a store was made with stay its sizes: other cut points
                # would stop new chunks deduplicating against the old ones.
                mn, avg, mx = (int(x) for x in bytes(params).split(b","))
                self.chunker = Chunker(mn, avg, mx)
        if not self.readonly:
            self._write(ingest.free_pending)
            self._write(self._purge_orphans)

    def _has_meta(self) -> bool:
        if isinstance(self.backend, LmdbBackend):
            return self.backend.has_db("meta")
        return True

    def _create(self, source: str | None) -> None:
        st = os.fstat(self.tree.root_fd) if self.tree is not None else os.stat(".")
        t = now_ns()

        def init(txn: Txn) -> None:
            txn.put("meta", b"schema", U64.pack(SCHEMA_VERSION))
            txn.put("meta", b"created_ns", U64.pack(t))
            c = self.chunker
            txn.put("meta", b"chunker", f"{c.min_size},{c.avg_size},{c.max_size}".encode())
            if source is not None:
                txn.put("meta", b"source", os.fsencode(os.path.abspath(source)))
            root = Inode(
                ROOT_INO,
                stat.S_IFDIR | stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                max(2, st.st_nlink) if self.tree is not None else 2,
                4096,
                st.st_atime_ns,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
            if self.tree is None:
                root.flags |= STORED
            ns.put(txn, root)
            if self.tree is not None:
                ns.put_legacy(
                    txn,
                    ROOT_INO,
                    Legacy(
                        0,
                        st.st_mtime_ns,
                        st.st_ctime_ns,
                        st.st_ino,
                        st.st_dev,
                        False,
                        b"\0" * 32,
                        b"",
                    ),
                )
            txn.put("meta", b"next_ino", U64.pack(ROOT_INO + 1))

        self._write(init)

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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------

    def _write(self, fn: Callable[[Txn], T]) -> T:
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
                self.backend.grow()
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise NoSpace("no space left for the store") from e
                raise
        raise NoSpace("the store's map cannot grow further")

    def sync(self) -> None:
        """Make every committed transaction durable (fsync)."""
        self.backend.sync()

    # -- namespace ---------------------------------------------------------------

    def getattr(self, ino: int) -> Inode:
        with self.backend.read() as txn:
            return ns.get(txn, ino)

    def _listed(self, txn: Txn, ino: int) -> Inode:
        d = ns.get(txn, ino)
        if not d.is_dir:
            raise NotADir(f"inode {ino} is not a directory")
        if not d.stored:
            d = ns.import_dir(txn, self.tree, d)
        return d

    def ensure_listed(self, ino: int, ahead: int = 0) -> Inode:
        """List directory `ino` if it is UNLISTED and, in the same transaction, its
        UNLISTED subdirectories breadth first until about `ahead` more entries.

        Listing ahead is metadata readahead: a synced commit costs milliseconds,
        and whoever looks up one name in a fresh tree usually walks on into it."""
        d = self.getattr(ino)
        if not d.is_dir or d.stored:
            return d

        def op(txn: Txn) -> Inode:
            listed = self._listed(txn, ino)
            if ahead > 0:
                subdirs = deque(c for _, _, c in ns.entries(txn, ino) if ns.get(txn, c).is_dir)
                self._import_from(txn, subdirs, ahead)
            return listed

        return self._write(op)

    def _import_from(self, txn: Txn, queue: deque[int], entries: int) -> int:
        """List UNLISTED directories breadth first from `queue` (descending through
        listed ones) until about `entries` entries were seen; what is left to visit
        stays in `queue`. Returns how many directories were listed."""
        listed = seen = 0
        while queue and seen < entries:
            ino = queue.popleft()
            d = ns.get(txn, ino)
            if not d.stored:
                ns.import_dir(txn, self.tree, d)
                listed += 1
            for _, _, c in ns.entries(txn, ino):
                seen += 1
                if stat.S_ISDIR(ns.get(txn, c).mode):
                    queue.append(c)
        return listed

    def import_step(self, queue: deque[int], entries: int = 4096) -> int:
        """One transaction of `import_all`: see `_import_from`. On failure `queue` is
        as it was (the transaction was undone, so is its progress)."""
        snapshot = list(queue)
        try:
            return self._write(lambda txn: self._import_from(txn, queue, entries))
        except BaseException:
            queue.clear()
            queue.extend(snapshot)
            raise

    def lookup(self, parent: int, name: bytes) -> Inode:
        ns.check_name(name)
        self.ensure_listed(parent, ahead=LIST_AHEAD)
        with self.backend.read() as txn:
            c = ns.child(txn, parent, name)
            if c is None:
                raise NotFound(name.decode(errors="replace"))
            return ns.get(txn, c)

    def readdir(
        self, ino: int, after: int = 0, limit: int = 1024
    ) -> list[tuple[int, bytes, Inode]]:
        """Up to `limit` entries after cookie `after`: (cookie, name, inode)."""
        self.ensure_listed(ino, ahead=LIST_AHEAD)
        out: list[tuple[int, bytes, Inode]] = []
        with self.backend.read() as txn:
            for cookie, name, c in ns.entries(txn, ino, after):
                out.append((cookie, name, ns.get(txn, c)))
                if len(out) >= limit:
                    break
        return out

    def _touch_dir(self, d: Inode, t: int) -> None:
        d.mtime_ns = d.ctime_ns = t
        d.flags |= CHANGED

    def _new_node(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes = b"",
    ) -> Inode:
        ns.check_name(name)
        t = now_ns()

        def op(txn: Txn) -> Inode:
            d = self._listed(txn, parent)
            if ns.child(txn, parent, name) is not None:
                raise Exists(name.decode(errors="replace"))
            ino = ns.alloc(txn)
            node = Inode(ino, mode, uid, gid, 1, 0, t, t, t, rdev, STORED | CHANGED)
            if stat.S_ISDIR(mode):
                node.nlink, node.parent, node.size = 2, parent, 4096
                d.nlink += 1
            if stat.S_ISLNK(mode):
                node.target, node.size = target, len(target)
            ns.put(txn, node)
            ns.add_entry(txn, parent, name, ino)
            self._touch_dir(d, t)
            ns.put(txn, d)
            return node

        return self._write(op)

    def mknod(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Inode:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise Invalid("mknod of a directory or symlink")
        return self._new_node(parent, name, mode, uid, gid, rdev)

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return self._new_node(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return self._new_node(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        return self._new_node(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        node = self.getattr(ino)
        if not node.is_link:
            raise Invalid("not a symlink")
        return node.target

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        ns.check_name(name)
        t = now_ns()

        def op(txn: Txn) -> Inode:
            node = ns.get(txn, ino)
            if node.is_dir:
                raise NotPermitted("hard link to a directory")
            d = self._listed(txn, parent)
            if ns.child(txn, parent, name) is not None:
                raise Exists(name.decode(errors="replace"))
            if node.nlink >= 65000:
                from .errors import TooManyLinks

                raise TooManyLinks("too many links")
            node.nlink += 1
            node.ctime_ns = t
            node.flags |= CHANGED
            txn.delete("meta", b"orphan:" + ino_key(ino))
            ns.put(txn, node)
            ns.add_entry(txn, parent, name, ino)
            self._touch_dir(d, t)
            ns.put(txn, d)
            return node

        return self._write(op)

    def _drop_link(self, txn: Txn, node: Inode, t: int) -> None:
        """One directory entry of `node` is gone: count it, and purge at zero."""
        node.nlink -= 1 if not node.is_dir else node.nlink
        node.ctime_ns = t
        node.flags |= CHANGED
        if node.nlink <= 0:
            if self.keep_orphans:
                ns.put(txn, node)
                txn.put("meta", b"orphan:" + ino_key(node.ino), b"")
            else:
                self._purge(txn, node.ino)
        else:
            ns.put(txn, node)

    def _purge(self, txn: Txn, ino: int) -> None:
        content.delete_all(txn, ino)
        index.mark(txn, ino)  # its search document goes too (index.py)
        txn.delete("inodes", ino_key(ino))
        txn.delete("legacy", ino_key(ino))
        txn.delete("errors", ino_key(ino))
        for k, _ in list(txn.range("xattrs", ino_key(ino), ino_key(ino + 1))):
            txn.delete("xattrs", k)
        txn.delete("meta", b"orphan:" + ino_key(ino))

    def _purge_orphans(self, txn: Txn) -> int:
        n = 0
        for k, _ in list(txn.range("meta", b"orphan:", b"orphan;")):
            ino = U64.unpack_from(k, 7)[0]
            v = txn.get("inodes", ino_key(ino))
            if v is not None and Inode.unpack(ino, v).nlink > 0:
                txn.delete("meta", k)  # a stale mark: a name still holds the inode
                continue
            self._purge(txn, ino)
            n += 1
        return n

    def forget(self, ino: int) -> None:
        """The kernel forgot `ino`: purge it if no directory entry names it any more."""

        def op(txn: Txn) -> None:
            if txn.get("meta", b"orphan:" + ino_key(ino)) is not None:
                self._purge(txn, ino)

        if not self.readonly:
            self._write(op)

    def unlink(self, parent: int, name: bytes) -> Inode:
        return self._remove(parent, name, directory=False)

    def rmdir(self, parent: int, name: bytes) -> Inode:
        return self._remove(parent, name, directory=True)

    def _remove(self, parent: int, name: bytes, directory: bool) -> Inode:
        """unlink (a non-directory) or rmdir (an empty directory) `name` in `parent`."""
        ns.check_name(name)
        t = now_ns()
        shown = name.decode(errors="replace")

        def op(txn: Txn) -> Inode:
            d = self._listed(txn, parent)
            c = ns.child(txn, parent, name)
            if c is None:
                raise NotFound(shown)
            if directory:
                node = self._listed(txn, c)  # NotADir for a file
                if not ns.is_empty(txn, c):
                    raise NotEmpty(shown)
                d.nlink -= 1
            else:
                node = ns.get(txn, c)
                if node.is_dir:
                    raise IsADir(shown)
            ns.remove_entry(txn, parent, name)
            self._drop_link(txn, node, t)
            self._touch_dir(d, t)
            ns.put(txn, d)
            return node

        return self._write(op)

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        ns.check_name(old_name)
        ns.check_name(new_name)
        if flags & RENAME_EXCHANGE and flags & RENAME_NOREPLACE:
            raise Invalid("RENAME_EXCHANGE and RENAME_NOREPLACE together")
        t = now_ns()

        def op(txn: Txn) -> None:
            src_dir = self._listed(txn, old_parent)
            dst_dir = src_dir if new_parent == old_parent else self._listed(txn, new_parent)
            c = ns.child(txn, old_parent, old_name)
            if c is None:
                raise NotFound(old_name.decode(errors="replace"))
            node = ns.get(txn, c)
            other_ino = ns.child(txn, new_parent, new_name)
            if other_ino == c:
                return  # same inode under both names: POSIX says do nothing
            other = ns.get(txn, other_ino) if other_ino is not None else None
            if node.is_dir:
                self._check_not_ancestor(txn, c, new_parent)
            if flags & RENAME_EXCHANGE:
                if other is None:
                    raise NotFound(new_name.decode(errors="replace"))
                if other.is_dir:
                    self._check_not_ancestor(txn, other.ino, old_parent)
                ns.add_entry(txn, old_parent, old_name, other.ino)
                ns.add_entry(txn, new_parent, new_name, c)
                if node.is_dir != other.is_dir and old_parent != new_parent:
                    delta = 1 if node.is_dir else -1
                    src_dir.nlink -= delta
                    dst_dir.nlink += delta
                for n, p in ((node, new_parent), (other, old_parent)):
                    if n.is_dir:
                        n.parent = p
                    n.ctime_ns = t
                    n.flags |= CHANGED
                    ns.put(txn, n)
            else:
                if other is not None:
                    if flags & RENAME_NOREPLACE:
                        raise Exists(new_name.decode(errors="replace"))
                    if other.is_dir and not node.is_dir:
                        raise IsADir(new_name.decode(errors="replace"))
                    if node.is_dir and not other.is_dir:
                        raise NotADir(new_name.decode(errors="replace"))
                    if other.is_dir:
                        self._listed(txn, other.ino)
                        if not ns.is_empty(txn, other.ino):
                            raise NotEmpty(new_name.decode(errors="replace"))
                        dst_dir.nlink -= 1
                    self._drop_link(txn, other, t)
                ns.remove_entry(txn, old_parent, old_name)
                ns.add_entry(txn, new_parent, new_name, c)
                if node.is_dir:
                    node.parent = new_parent
                    if old_parent != new_parent:
                        src_dir.nlink -= 1
                        dst_dir.nlink += 1
                node.ctime_ns = t
                node.flags |= CHANGED
                ns.put(txn, node)
            self._touch_dir(src_dir, t)
            ns.put(txn, src_dir)
            if dst_dir is not src_dir:
                self._touch_dir(dst_dir, t)
                ns.put(txn, dst_dir)

        self._write(op)

    def _check_not_ancestor(self, txn: Txn, ino: int, target_parent: int) -> None:
        p = target_parent
        while True:
            if p == ino:
                raise Invalid("cannot move a directory into itself")
            if p == ROOT_INO or p == 0:
                return
            p = ns.get(txn, p).parent

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
        t = now_ns()

        def op(txn: Txn) -> Inode:
            node = ns.get(txn, ino)
            if mode is not None:
                node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            if uid is not None:
                node.uid = uid
            if gid is not None:
                node.gid = gid
            if atime_ns is not None:
                node.atime_ns = atime_ns
            if mtime_ns is not None:
                node.mtime_ns = mtime_ns
            node.ctime_ns = ctime_ns if ctime_ns is not None else t
            node.flags |= CHANGED
            ns.put(txn, node)
            return node

        return self._write(op)

    # -- extended attributes -------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        with self.backend.read() as txn:
            ns.get(txn, ino)
            v = txn.get("xattrs", xattr_key(ino, name))
            if v is None:
                raise NoData(name.decode(errors="replace"))
            return bytes(v)

    def listxattr(self, ino: int) -> list[bytes]:
        with self.backend.read() as txn:
            ns.get(txn, ino)
            return [bytes(k[8:]) for k, _ in txn.range("xattrs", ino_key(ino), ino_key(ino + 1))]

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        def op(txn: Txn) -> None:
            node = ns.get(txn, ino)
            k = xattr_key(ino, name)
            exists = txn.get("xattrs", k) is not None
            if flags & XATTR_CREATE and exists:
                raise Exists(name.decode(errors="replace"))
            if flags & XATTR_REPLACE and not exists:
                raise NoData(name.decode(errors="replace"))
            txn.put("xattrs", k, value)
            node.ctime_ns = now_ns()
            node.flags |= CHANGED
            ns.put(txn, node)

        self._write(op)

    def removexattr(self, ino: int, name: bytes) -> None:
        def op(txn: Txn) -> None:
            node = ns.get(txn, ino)
            if not txn.delete("xattrs", xattr_key(ino, name)):
                raise NoData(name.decode(errors="replace"))
            node.ctime_ns = now_ns()
            node.flags |= CHANGED
            ns.put(txn, node)

        self._write(op)

    # -- contents -----------------------------------------------------------------

    def read(self, ino: int, off: int, n: int) -> bytes:
        """Bytes of a file; a LEGACY file is migrated first."""
        data = self.read_stored(ino, off, n)
        if data is None:
            self.migrate(ino)
            data = self.read_stored(ino, off, n)
            if data is None:
                raise SourceError("not migrated")
        return bytes(data)

    def read_stored(self, ino: int, off: int, n: int) -> bytes | memoryview | None:
        """Bytes of a file in one read transaction, a view rather than a copy when
        they lie in one chunk (content.read_view); None if the file is LEGACY."""
        with self.backend.read() as txn:
            node = ns.get(txn, ino)
            if node.is_reg and not node.stored:
                return None
            data = content.read_view(txn, ino, node.size, off, n, self.cache)
        self.readahead.note(ino, off, off + len(data), node.size)
        return data

    def plan_write(self, ino: int, spans: list[tuple[int, bytes]]) -> content.Rewrite:
        with self.backend.read() as txn:
            node = ns.get(txn, ino)
            if node.is_dir:
                raise IsADir("is a directory")
            if not node.stored:
                raise Invalid("migrate the file before writing")
            return content.plan_write(
                txn, ino, node.version, node.size, spans, self.chunker, self.cache
            )

    def commit(self, rw: content.Rewrite, mtime: bool = True) -> Inode | None:
        """Apply a planned rewrite; None if the file changed since it was planned."""
        t = now_ns()

        def op(txn: Txn) -> Inode | None:
            node = ns.get(txn, rw.ino)
            if node.version != rw.base_version or node.size != rw.base_size:
                return None
            content.apply(txn, rw)
            node.size = rw.new_size
            node.version += 1
            if mtime:
                node.mtime_ns = node.ctime_ns = t
            node.flags |= CHANGED | STORED
            ns.put(txn, node)
            return node

        try:
            return self._write(op)
        except cas.MissingChunk:
            return None

    def write_spans(self, ino: int, spans: list[tuple[int, bytes]]) -> Inode:
        """Write sorted, disjoint spans into a file in one transaction."""
        if not spans:
            return self.getattr(ino)
        self._migrated(ino)
        while True:
            done = self.commit(self.plan_write(ino, spans))
            if done is not None:
                return done

    def write(self, ino: int, off: int, data: bytes) -> Inode:
        return self.write_spans(ino, [(off, data)])

    def truncate(self, ino: int, size: int) -> Inode:
        if size < 0:
            raise Invalid("negative size")
        node = self.getattr(ino)
        if node.is_dir:
            raise IsADir("is a directory")
        if not node.is_reg:
            raise Invalid("not a regular file")
        if not node.stored:
            if size == 0:
                return self._drop_legacy_content(ino)
            self.migrate(ino)
        while True:
            with self.backend.read() as txn:
                node = ns.get(txn, ino)
                rw = content.plan_truncate(txn, ino, node.version, node.size, size, self.cache)
            done = self.commit(rw)
            if done is not None:
                return done

    def _drop_legacy_content(self, ino: int) -> Inode:
        t = now_ns()

        def op(txn: Txn) -> Inode:
            node = ns.get(txn, ino)
            if not node.stored:
                node.flags |= STORED | CHANGED
                node.size = 0
                node.version += 1
                node.mtime_ns = node.ctime_ns = t
                ns.put(txn, node)
                return node
            return node

        node = self._write(op)
        if node.size:
            return self.truncate(ino, 0)
        return node

    def _migrated(self, ino: int) -> Inode:
        node = self.getattr(ino)
        if node.is_reg and not node.stored:
            return self.migrate(ino)
        return node

    # -- migration -----------------------------------------------------------------

    def prepare_migration(
        self, ino: int, stop: Callable[[], bool] | None = None
    ) -> ingest.Migration | None:
        """Read and chunk a LEGACY file (no lock held); None if it is not LEGACY.

        `stop` is polled between chunks; when it says so, Preempted is raised."""
        with self.backend.read() as txn:
            node = ns.get(txn, ino)
            if not node.is_reg or node.stored:
                return None
            leg = ns.get_legacy(txn, ino)
        if leg is None or self.tree is None:
            raise SourceError("no Phase 3 origin")

        def has_chunk(d: bytes) -> bool:
            with self.backend.read() as t:
                return cas.has(t, d)

        def stage(records: dict[bytes, bytes]) -> None:
            self._write(lambda t: ingest.stage_records(t, records))

        return ingest.prepare(
            self.tree, ino, node.version, leg, self.chunker, has_chunk, stage, stop=stop
        )

    def commit_migrations(self, ms: list[ingest.Migration]) -> list[Inode]:
        """Commit prepared migrations in one transaction; files no longer LEGACY are skipped."""

        def op(txn: Txn) -> list[Inode]:
            done = []
            for m in ms:
                node = ns.get(txn, m.ino)
                if node.stored or node.version != m.base_version:
                    continue
                ingest.commit_extents(txn, m)
                node.flags |= STORED
                node.size = m.size
                node.mtime_ns, node.ctime_ns = m.mtime_ns, m.ctime_ns
                ns.put(txn, node)
                ns.put_legacy(txn, m.ino, m.legacy)
                txn.delete("errors", ino_key(m.ino))
                done.append(node)
            return done

        for _ in range(3):
            try:
                return self._write(op)
            except cas.MissingChunk:
                # A chunk deduplicated against was freed meanwhile: redo those files.
                ms = [p for m in ms if (p := self.prepare_migration(m.ino)) is not None]
        raise FerryError("migration keeps racing with writes; try again")

    def migrate(self, ino: int) -> Inode:
        """Migrate one LEGACY file now (first read); SourceError is recorded and raised."""
        try:
            m = self.prepare_migration(ino)
        except SourceError as e:
            self.record_error(ino, str(e))
            raise
        if m is not None:
            self.commit_migrations([m])
        return self.getattr(ino)

    def open_legacy(self, ino: int) -> int:
        """A read fd of a LEGACY file's Phase 3 copy (SourceError if that is unsafe)."""
        with self.backend.read() as txn:
            leg = ns.get_legacy(txn, ino)
        if leg is None or self.tree is None:
            raise SourceError("no Phase 3 origin")
        fd = self.tree.open_file(leg.path)
        st = os.fstat(fd)
        if (st.st_ino, st.st_dev) != (leg.st_ino, leg.st_dev):
            os.close(fd)
            raise SourceError("replaced since the snapshot")
        return fd

    def heal(self, ino: int, bad: bytes) -> bool:
        """Rewrite the chunk `bad` from the Phase 3 copy of `ino`, if the file is
        unmodified since Phase 3 and its bytes there still hash to `bad`. Not in
        failsafe or read-only: the read then gets EIO (its ReadOnly was EROFS)."""
        if self.readonly or self.failsafe is not None:
            return False
        with self.backend.read() as txn:
            node = ns.get(txn, ino)
            leg = ns.get_legacy(txn, ino)
            spots = [(o, n) for o, d, n in content.all_extents(txn, ino) if d == bad]
        if node.changed or leg is None or self.tree is None or not spots:
            return False
        try:
            fd = self.tree.open_file(leg.path)
        except SourceError:
            return False
        try:
            for off, n in spots:
                plain = os.pread(fd, n, off)
                if len(plain) == n and chunk_digest(plain) == bad:
                    self._put_chunk(bad, codec.encode(plain))
                    self.cache.discard(bad)
                    return True
        finally:
            os.close(fd)
        return False

    def _put_chunk(self, digest: bytes, record: bytes) -> None:
        self._write(lambda txn: txn.put("chunks", digest, record))

    def record_error(self, ino: int, message: str) -> None:
        if not self.readonly and self.failsafe is None:
            self._write(lambda txn: ns.record_error(txn, ino, message))

    def errors(self) -> list[tuple[int, str]]:
        with self.backend.read() as txn:
            return [
                (U64.unpack(k)[0], bytes(v).decode(errors="replace"))
                for k, v in txn.range("errors", b"")
            ]

    def legacy_files(self, after: int = 0, limit: int = 1000) -> list[int]:
        """Inodes of LEGACY files past `after`, in inode order."""
        out = []
        with self.backend.read() as txn:
            for k, v in txn.range("inodes", ino_key(after + 1)):
                node = Inode.unpack(U64.unpack(k)[0], v)
                if node.is_reg and not node.stored:
                    out.append(node.ino)
                    if len(out) >= limit:
                        break
        return out

    def legacy_files_by_path(self) -> Iterator[int]:
        """LEGACY files of the listed tree, depth first with names in byte order:
        the order of `sorted(paths)`, and of an app reading a session's files
        together. Migrating in this order lays each session's chunks side by side
        in the store, so a cold read of a session is one run of the disk, not
        seeks to wherever a hash or inode order put each file. One directory's
        entries are held at a time (per level of the walk)."""
        stack: list[Iterator[tuple[bytes, int, int]]] = [iter(self._sorted_entries(ROOT_INO))]
        linked: set[int] = set()  # files of several names: yielded at the first
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            _, ino, nlink = entry
            if nlink == 0:
                stack.append(iter(self._sorted_entries(ino)))
            elif nlink == 1:
                yield ino
            elif ino not in linked:
                linked.add(ino)
                yield ino

    def _sorted_entries(self, d: int) -> list[tuple[bytes, int, int]]:
        """(name, ino, link count, or 0 for a directory) of `d`'s directories and
        LEGACY files, by name."""
        out = []
        with self.backend.read() as txn:
            for _, name, c in ns.entries(txn, d):
                node = ns.get(txn, c)
                if node.is_dir:
                    out.append((name, c, 0))
                elif node.is_reg and not node.stored:
                    out.append((name, c, max(1, node.nlink)))
        out.sort()
        return out

    def unlisted_dirs(self, limit: int = 1000) -> list[int]:
        out = []
        with self.backend.read() as txn:
            for k, v in txn.range("inodes", b""):
                node = Inode.unpack(U64.unpack(k)[0], v)
                if node.is_dir and not node.stored:
                    out.append(node.ino)
                    if len(out) >= limit:
                        break
        return out

    def import_all(self, entries: int = 4096) -> int:
        """List every UNLISTED directory, breadth first, about `entries` directory
        entries per transaction (a bigger transaction's dirty pages are memory that
        grows with the tree). Returns how many directories were listed."""
        listed = 0
        queue: deque[int] = deque([ROOT_INO])
        while queue:
            listed += self.import_step(queue, entries)
        return listed

    # -- figures ------------------------------------------------------------------

    def stats(self) -> Stats:
        s = Stats()
        with self.backend.read() as txn:
            for k, v in txn.range("inodes", b""):
                node = Inode.unpack(U64.unpack(k)[0], v)
                if node.is_dir:
                    s.dirs_total += 1
                    s.dirs_listed += node.stored
                elif node.is_reg:
                    s.files_total += 1
                    s.bytes_logical += node.size
                    if node.stored:
                        s.files_migrated += 1
                        s.bytes_migrated += node.size
                    else:
                        s.files_legacy += 1
                        s.bytes_legacy += node.size
            for _, v in txn.range("chunks", b""):
                s.chunks += 1
                s.bytes_compressed += len(v)
            for _ in txn.range("errors", b""):
                s.errors += 1
            s.files_indexed, s.index_pending = index.counts(txn)
        s.bytes_stored = self.backend.disk_bytes()
        s.bytes_index = index.bytes_on_disk(self.path)
        return s

    def iter_inodes(self) -> Iterator[Inode]:
        with self.backend.read() as txn:
            for k, v in txn.range("inodes", b""):
                yield Inode.unpack(U64.unpack(k)[0], v)

    def statfs(self) -> tuple[int, int, int, int]:
        """(block size, total blocks, free blocks, files) of the store's filesystem."""
        st = os.statvfs(self.path or ".")
        return st.f_frsize, st.f_blocks, st.f_bavail, st.f_files

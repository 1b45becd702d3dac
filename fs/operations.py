"""The FUSE protocol adapter: each handler translates one request into store
calls. What a file system looks like lives in the store; errnos in errmap.

Concurrency rules (pyfuse3 runs up to 99 handlers at once on one trio loop):
- a store call is synchronous and is one transaction: it is atomic;
- heavy work (migrating a file, planning a rewrite) runs in a worker thread
  through `trio.to_thread`, holding the file's lock from `OpenFiles`, and is
  committed on this thread before the lock is released;
- a new `await` between two store calls breaks their atomicity: take the
  file's lock around both, or make them one store call.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio
from ferryfs.store.errors import CorruptChunk, OpError, SourceError
from ferryfs.store.records import Inode
from ferryfs.store.store import Store

from .errmap import fuse_errors
from .handles import OpenFile, OpenFiles
from .lazy import LazyMigrator

log = logging.getLogger("ferryfs.fs")

STATE_XATTR = b"user.ferryfs.state"
CONTROL_PREFIX = b"user.ferryfs."
# Names and attributes change only through this mount (the store is locked to
# it, and migration changes no attribute), so the kernel may keep them long: as
# S3QL does. Each lookup it does not send is a round trip (~100 µs here) saved.
ATTR_TIMEOUT = 300.0
DOT_COOKIE, DOTDOT_COOKIE = 1, 2
ENTRY_TIMEOUT = 300.0


@dataclass
class Counters:
    """What the mount has done since it started, for `status`."""

    reads: int = 0
    migrated_on_open: int = 0
    corrupt_reads: int = 0
    healed: int = 0
    errors: list[str] = field(default_factory=list)
    last_request: float = field(default_factory=time.monotonic)


class Operations(pyfuse3.Operations):
    """ferryfs as pyfuse3 sees it: a thin adapter over a `Store`."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, store: Store, owner_uid: int, control: Any = None) -> None:
        super().__init__()
        self.store = store
        self.owner_uid = owner_uid
        self.files = OpenFiles()
        self.lookups: dict[int, int] = {}
        self.counters = Counters()
        self.control = control  # answers the user.ferryfs.* control xattrs on the root
        self.opened_version: dict[int, int] = {}
        self.on_request: Callable[[], None] = lambda: None
        self.lazy = LazyMigrator(store, self.files, self.counters)

    # -- helpers ------------------------------------------------------------------

    def _attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        size = node.size
        f = self.files.by_ino.get(node.ino)
        if f is not None and f.dirty_end > size:
            size = f.dirty_end
        a.st_size = size
        a.st_blksize = 65536
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    def _entry(self, node: Inode) -> pyfuse3.EntryAttributes:
        self.lookups[node.ino] = self.lookups.get(node.ino, 0) + 1
        return self._attr(node)

    def _touch(self) -> None:
        self.counters.last_request = time.monotonic()
        self.on_request()

    def on_corrupt(self, e: CorruptChunk) -> None:
        self.counters.corrupt_reads += 1
        log.error("corrupt chunk %s: read answered EIO", e.digest.hex()[:16])

    async def _flush_file(self, ino: int) -> None:
        """Write a file's buffered spans to the store. Call with its lock held."""
        f = self.files.by_ino.get(ino)
        while f is not None and f.spans:
            # Many small spans cost as much to plan as a MiB of bytes.
            big = f.dirty_bytes >= 1 << 20 or len(f.spans) >= 4096
            spans = f.take()
            try:
                while True:
                    if big:  # worth a thread hop (~0.75 ms here): chunking and compression
                        rw = await trio.to_thread.run_sync(self.store.plan_write, ino, spans)
                    else:
                        rw = self.store.plan_write(ino, spans)
                    if self.store.commit(rw) is not None:
                        break
                f.settle()
            except BaseException:
                # ENOSPC or worse: keep the bytes buffered, so freeing space and
                # flushing again loses nothing the app wrote.
                f.restore(spans)
                raise

    async def _flush_dirty(self, f: OpenFile) -> None:
        """Flush `f` if it has buffered bytes or a flush in flight (whose spans are
        out of the buffer, not yet committed). A clean file's lock is not taken: a
        first-open migration holds it for as long as the file takes to migrate."""
        if f.spans or f.flushing:
            async with f.lock:
                await self._flush_file(f.ino)

    async def _migrate(self, ino: int) -> Inode:
        """Make sure `ino` is not LEGACY: migrate it now (before a write)."""
        node = self.store.getattr(ino)
        if node.is_reg and not node.stored:
            await self.lazy.migrate(ino)
            node = self.store.getattr(ino)
        return node

    # -- namespace -----------------------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._touch()
        return self._entry(self.store.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            if ino not in self.files.by_ino:
                try:
                    self.store.forget(ino)
                except Exception:
                    log.exception("forget of inode %d failed", ino)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.store.getattr(inode))

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._touch()
        async with self.files.lock(inode):
            # Writes buffered before this request land first, or their commit would
            # overwrite the times it sets (tar -p: write, futimens, close).
            await self._flush_file(inode)
            if fields.update_size:
                node = self.store.getattr(inode)
                if node.is_reg and not node.stored and attr.st_size != 0:
                    await self.lazy.migrate_locked(inode)
            now = time.time_ns()
            node = self.store.setattr(
                inode,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                ctime_ns=attr.st_ctime_ns if fields.update_ctime else now,
            )
        return self._attr(node)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.store.readlink(inode)

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._touch()
        node = self.store.getattr(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._touch()
        # "." and ".." first, under cookies 1 and 2 (a name's cookie is a 63-bit
        # hash: one of 2**63 collides with them). No lookup count for either.
        if start_id < DOTDOT_COOKIE:
            d = self.store.getattr(fh)
            dots = [
                (b".", d, DOT_COOKIE),
                (b"..", self.store.getattr(d.parent or fh), DOTDOT_COOKIE),
            ]
            for name, node, cookie in dots[start_id:]:
                if not pyfuse3.readdir_reply(token, name, self._attr(node), cookie):
                    return
        after = max(start_id, DOTDOT_COOKIE)
        while True:
            batch = self.store.readdir(fh, after, limit=256)
            if not batch:
                return
            for cookie, name, node in batch:
                if not pyfuse3.readdir_reply(token, name, self._attr(node), cookie):
                    return
                self.lookups[node.ino] = self.lookups.get(node.ino, 0) + 1
                after = cookie

    async def releasedir(self, fh: int) -> None:
        pass

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._touch()
        return self._entry(
            self.store.mknod(parent_inode, name, mode, ctx.uid, self._gid(parent_inode, ctx), rdev)
        )

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._touch()
        mode = self._inherit_sgid(parent_inode, mode, directory=True)
        return self._entry(
            self.store.mkdir(parent_inode, name, mode, ctx.uid, self._gid(parent_inode, ctx))
        )

    def _gid(self, parent: int, ctx: pyfuse3.RequestContext) -> int:
        """BSD group semantics when the parent directory is set-group-ID."""
        p = self.store.getattr(parent)
        return p.gid if p.mode & stat.S_ISGID else ctx.gid

    def _inherit_sgid(self, parent: int, mode: int, directory: bool) -> int:
        p = self.store.getattr(parent)
        if directory and p.mode & stat.S_ISGID:
            return mode | stat.S_ISGID
        return mode

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._touch()
        self.store.unlink(parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._touch()
        self.store.rmdir(parent_inode, name)

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._touch()
        return self._entry(
            self.store.symlink(parent_inode, name, target, ctx.uid, self._gid(parent_inode, ctx))
        )

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._touch()
        self.store.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._touch()
        return self._entry(self.store.link(inode, new_parent_inode, new_name))

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        bsize, blocks, free, files = self.store.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = bsize
        s.f_frsize = bsize
        s.f_blocks = blocks
        s.f_bfree = free
        s.f_bavail = free
        s.f_files = files
        s.f_ffree = files
        s.f_favail = files
        s.f_namemax = 255
        return s

    # -- contents ------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._touch()
        node = self.store.getattr(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and node.is_reg:
            # libfuse asks for atomic O_TRUNC: the kernel sends no setattr.
            async with self.files.lock(inode):
                f = self.files.by_ino.get(inode)
                if f is not None:
                    f.drop()
                node = self.store.truncate(inode, 0)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        legacy = None
        if node.is_reg and not node.stored:
            if writable:
                node = await self._migrate(inode)
            else:
                # Serve this open from Phase 3 (same bytes) while it migrates behind.
                try:
                    legacy = self.store.open_legacy(inode)  # records its error in status
                except SourceError as e:
                    log.warning("cannot migrate inode %d on first open: %s", inode, e)
                    raise
                self.lazy.request(inode)
        h = self.files.open(inode)
        h.legacy = legacy
        keep = self.opened_version.get(inode) == node.version
        self.opened_version[inode] = node.version
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=keep)

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._touch()
        node = self.store.create(parent_inode, name, mode, ctx.uid, self._gid(parent_inode, ctx))
        h = self.files.open(node.ino)
        self.opened_version[node.ino] = node.version
        return pyfuse3.FileInfo(fh=h.fh), self._entry(node)

    @fuse_errors
    # pyfuse3's stub says bytes, but it replies through PyObject_GetBuffer: any
    # contiguous buffer will do, and a view of a cached chunk saves a copy.
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        self._touch()
        h = self.files.get(fh)
        self.counters.reads += 1
        f = h.file
        # A flush in progress has already taken the spans out of the buffer but not
        # committed them yet: wait for it too, or this read gets the old bytes. Not
        # for a first-open migration holding the lock: the Phase 3 bytes are the same.
        await self._flush_dirty(f)
        if h.legacy is not None:
            node = self.store.getattr(f.ino)
            try:
                if not node.changed:
                    return self.store.read_legacy(h.legacy, f.ino, off, size)  # inline: see _read
            except SourceError as e:  # changed in Phase 3: EIO, never a mix
                if not node.stored:
                    log.warning("cannot read inode %d from Phase 3: %s", f.ino, e)
                    raise
                # Migrated before it changed there: the store has the version shown.
            h.legacy.close()  # written through another handle: the store has it now
            h.legacy = None
        try:
            return await self._read(f.ino, off, size)
        except CorruptChunk as e:
            # Never wrong bytes: heal from Phase 3 if the file is unmodified, else EIO
            # and failsafe (writes refused until fsck has looked at the store).
            self.on_corrupt(e)
            if await trio.to_thread.run_sync(self.store.heal, f.ino, e.digest):
                self.counters.healed += 1
                log.warning("healed chunk %s from Phase 3", e.digest.hex()[:16])
                return await self._read(f.ino, off, size)
            self.store.failsafe = (
                f"chunk {e.digest.hex()[:16]} of inode {f.ino} is corrupt and cannot be healed"
            )
            log.error("failsafe: %s; writes refused, run ferryfs fsck", self.store.failsafe)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _read(self, ino: int, off: int, size: int) -> bytes | memoryview:
        # Inline on purpose: a trio.to_thread hop costs ~0.75 ms here, more than
        # decoding and hashing a 256 KiB read (measured: 1 GiB in 5.0 s vs 1.9 s).
        data = self.store.read_stored(ino, off, size)
        if data is None:  # LEGACY (opened before a restart of the daemon, say)
            await self._migrate(ino)
            data = self.store.read(ino, off, size)
        return data  # pyfuse3 replies from any buffer: a view saves a copy

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._touch()
        if self.store.failsafe is not None:
            # Refuse here, not at the flush: close() errors are easy to ignore.
            raise pyfuse3.FUSEError(errno.EROFS)
        h = self.files.get(fh)
        f = h.file
        async with f.lock:
            node = self.store.getattr(f.ino)
            if not node.stored:
                await self.lazy.migrate_locked(f.ino)
            f.add(off, buf)
            if f.full:
                await self._flush_file(f.ino)
        return len(buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        # The kernel sends this at every close() of every fd. Wait for the file's
        # lock only when there is something to write: a first-open migration holds
        # it for as long as the file takes to migrate. (Answering ENOSYS would stop
        # FLUSH altogether, a round trip per file, but then bytes an app closed
        # would sit in memory until release, and a daemon killed then loses them:
        # tests/test_crash.py caught that.)
        f = self.files.get(fh).file
        await self._flush_dirty(f)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self.files.get(fh).file
        async with f.lock:
            await self._flush_file(f.ino)
        await trio.to_thread.run_sync(self.store.sync)

    @fuse_errors
    async def release(self, fh: int) -> None:
        f = self.files.get(fh).file
        try:
            await self._flush_dirty(f)
        except OpError as e:
            if f.handles == 1:
                # close() already returned flush's error to the app; the last handle
                # going away must not keep unwritable bytes in memory forever.
                msg = f"dropped {f.dirty_bytes} unwritable buffered bytes of inode {f.ino}: {e}"
                log.error("%s", msg)
                self.counters.errors.append(msg)
                f.drop()
            raise
        finally:
            f = self.files.close(fh)
        if f.handles == 0 and f.ino not in self.lookups:
            self.store.forget(f.ino)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(self.store.sync)

    # -- extended attributes ---------------------------------------------------------

    def _control_allowed(self, ctx: pyfuse3.RequestContext) -> bool:
        return ctx.uid in (0, self.owner_uid)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == STATE_XATTR:
            return self.store.getattr(inode).state.encode()
        if inode == pyfuse3.ROOT_INODE and name.startswith(CONTROL_PREFIX) and self.control:
            if not self._control_allowed(ctx):
                raise pyfuse3.FUSEError(errno.EACCES)
            value: bytes = await self.control.get(name[len(CONTROL_PREFIX) :])
            return value
        return self.store.getxattr(inode, name)

    @fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if name == STATE_XATTR:
            raise pyfuse3.FUSEError(errno.EPERM)
        if inode == pyfuse3.ROOT_INODE and name.startswith(CONTROL_PREFIX) and self.control:
            if not self._control_allowed(ctx):
                raise pyfuse3.FUSEError(errno.EACCES)
            await self.control.set(name[len(CONTROL_PREFIX) :], value)
            return
        self.store.setxattr(inode, name, value)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.store.listxattr(inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name == STATE_XATTR:
            raise pyfuse3.FUSEError(errno.EPERM)
        self.store.removexattr(inode, name)

    # -- shutdown ------------------------------------------------------------------

    async def flush_all(self) -> list[tuple[int, int, Exception]]:
        """Write out every buffered file; the (inode, bytes, error) of each file
        whose buffered bytes could not be written (they stay buffered). Callers
        say what that means: lost at shutdown, a failed sync, a refused umount."""
        failed = []
        for ino, f in list(self.files.by_ino.items()):
            try:
                await self._flush_dirty(f)  # a clean file's lock may be held by its migration
            except Exception as e:
                failed.append((ino, f.dirty_bytes, e))
        return failed

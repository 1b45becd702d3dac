"""The FUSE protocol adapter: each handler translates one request into store
calls. What a file system looks like lives in the store; errnos in errmap;
buffered writes in writeback.

pyfuse3 runs up to 99 handlers at once on this one trio thread. Reads run
inline; every store call that writes is handed to the writer thread
(`await self.writer.run(...)`). Which thread does what, and why a new `await`
between two store calls breaks their atomicity: docs/concurrency.md.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence

import pyfuse3
import trio
from ferryfs.store.errors import (
    CorruptChunk,
    IsADir,
    NotADir,
    NotPermitted,
    OpError,
    ReadOnly,
    SourceError,
)
from ferryfs.store.records import Inode
from ferryfs.store.store import Store

from .control import Control
from .counters import Counters
from .errmap import AccessDenied, Failsafe, fuse_errors
from .handles import OpenFiles
from .lazy import LazyMigrator
from .writeback import WriteBack
from .writer import Writer

log = logging.getLogger("ferryfs.fs")

STATE_XATTR = b"user.ferryfs.state"
CONTROL_PREFIX = b"user.ferryfs."
# Names and attributes change only through this mount (the store is locked to
# it, and migration changes no attribute), so the kernel may keep them long: as
# S3QL does. Each lookup it does not send is a round trip (~100 µs here) saved.
ATTR_TIMEOUT = 300.0
DOT_COOKIE, DOTDOT_COOKIE = 1, 2
ENTRY_TIMEOUT = 300.0


class Operations(pyfuse3.Operations):
    """ferryfs as pyfuse3 sees it: a thin adapter over a `Store`.

    Only `store` and `owner_uid` are needed (tests build it so); the daemon passes
    the collaborators it shares with the control channel and the sweep."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        store: Store,
        owner_uid: int,
        *,
        writer: Writer | None = None,
        writeback: WriteBack | None = None,
        counters: Counters | None = None,
        control: Control | None = None,
        on_request: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.owner_uid = owner_uid
        self.writer = writer if writer is not None else Writer()
        self.files = writeback.files if writeback is not None else OpenFiles()
        self.writeback = writeback or WriteBack(store, self.files, self.writer)
        self.counters = counters if counters is not None else Counters()
        self.control = control  # answers the user.ferryfs.* control xattrs on the root
        self.on_request = on_request or (lambda: None)
        self.lookups: dict[int, int] = {}
        self.opened_version: dict[int, int] = {}
        self.lazy = LazyMigrator(store, self.files, self.counters, self.writer)

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

    async def _migrate(self, ino: int) -> Inode:
        """Make sure `ino` is not LEGACY: migrate it now (before a write)."""
        node = self.store.getattr(ino)
        if node.is_reg and not node.stored:
            await self.lazy.migrate(ino)
            node = self.store.getattr(ino)
        return node

    def _forget(self, inos: list[int]) -> None:
        for ino in inos:  # on the writer: one hop for the kernel's whole batch
            try:
                self.store.forget(ino)
            except OpError:
                log.exception("forget of inode %d failed", ino)
            except Exception:
                if self.store.backend.grouped():
                    raise  # a shared transaction broke (full map): the writer reruns this alone
                log.exception("forget of inode %d failed", ino)

    # -- namespace -----------------------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._touch()
        node = self.store.lookup_listed(parent_inode, name)
        if node is None:  # listing the parent writes: on the writer
            node = await self.writer.run(self.store.lookup, parent_inode, name)
        return self._entry(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        gone = []
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            if ino not in self.files.by_ino:
                gone.append(ino)
        if gone:
            await self.writer.run(self._forget, gone)

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
            await self.writeback.flush_file(inode)
            if fields.update_size:
                node = self.store.getattr(inode)
                if node.is_reg and not node.stored and attr.st_size != 0:
                    await self.lazy.migrate_locked(inode)
            change = functools.partial(
                self.store.setattr,
                inode,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                ctime_ns=attr.st_ctime_ns if fields.update_ctime else time.time_ns(),
            )
            node = await self.writer.run(change)
        return self._attr(node)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.store.readlink(inode)

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._touch()
        if not self.store.getattr(inode).is_dir:
            raise NotADir(f"inode {inode} is not a directory")
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._touch()
        d = self.store.getattr(fh)
        if d.is_unlisted:  # listed with what lies ahead, on the writer; then only reads
            await self.writer.run(self.store.readdir, fh, 0, 1)
            d = self.store.getattr(fh)
        # "." and ".." first, under cookies 1 and 2 (a name's cookie is a 63-bit
        # hash: one of 2**63 collides with them). No lookup count for either.
        if start_id < DOTDOT_COOKIE:
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
        gid = self._gid(parent_inode, ctx)
        return self._entry(
            await self.writer.run(self.store.mknod, parent_inode, name, mode, ctx.uid, gid, rdev)
        )

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._touch()
        mode = self._inherit_sgid(parent_inode, mode, directory=True)
        gid = self._gid(parent_inode, ctx)
        return self._entry(
            await self.writer.run(self.store.mkdir, parent_inode, name, mode, ctx.uid, gid)
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
        await self.writer.run(self.store.unlink, parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._touch()
        await self.writer.run(self.store.rmdir, parent_inode, name)

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._touch()
        gid = self._gid(parent_inode, ctx)
        return self._entry(
            await self.writer.run(self.store.symlink, parent_inode, name, target, ctx.uid, gid)
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
        await self.writer.run(
            self.store.rename, parent_inode_old, name_old, parent_inode_new, name_new, flags
        )

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._touch()
        return self._entry(
            await self.writer.run(self.store.link, inode, new_parent_inode, new_name)
        )

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
            raise IsADir(f"inode {inode} is a directory")
        if flags & os.O_TRUNC and node.is_reg:
            # libfuse asks for atomic O_TRUNC: the kernel sends no setattr.
            async with self.files.lock(inode):
                f = self.files.by_ino.get(inode)
                if f is not None:
                    f.drop()
                node = await self.writer.run(self.store.truncate, inode, 0)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        legacy = None
        if node.is_reg and not node.stored:
            if writable:
                node = await self._migrate(inode)
            else:
                # Serve this open from Phase 3 (same bytes) while it migrates behind.
                try:
                    # Inline; its failure records the error (docs/concurrency.md).
                    with self.writer.permit():
                        legacy = self.store.open_legacy(inode)
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
        gid = self._gid(parent_inode, ctx)
        node = await self.writer.run(self.store.create, parent_inode, name, mode, ctx.uid, gid)
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
        await self.writeback.flush_dirty(f)
        if h.legacy is not None:
            node = self.store.getattr(f.ino)
            try:
                if not node.changed:
                    with self.writer.permit():  # inline: see _read; its failure records
                        return self.store.read_legacy(h.legacy, f.ino, off, size)
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
            if await self.writer.run(self.store.heal, f.ino, e.digest):
                self.counters.healed += 1
                log.warning("healed chunk %s from Phase 3", e.digest.hex()[:16])
                return await self._read(f.ino, off, size)
            self.store.failsafe = (
                f"chunk {e.digest.hex()[:16]} of inode {f.ino} is corrupt and cannot be healed"
            )
            log.error("failsafe: %s; writes refused, run ferryfs fsck", self.store.failsafe)
            raise Failsafe(self.store.failsafe) from None

    async def _read(self, ino: int, off: int, size: int) -> bytes | memoryview:
        # Inline on purpose: a trio.to_thread hop costs ~0.75 ms here, more than
        # decoding and hashing a 256 KiB read (measured: 1 GiB in 5.0 s vs 1.9 s).
        data = self.store.read_stored(ino, off, size)
        if data is None:  # LEGACY (opened before a restart of the daemon, say)
            await self._migrate(ino)
            data = self.store.read_stored(ino, off, size)
            if data is None:
                raise SourceError("not migrated")
        return data  # pyfuse3 replies from any buffer: a view saves a copy

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._touch()
        if self.store.failsafe is not None:
            # Refuse here, not at the flush: close() errors are easy to ignore.
            raise ReadOnly(self.store.failsafe)
        h = self.files.get(fh)
        f = h.file
        async with f.lock:
            node = self.store.getattr(f.ino)
            if not node.stored:
                await self.lazy.migrate_locked(f.ino)
            f.add(off, buf)
            if f.full:
                await self.writeback.flush_file(f.ino)
        return len(buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        # The kernel sends this at every close() of every fd. Wait for the file's
        # lock only when there is something to write: a first-open migration holds
        # it for as long as the file takes to migrate. (Answering ENOSYS would stop
        # FLUSH altogether, a round trip per file, but then bytes an app closed
        # would sit in memory until release, and a daemon killed then loses them:
        # tests/t5_crash.py caught that.)
        await self.writeback.flush_dirty(self.files.get(fh).file)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self.files.get(fh).file
        async with f.lock:
            await self.writeback.flush_file(f.ino)
        await trio.to_thread.run_sync(self.store.sync)

    @fuse_errors
    async def release(self, fh: int) -> None:
        f = self.files.get(fh).file
        try:
            await self.writeback.flush_dirty(f)
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
            await self.writer.run(self.store.forget, f.ino)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(self.store.sync)

    # -- extended attributes ---------------------------------------------------------

    def _control(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> Control | None:
        """The control channel, if this request is for it (and allowed)."""
        if inode != pyfuse3.ROOT_INODE or not name.startswith(CONTROL_PREFIX):
            return None
        if self.control is None:
            return None
        if ctx.uid not in (0, self.owner_uid):
            raise AccessDenied("only the mount's owner or root may use its control channel")
        return self.control

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == STATE_XATTR:
            return self.store.getattr(inode).state.encode()
        control = self._control(inode, name, ctx)
        if control is not None:
            return await control.get(name[len(CONTROL_PREFIX) :])
        return self.store.getxattr(inode, name)

    @fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if name == STATE_XATTR:
            raise NotPermitted("the migration state is read-only")
        control = self._control(inode, name, ctx)
        if control is not None:
            await control.set(name[len(CONTROL_PREFIX) :], value)
            return
        await self.writer.run(self.store.setxattr, inode, name, value)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.store.listxattr(inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name == STATE_XATTR:
            raise NotPermitted("the migration state is read-only")
        await self.writer.run(self.store.removexattr, inode, name)

"""A read-only passthrough mount of the Phase 3 tree: what `ferryfs rollback`
shows when it cannot make a read-only bind mount (not root).

Every access goes through the tree's directory fd with `openat` and
`O_NOFOLLOW` (store.phase3), so nothing outside the tree is reachable; the
mount is `ro`, so the kernel answers EROFS to every write.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import pyfuse3
import trio
from ferryfs.store.errors import FerryError, NoData, NotFound, ReadOnly
from ferryfs.store.phase3 import Entry, Phase3Tree, join

from .errmap import fuse_errors

log = logging.getLogger("ferryfs.passthrough")


class ReadOnlyTree(pyfuse3.Operations):
    """Inode numbers are our own; each maps to a path relative to the tree."""

    def __init__(self, tree: Phase3Tree) -> None:
        super().__init__()
        self.tree = tree
        self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: b""}
        self.inos: dict[bytes, int] = {b"": pyfuse3.ROOT_INODE}
        self.fds: dict[int, int] = {}
        self._next = pyfuse3.ROOT_INODE + 1

    def _ino(self, path: bytes) -> int:
        ino = self.inos.get(path)
        if ino is None:
            ino = self._next
            self._next += 1
            self.inos[path] = ino
            self.paths[ino] = path
        return ino

    def _attr(self, path: bytes) -> pyfuse3.EntryAttributes:
        st = self.tree.lstat(path)
        a = pyfuse3.EntryAttributes()
        for f in (
            "st_mode",
            "st_nlink",
            "st_uid",
            "st_gid",
            "st_rdev",
            "st_size",
            "st_blksize",
            "st_blocks",
            "st_atime_ns",
            "st_mtime_ns",
            "st_ctime_ns",
        ):
            setattr(a, f, getattr(st, f))
        a.st_ino = self._ino(path)
        a.entry_timeout = a.attr_timeout = 60.0
        return a

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attr(join(self.paths[parent_inode], name))

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self.paths[inode])

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        for e in self._list(os.path.dirname(self.paths[inode])):
            if e.name == os.path.basename(self.paths[inode]):
                return e.target
        raise NotFound(os.fsdecode(self.paths[inode]))

    def _list(self, rel: bytes) -> list[Entry]:
        return list(self.tree.listdir(rel))

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # The kernel adds no "." and "..": they come first, under cookies 1 and 2,
        # as in the ferryfs mount and the Phase 3 tree itself ("ls -a" alike).
        rel = self.paths[fh]
        up = os.path.dirname(rel)  # the mount's root is its own parent here
        dots = [(b".", rel), (b"..", up)]
        names = [(e.name, join(rel, e.name)) for e in sorted(self._list(rel), key=lambda e: e.name)]
        for i, (name, path) in enumerate([*dots, *names][start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attr(path), i):
                return

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise ReadOnly("the Phase 3 tree is shown read-only")
        fd = self.tree.open_file(self.paths[inode])
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        self.fds.pop(fh, None)
        os.close(fh)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.fstatvfs(self.tree.root_fd)
        s = pyfuse3.StatvfsData()
        for f in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(s, f, getattr(st, f))
        return s

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise NoData(name.decode(errors="replace"))  # ENOATTR


async def _serve(ready: int | None) -> None:
    async with trio.open_nursery() as n:
        n.start_soon(_stop_on_signal)
        if ready is not None:
            os.write(ready, b"ready\n")
            os.close(ready)
        await pyfuse3.main()
        n.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ferryfs-readonly")
    p.add_argument("src")
    p.add_argument("mnt")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--allow-other", action="store_true", help="as the ferryfs mount had it")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        tree = Phase3Tree.open(a.src)
    except FerryError as e:
        print(f"ferryfs: {e}", file=sys.stderr)
        return e.exit_code
    opts = {"fsname=ferryfs-phase3", "subtype=ferryfs-ro", "ro", "default_permissions", "nodev"}
    if a.allow_other:  # the app's other users keep reading; the kernel checks each mode
        opts.add("allow_other")
    pyfuse3.init(ReadOnlyTree(tree), a.mnt, opts)
    clean = False
    try:
        trio.run(_serve, a.ready_fd)
        clean = True
    finally:
        pyfuse3.close(unmount=clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())

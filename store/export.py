"""Writing the changes a rollback would lose out as plain files, safely when root does it.

Each changed or new file goes to DEST/<its path in the mount>; symlinks and
FIFOs are recreated; a directory moved before it was ever listed is copied
from Phase 3; the Phase 3 paths no longer present are listed in
DEST/.ferryfs-deleted, one per line (backslash and newline escaped).

Root exports files that other users wrote through an `allow_other` mount, so:

- DEST is a new directory made here (mode 0700), or an existing empty one
  owned by the caller that no one else may write to; it must not lie inside
  the mount, the Phase 3 tree or the store (`check_dest`, before anything is
  unmounted).
- Everything below DEST is made through directory fds, each component opened
  with `O_NOFOLLOW` and each file created with `O_EXCL`: no link is ever
  followed and nothing that exists is overwritten.
- Each entry keeps the mode the mount showed and, when root exports, its
  owner and group (never root's, for a file another user wrote). Setuid and
  setgid bits are never written on a file: they are stripped, and the files
  are listed in DEST/.ferryfs-modes (old mode, new mode, path).
- Contents are copied in 1 MiB pieces, never a whole file in memory; holes
  and all-zero pieces are skipped with a seek, so a sparse file stays sparse.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import content
from . import namespace as ns
from .changes import Changes
from .errors import FerryError, UsageError
from .phase3 import Phase3Tree, join
from .records import HOLE, ROOT_INO, Inode
from .store import Store

PIECE = 1 << 20
DELETED = ".ferryfs-deleted"
MODES = ".ferryfs-modes"
SETID = stat.S_ISUID | stat.S_ISGID

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ExportFailed(FerryError):
    exit_code = 1


@dataclass(frozen=True)
class Meta:
    """What an exported entry keeps of the mount's view of it."""

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int

    @classmethod
    def of_inode(cls, n: Inode) -> Meta:
        return cls(n.mode, n.uid, n.gid, n.atime_ns, n.mtime_ns)

    @classmethod
    def of_stat(cls, st: os.stat_result) -> Meta:
        return cls(st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns)


@dataclass
class Exported:
    """What an export wrote: entries written, and files whose setuid/setgid was stripped."""

    entries: int = 0
    stripped: list[tuple[bytes, int, int]] = field(default_factory=list)  # path, old, new


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_dest(dest: str, forbidden: list[tuple[str, str]]) -> None:
    """Refuse (UsageError, exit 2) a DEST that is not new or empty and ours, or
    that resolves into one of `forbidden` (what, path): the mount, Phase 3, the store."""
    real = os.path.realpath(dest)
    for what, root in forbidden:
        if _inside(real, os.path.realpath(root)):
            raise UsageError(f"--export-changes {dest} lies inside {what} {root}: choose another")
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(real)):
            raise UsageError(f"--export-changes {dest}: its parent is not a directory") from None
        return
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"--export-changes {dest} is a symlink: give a new directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"--export-changes {dest} exists and is not a directory")
    _check_own_empty(dest, st, os.listdir(dest))


def _check_own_empty(dest: str, st: os.stat_result, names: list[str]) -> None:
    if names:
        raise UsageError(f"--export-changes {dest} is not empty: give a new or empty directory")
    if st.st_uid != os.geteuid():
        raise UsageError(f"--export-changes {dest} belongs to uid {st.st_uid}, not to you")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(f"--export-changes {dest} is writable by others: give a new directory")


def open_dest(dest: str, forbidden: list[tuple[str, str]]) -> int:
    """Make DEST (0700) or take an empty one of ours; its fd. Checked again on the
    fd, since the path may have been swapped since `check_dest`."""
    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise ExportFailed(f"cannot create {dest}: {os.strerror(e.errno or errno.EIO)}") from None
    try:
        fd = os.open(dest, _DIR)
    except OSError as e:
        raise UsageError(f"--export-changes {dest} is not a directory (or a symlink)") from e
    try:
        _check_own_empty(dest, os.fstat(fd), os.listdir(fd))
        real = os.readlink(f"/proc/self/fd/{fd}")
        for what, root in forbidden:
            if _inside(real, os.path.realpath(root)):
                raise UsageError(f"--export-changes {dest} lies inside {what} {root}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def export_changes(store: Store, tree: Phase3Tree, changes: Changes, dest_fd: int) -> Exported:
    """Write `changes` under the directory `dest_fd` (from `open_dest`). As root,
    each entry gets the owner the mount showed; otherwise it is the caller's."""
    out = _Out(dest_fd, chown=os.geteuid() == 0)
    dir_meta = _StoreDirs(store)
    for path, node in changes.changed:
        parent, name = out.parent(path, dir_meta.meta)
        try:
            _write_node(store, tree, out, parent, name, path, node)
        finally:
            os.close(parent)
    for new, old in changes.moved_dirs:
        _copy_phase3(tree, out, old, new, dir_meta.meta)
    out.finish()
    with out.new_file(dest_fd, DELETED.encode()) as f:
        for p in changes.deleted:
            f.write(p.replace(b"\\", b"\\\\").replace(b"\n", b"\\n") + b"\n")
    if out.report.stripped:
        with out.new_file(dest_fd, MODES.encode()) as f:
            for p, old_mode, new_mode in out.report.stripped:
                esc = p.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")
                f.write(b"%04o %04o %s\n" % (old_mode, new_mode, esc))
    return out.report


class _StoreDirs:
    """The store's attributes of a directory by path (for the directories an export
    creates above a changed file); None where the store has no such directory."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def meta(self, path: bytes) -> Meta | None:
        with self.store.backend.read() as txn:
            ino = ROOT_INO
            for part in (p for p in path.split(b"/") if p):
                found = ns.child(txn, ino, part)
                if found is None:
                    return None
                ino = found
            node = ns.get(txn, ino)
        return Meta.of_inode(node) if node.is_dir else None


class _Out:
    """The export's side: creating entries under the root fd without following links."""

    def __init__(self, root: int, chown: bool) -> None:
        self.root = root
        self.chown = chown
        self.dirs: dict[bytes, Meta | None] = {}  # made here; attributes set by finish()
        self.report = Exported()

    def _open_dir(self, parts: list[bytes]) -> int:
        fd = os.open(".", _DIR, dir_fd=self.root)
        try:
            for part in parts:
                nfd = os.open(part, _DIR, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def parent(self, path: bytes, meta: Callable[[bytes], Meta | None]) -> tuple[int, bytes]:
        """An fd of `path`'s parent below the root (made as needed), and its last name."""
        parts = [p for p in path.split(b"/") if p]
        if not parts or any(p in (b".", b"..") for p in parts):
            raise ExportFailed(f"bad path in the store: {path!r}")
        fd = os.open(".", _DIR, dir_fd=self.root)
        try:
            for i, part in enumerate(parts[:-1]):
                rel = b"/".join(parts[: i + 1])
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                    self.dirs[rel] = meta(rel)
                except FileExistsError:
                    pass
                nfd = os.open(part, _DIR, dir_fd=fd)  # ELOOP/ENOTDIR: never followed
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def mkdir(self, dfd: int, name: bytes, rel: bytes, meta: Meta) -> None:
        os.mkdir(name, 0o700, dir_fd=dfd)
        self.dirs[rel] = meta
        self.report.entries += 1

    def file(
        self, dfd: int, name: bytes, rel: bytes, meta: Meta, fill: Callable[[int], None]
    ) -> None:
        fd = os.open(name, _NEW, 0o600, dir_fd=dfd)
        try:
            fill(fd)
            self._own(fd, rel, meta)
        finally:
            os.close(fd)
        self.report.entries += 1

    def fifo(self, dfd: int, name: bytes, rel: bytes, meta: Meta) -> None:
        os.mkfifo(name, 0o600, dir_fd=dfd)
        # O_NONBLOCK: a FIFO opens for reading at once, with no writer.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise ExportFailed(f"{rel!r} changed under the export")
            self._own(fd, rel, meta)
        finally:
            os.close(fd)
        self.report.entries += 1

    def symlink(self, dfd: int, name: bytes, target: bytes, meta: Meta) -> None:
        os.symlink(target, name, dir_fd=dfd)
        if self.chown:
            os.chown(name, meta.uid, meta.gid, dir_fd=dfd, follow_symlinks=False)
        os.utime(name, ns=(meta.atime_ns, meta.mtime_ns), dir_fd=dfd, follow_symlinks=False)
        self.report.entries += 1

    def _own(self, fd: int, rel: bytes, meta: Meta) -> None:
        """Owner first (a chown clears setuid anyway), then the mode without
        setuid/setgid, then the times."""
        if self.chown:
            os.fchown(fd, meta.uid, meta.gid)
        mode = stat.S_IMODE(meta.mode)
        if mode & SETID:
            self.report.stripped.append((rel, mode, mode & ~SETID))
        os.fchmod(fd, mode & ~SETID)
        os.utime(fd, ns=(meta.atime_ns, meta.mtime_ns))

    def finish(self) -> None:
        """The attributes of the directories made here, deepest first (a directory's
        mtime moves while entries are made in it, and a 0500 one would refuse them)."""
        for rel in sorted(self.dirs, key=lambda p: -p.count(b"/")):
            meta = self.dirs[rel]
            if meta is None:
                continue
            fd = self._open_dir([p for p in rel.split(b"/") if p])
            try:
                if self.chown:
                    os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, stat.S_IMODE(meta.mode) & ~stat.S_ISUID)
                os.utime(fd, ns=(meta.atime_ns, meta.mtime_ns))
            finally:
                os.close(fd)

    def new_file(self, dfd: int, name: bytes) -> _Writer:
        try:
            return _Writer(os.open(name, _NEW, 0o600, dir_fd=dfd))
        except FileExistsError:
            raise ExportFailed(
                f"a changed file at the top is named {os.fsdecode(name)}; export it by hand"
            ) from None


class _Writer:
    def __init__(self, fd: int) -> None:
        self.f = os.fdopen(fd, "wb")

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def write(self, b: bytes) -> None:
        self.f.write(b)


def _write_node(
    store: Store, tree: Phase3Tree, out: _Out, dfd: int, name: bytes, path: bytes, node: Inode
) -> None:
    meta = Meta.of_inode(node)
    if node.is_link:
        out.symlink(dfd, name, node.target, meta)
    elif stat.S_ISFIFO(node.mode):
        out.fifo(dfd, name, path, meta)
    elif node.is_migrated:
        out.file(
            dfd, name, path, meta, lambda fd: _fill(fd, _stored_pieces(store, node), node.size)
        )
    elif node.is_reg:
        with store.backend.read() as txn:
            leg = ns.get_legacy(txn, node.ino)
        if leg is None:
            raise ExportFailed(f"{os.fsdecode(path)}: no content in the store or Phase 3")
        out.file(dfd, name, path, meta, lambda fd: _fill_from_phase3(fd, tree, leg.path))
    elif node.is_dir:
        out.mkdir(dfd, name, path, meta)
    # sockets and devices are not exported


def _stored_pieces(store: Store, node: Inode) -> Iterator[tuple[int, bytes | None, int]]:
    """(offset, bytes or None for a hole, length) tiling the stored file, each
    piece at most PIECE bytes of data (a hole is one piece whatever its size).
    Each piece is read in its own short transaction."""
    off, size = 0, node.size
    while off < size:
        end = min(size, off + PIECE)
        with store.backend.read() as txn:
            hole = next(
                ((e, n) for e, d, n in content.overlapping(txn, node.ino, off, end) if d == HOLE),
                None,
            )
            if hole is not None and hole[0] <= off:
                stop, data = min(size, hole[0] + hole[1]), None
            else:
                stop = hole[0] if hole is not None else end
                data = content.read(txn, node.ino, size, off, stop - off, store.cache)
        yield off, data, stop - off
        off = stop


def _fill(fd: int, pieces: Iterator[tuple[int, bytes | None, int]], size: int) -> None:
    for off, data, _ in pieces:
        if data is not None and not _zeros(data):
            _pwrite_all(fd, data, off)
    os.ftruncate(fd, size)  # a trailing hole or zeros: the size without the blocks


def _fill_from_phase3(fd: int, tree: Phase3Tree, rel: bytes) -> None:
    src = tree.open_file(rel)
    try:
        off = 0
        while data := os.pread(src, PIECE, off):
            if not _zeros(data):
                _pwrite_all(fd, data, off)
            off += len(data)
        os.ftruncate(fd, off)
    finally:
        os.close(src)


def _zeros(data: bytes) -> bool:
    return not data[0] and not data[-1] and data.count(0) == len(data)


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


def _copy_phase3(
    tree: Phase3Tree, out: _Out, old: bytes, new: bytes, meta: Callable[[bytes], Meta | None]
) -> None:
    """Phase 3's directory `old` copied to `new` below the export, with a stack
    (no recursion: a tree may be thousands of directories deep)."""
    parent, name = out.parent(new, meta)
    try:
        top = meta(new) or Meta.of_stat(tree.lstat(old))
        out.mkdir(parent, name, new, top)
    finally:
        os.close(parent)
    stack = [(old, new)]
    while stack:
        src, dst = stack.pop()
        dfd = out._open_dir([p for p in dst.split(b"/") if p])
        try:
            for e in tree.listdir(src):
                s, d, m = join(src, e.name), join(dst, e.name), Meta.of_stat(e.st)
                if stat.S_ISDIR(e.st.st_mode):
                    out.mkdir(dfd, e.name, d, m)
                    stack.append((s, d))
                elif stat.S_ISLNK(e.st.st_mode):
                    out.symlink(dfd, e.name, e.target, m)
                elif stat.S_ISFIFO(e.st.st_mode):
                    out.fifo(dfd, e.name, d, m)
                elif stat.S_ISREG(e.st.st_mode):
                    fill = functools.partial(_fill_from_phase3, tree=tree, rel=s)
                    out.file(dfd, e.name, d, m, fill)
        finally:
            os.close(dfd)

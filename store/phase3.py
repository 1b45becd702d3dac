"""Read-only access to the Phase 3 tree that never leaves it.

Everything goes through a directory fd opened once (before an in-place mount
shadows the path) and `openat` with `O_NOFOLLOW` on every component, so a
symlink anywhere in the tree, or one swapped in later, is never followed out.
Nothing here writes: the tree is the rollback point.

Other filesystems mounted inside the tree are not crossed (as `find -xdev`):
a directory on another device lists as empty. An entry that cannot be
lstat'ed is skipped, never the end of a listing.

The tree is supposed to be frozen. `drift` says how a file's stat differs from
the one its entry was imported with, and `Phase3File` checks it around every
read, so a file changed underneath the mount is never served as a mix of old
and new bytes (the mount answers EIO for it instead; see store.open_legacy).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from .errors import NotFound, SourceError, StoreMissing
from .records import Legacy

log = logging.getLogger("ferryfs.phase3")

# Directory fds a thread inside `cached_walks` keeps (see there).
WALK_CACHE = 64

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class Entry:
    name: bytes
    st: os.stat_result
    target: bytes  # symlinks only


class Phase3Tree:
    """The Phase 3 tree, held open by a directory fd."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.st_dev = os.fstat(root_fd).st_dev
        self._local = threading.local()

    def other_fs(self, st: os.stat_result) -> bool:
        """Whether `st` (a directory's) is the root of another filesystem mounted inside."""
        return st.st_dev != self.st_dev

    @contextlib.contextmanager
    def cached_walks(self) -> Iterator[None]:
        """Inside it, this thread's walks start from the deepest directory it opened
        lately rather than from the root: listing a chain of directories N deep
        breadth first opens N directories, not N²/2 (1,500 deep: 1.1 million opens,
        seconds). Per thread and per use, so no fd is shared with another thread and
        none outlives the work it was opened for."""
        if getattr(self._local, "fds", None) is not None:  # nested: the outer one owns it
            yield
            return
        fds: OrderedDict[bytes, int] = OrderedDict()
        self._local.fds = fds
        try:
            yield
        finally:
            self._local.fds = None
            for fd in fds.values():
                os.close(fd)

    @classmethod
    def open(cls, path: str | bytes) -> Phase3Tree:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreMissing(f"source {os.fsdecode(path)} does not exist") from None
        except NotADirectoryError:
            raise StoreMissing(f"source {os.fsdecode(path)} is not a directory") from None
        except PermissionError:
            raise StoreMissing(f"source {os.fsdecode(path)} is not readable") from None
        return cls(fd)

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def walk_to(self, parts: list[bytes]) -> int:
        """An fd of the directory at `parts`, opened component by component.

        Each is a new open of the directory, never a dup of the root's fd: a dup
        shares its read position, so two threads listing the root at once (the
        sweep and the rollback point's walk, at mount) each saw part of it, or
        none (found by test_sweep: a whole tree mounted as empty). Inside
        `cached_walks` the walk starts at the deepest cached ancestor, reopened
        (".") for the same reason."""
        for part in parts:
            if part in (b"", b".", b"..") or b"/" in part:
                raise SourceError(f"bad path component {part!r}")
        fds: OrderedDict[bytes, int] | None = getattr(self._local, "fds", None)
        start, anchor = 0, self.root_fd
        if fds:
            key = b"/".join(parts)
            k = len(parts)
            while k > 0:
                got = fds.get(key)
                if got is not None:
                    fds.move_to_end(key)
                    start, anchor = k, got
                    break
                k -= 1
                key = key[: key.rfind(b"/")] if k else b""
        try:
            fd = os.open(".", _DIR_FLAGS, dir_fd=anchor)
        except OSError as e:
            raise SourceError(_why(e)) from e
        try:
            for part in parts[start:]:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError as e:
            os.close(fd)
            raise SourceError(_why(e)) from e
        except BaseException:
            os.close(fd)
            raise
        if fds is not None and start < len(parts):
            # Only ever used as a dir_fd (or reopened), never read: a dup is fine.
            fds[b"/".join(parts)] = os.dup(fd)
            if len(fds) > WALK_CACHE:
                os.close(fds.popitem(last=False)[1])
        return fd

    def _cached(self, parts: list[bytes]) -> int | None:
        """This thread's cached fd of the directory at `parts` (see cached_walks),
        or None; the root's own fd for no parts."""
        if not parts:
            return self.root_fd
        fds: OrderedDict[bytes, int] | None = getattr(self._local, "fds", None)
        if not fds:
            return None
        for part in parts:
            if part in (b"", b".", b"..") or b"/" in part:
                raise SourceError(f"bad path component {part!r}")
        key = b"/".join(parts)
        fd = fds.get(key)
        if fd is not None:
            fds.move_to_end(key)
        return fd

    def listdir(self, rel: bytes) -> Iterator[Entry]:
        """The entries of directory `rel`, lstat'ed; entries that vanish are skipped, and
        so (logged) are entries that cannot be lstat'ed. A directory on another
        filesystem lists as empty. SourceError if the directory cannot be listed."""
        fd = self.walk_to(split(rel))
        try:
            if self.other_fs(os.fstat(fd)):
                return
            try:
                names = os.listdir(fd)
            except OSError as e:
                raise SourceError(_why(e)) from e
            for n in names:
                name = os.fsencode(n)
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else b""
                except FileNotFoundError:
                    continue
                except OSError as e:
                    log.warning("skipping %r in Phase 3: %s", join(rel, name), _why(e))
                    continue
                yield Entry(name, st, os.fsencode(target))
        finally:
            os.close(fd)

    def open_file(self, rel: bytes) -> int:
        """A read fd of the regular file `rel`; SourceError if it is anything else."""
        parts = split(rel)
        if not parts:
            raise SourceError("not a regular file")
        # Inside `cached_walks` the parent's cached fd serves as it is: it is only
        # a dir_fd here, never read, so the reopen walk_to makes is not needed
        # (a batch of sibling files is then one open each).
        cached = self._cached(parts[:-1])
        dfd = cached if cached is not None else self.walk_to(parts[:-1])
        try:
            try:
                # Reading the rollback point should not even change its atimes.
                fd = os.open(parts[-1], _FILE_FLAGS | os.O_NOATIME, dir_fd=dfd)
            except PermissionError:  # O_NOATIME needs the file's owner (or root)
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
        except OSError as e:
            raise SourceError(_why(e)) from e
        finally:
            if cached is None:
                os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SourceError("not a regular file")
        return fd

    def lstat(self, rel: bytes) -> os.stat_result:
        parts = split(rel)
        if not parts:
            return os.fstat(self.root_fd)
        dfd = self.walk_to(parts[:-1])
        try:
            return os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise NotFound(os.fsdecode(rel)) from None
        except OSError as e:
            raise SourceError(_why(e)) from e
        finally:
            os.close(dfd)


def drift(want: Legacy, st: os.stat_result) -> str:
    """How the Phase 3 file `st` differs from the stat its entry was imported with
    ('' if it does not): a file replaced, rewritten or touched since."""
    if (st.st_ino, st.st_dev) != (want.st_ino, want.st_dev):
        return "replaced in Phase 3 since the mount imported it"
    if st.st_size != want.size:
        return (
            f"changed in Phase 3 since the mount imported it "
            f"(size {want.size} -> {st.st_size} bytes)"
        )
    if (st.st_mtime_ns, st.st_ctime_ns) != (want.mtime_ns, want.ctime_ns):
        return "changed in Phase 3 since the mount imported it (mtime or ctime)"
    return ""


class Phase3File:
    """A read fd of a Phase 3 file and the stat its entry was imported with. Each
    read checks the file still has that stat before and after it (fstat of the same
    fd), so a change before or during the read is an error, never a mix of bytes."""

    def __init__(self, fd: int, want: Legacy) -> None:
        self.fd = fd
        self.want = want

    def check(self) -> None:
        why = drift(self.want, os.fstat(self.fd))
        if why:
            raise SourceError(why)

    def pread(self, n: int, off: int) -> bytes:
        self.check()
        try:
            data = os.pread(self.fd, n, off)
        except OSError as e:
            raise SourceError(_why(e)) from e
        self.check()
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def split(rel: bytes) -> list[bytes]:
    return [p for p in rel.split(b"/") if p] if rel else []


def _why(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "is a symlink (not followed)"
    if e.errno == errno.ENOENT:
        return "vanished"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "unreadable"
    return os.strerror(e.errno or errno.EIO).lower()


def hash_fd(fd: int) -> tuple[bytes, int]:
    """(blake3, bytes read) of what `fd` reads from its current position to the end."""
    h = blake3.blake3()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    n = 0
    while got := os.readv(fd, [buf]):
        h.update(view[:got])
        n += got
    return h.digest(), n


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name

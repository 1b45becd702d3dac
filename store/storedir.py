"""The store directory: where a store may live, who may use it, and how anything
in it is opened.

Everything ferryfs keeps about a store sits in one directory (`SRC.ferry` by
default): `db/` (LMDB's data.mdb and lock.mdb), `daemon.log` (+ `.1`),
`fsck.cursor` and `index/` (the search index, index.py). It holds the
plaintext of small files, so:

- it is private: 0700 directories and 0600 files whatever the umask; an older
  store with looser modes is tightened when opened (and a warning logged);
- it is refused (exit 8, one line) when it, `db/` or a file in it is owned by
  someone other than this user or root, is writable by group or others, or is
  not what it should be (a symbolic link, a FIFO where a file should be);
- it is opened once (the directory fds are checked once) and every file in it is
  opened relative to those fds with O_NOFOLLOW, so nothing renamed or linked in
  afterwards redirects a write; LMDB itself opens `db/` through /proc/self/fd;
- it is created only where nothing is (the path is absent, or an empty directory
  of ours): a directory holding other things but no `db/data.mdb` is an error,
  never an invitation to start a new, empty store over a lost one. A new store
  is built under a temporary name and renamed into place, so a store directory
  always has its database.

The writer lock is a `flock` on data.mdb itself (not on a separate lock file that
could be deleted from under a live daemon, nor LMDB's lock.mdb, which LMDB
re-creates): every writer of the same database file contends for the same lock,
whatever was renamed or removed around it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import BinaryIO

from .errors import StoreLocked, StoreMissing, StoreUnusable

log = logging.getLogger("ferryfs.store")

DIR_MODE = 0o700
FILE_MODE = 0o600
DB = "db"
DATA = "data.mdb"
LMDB_LOCK = "lock.mdb"
LOG = "daemon.log"
INDEX = "index"  # the search index's directory (index.py): its files are tightened too
# Left in every store directory made, so one whose db/ was moved away is never empty,
# and so never mistaken for an empty directory to make a new store in.
MARK = "ferryfs-store"
MARK_TEXT = b"This directory is a ferryfs store; its database is db/data.mdb.\n"
LOG_MAX = 4 << 20  # bytes of daemon.log before it is rotated to daemon.log.1
_NEW = ".new-store."  # prefix of a store being built beside its final path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _mine(st: os.stat_result) -> bool:
    return st.st_uid in (os.geteuid(), 0)


class StoreDir:
    """An open, checked store directory: fds of it and of its `db/`."""

    def __init__(self, path: str, fd: int, db_fd: int) -> None:
        self.path = path
        self.fd = fd
        self.db_fd = db_fd
        self._lock_fd: int | None = None

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, create: bool = False) -> StoreDir:
        """Open and check the store at `path`; with `create`, make it if nothing is there.

        StoreMissing when it is not a store, StoreUnusable when it may not or cannot
        be used (both exit 8)."""
        path = os.path.abspath(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise StoreMissing(f"{path} is not a ferryfs store (it does not exist)") from None
            return cls._create(path)
        except OSError as e:
            raise _unusable(path, e) from None
        fd = _open_top(path, st)
        try:
            _check(path, os.fstat(fd), is_dir=True)
            try:
                db_fd = os.open(DB, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not (create and _empty(fd)):
                    raise StoreMissing(
                        f"{path} is not a ferryfs store, or its database was moved away "
                        f"(no {DB}/{DATA}): restore it, or give a new store path"
                    ) from None
                db_fd = -1  # an empty directory of ours: the store is made in it
            except OSError as e:
                raise _unusable(os.path.join(path, DB), e) from None
        except BaseException:
            os.close(fd)
            raise
        if db_fd < 0:
            return cls._create(path, into=fd)
        sd = cls(path, fd, db_fd)
        try:
            sd._check_db()
        except BaseException:
            sd.close()
            raise
        return sd

    @classmethod
    def _create(cls, path: str, into: int | None = None) -> StoreDir:
        """Build a store at `path` (absent, or the empty directory open as `into`)."""
        parent, name = os.path.split(path)
        try:
            if into is None:
                os.makedirs(parent, exist_ok=True)
                pfd = os.open(parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
                where, tmp = pfd, f"{_NEW}{name}.{os.getpid()}"
            else:
                pfd, where, tmp = -1, into, f"{_NEW}{os.getpid()}"
            try:
                os.mkdir(tmp, DIR_MODE, dir_fd=where)
                tfd = os.open(tmp, _DIR_FLAGS, dir_fd=where)
                try:
                    os.fchmod(tfd, DIR_MODE)  # the umask may have narrowed it: exactly 0700
                    if into is None:
                        os.mkdir(DB, DIR_MODE, dir_fd=tfd)
                        dbfd = os.open(DB, _DIR_FLAGS, dir_fd=tfd)
                    else:
                        dbfd = tfd
                    try:
                        os.fchmod(dbfd, DIR_MODE)
                        _init_database(dbfd)
                    finally:
                        if dbfd != tfd:
                            os.close(dbfd)
                    if into is None:
                        _write_mark(tfd)
                finally:
                    os.close(tfd)
                if into is None:
                    # rename() would replace an empty directory made meanwhile at `path`
                    # and fails on anything else: a store appears whole or not at all.
                    os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
                else:
                    os.rename(tmp, DB, src_dir_fd=into, dst_dir_fd=into)
                    _write_mark(into)
                    os.fchmod(into, DIR_MODE)
            except BaseException:
                _remove_tree(where, tmp)
                raise
            finally:
                if pfd >= 0:
                    os.close(pfd)
        except OSError as e:
            raise StoreUnusable(f"cannot create store {path}: {e.strerror or e}") from None
        finally:
            if into is not None:
                os.close(into)
        return cls.open(path)

    def _check_db(self) -> None:
        _check(os.path.join(self.path, DB), os.fstat(self.db_fd), is_dir=True)
        loose = False
        for name in (DATA, LMDB_LOCK):
            try:
                st = os.lstat(name, dir_fd=self.db_fd)
            except FileNotFoundError:
                if name == DATA:
                    raise StoreMissing(
                        f"{self.path} is not a ferryfs store, or its database was moved away "
                        f"(no {DB}/{DATA}): restore it, or give a new store path"
                    ) from None
                continue
            where = os.path.join(self.path, DB, name)
            if not stat.S_ISREG(st.st_mode):
                raise StoreUnusable(f"{where} is not a regular file: refused")
            loose |= _check(where, st, is_dir=False, chmod=partial(self._chmod_db, name))
        # Tightened last: a directory found not to be a store is left as it was.
        for name in os.listdir(self.fd):  # daemon.log, fsck.cursor... of an older ferryfs
            st = os.lstat(name, dir_fd=self.fd)
            if stat.S_ISREG(st.st_mode):
                chmod = partial(os.chmod, name, dir_fd=self.fd)
                loose |= _tighten(os.path.join(self.path, name), st, chmod)
            elif stat.S_ISDIR(st.st_mode) and name == INDEX:
                loose |= self._tighten_dir(name)
        loose |= _tighten(self.path, os.fstat(self.fd), partial(os.fchmod, self.fd))
        db = os.path.join(self.path, DB)
        loose |= _tighten(db, os.fstat(self.db_fd), partial(os.fchmod, self.db_fd))
        if loose:
            log.warning("store %s was readable by others: made private (0700/0600)", self.path)

    def _tighten_dir(self, name: str) -> bool:
        """`_tighten` a directory of the store and the files in it (opened by fd,
        never following a link)."""
        where = os.path.join(self.path, name)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError:
            return False  # a link or gone: the index is rebuilt if it cannot be used
        try:
            loose = _tighten(where, os.fstat(fd), partial(os.fchmod, fd))
            for n in os.listdir(fd):
                try:
                    st = os.lstat(n, dir_fd=fd)
                except FileNotFoundError:
                    continue  # merged away by a live daemon's index writer
                if stat.S_ISREG(st.st_mode):
                    chmod = partial(os.chmod, n, dir_fd=fd)
                    loose |= _tighten(os.path.join(where, n), st, chmod)
            return loose
        finally:
            os.close(fd)

    def _chmod_db(self, name: str, mode: int) -> None:
        # By name, not through an fd: opening and closing lock.mdb would drop the
        # fcntl locks LMDB holds on it. The directory is private and checked.
        os.chmod(name, mode, dir_fd=self.db_fd)

    @property
    def db_path(self) -> str:
        """A path LMDB opens `db/` by: the checked directory fd, not the name again."""
        return f"/proc/self/fd/{self.db_fd}"

    def close(self) -> None:
        self.unlock()
        for fd in (self.db_fd, self.fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd = self.db_fd = -1

    def __enter__(self) -> StoreDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer lock --------------------------------------------------------------

    def lock(self, busy: str | None = None) -> None:
        """Take the one-writer lock (flock on data.mdb), or raise StoreLocked (exit 8)
        with `busy` or the usual message."""
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(DATA, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.db_fd)
        except OSError as e:
            raise _unusable(os.path.join(self.path, DB, DATA), e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                busy
                or f"store {self.path} is in use by another ferryfs process (a mount or a "
                "migrate); stop it first"
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    # -- files in the store directory ------------------------------------------------

    def open_file(self, name: str, flags: int) -> int:
        """Open `name` in the store directory: no symbolic link followed, no FIFO
        waited on, created 0600, refused unless a regular file of ours. An fd."""
        where = os.path.join(self.path, name)
        try:
            how = flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(name, how, FILE_MODE, dir_fd=self.fd)
        except OSError as e:
            raise _unusable(where, e) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreUnusable(f"{where} is not a regular file: refused")
            if _check(where, st, is_dir=False, chmod=partial(os.fchmod, fd)):
                log.warning("%s was readable by others: made private (0600)", where)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_file(self, name: str) -> bytes | None:
        """The bytes of `name`, or None if there is none."""
        try:
            fd = self.open_file(name, os.O_RDONLY)
        except (StoreUnusable, StoreMissing):
            if not self.exists(name):
                return None
            raise
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def write_file(self, name: str, data: bytes) -> None:
        """Replace `name` with `data` (a temporary file renamed over it)."""
        tmp = name + ".tmp"
        self.unlink(tmp)
        fd = self.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def exists(self, name: str) -> bool:
        try:
            os.lstat(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    # -- the daemon's log ------------------------------------------------------------

    def rotate_stderr(self, max_bytes: int = LOG_MAX) -> LogRotation | None:
        """If this process's stderr is STORE/daemon.log (the daemon `ferryfs mount`
        starts), keep it under `max_bytes` from now on; None otherwise."""
        try:
            err, cur = os.fstat(2), os.stat(LOG, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return None
        if (err.st_dev, err.st_ino) != (cur.st_dev, cur.st_ino):
            return None
        return LogRotation(self, max_bytes)


class LogRotation(logging.Filter):
    """Keeps the daemon's stderr (daemon.log, which libfuse writes to as well as the
    log records) under a size: past it, daemon.log becomes daemon.log.1 and a new
    daemon.log takes fd 2 (and fd 1, when it was daemon.log too). Checked before each
    log record and every `PERIOD` seconds, so the two files stay within about
    2 x max_bytes."""

    PERIOD = 10.0

    def __init__(self, sd: StoreDir, max_bytes: int) -> None:
        super().__init__()
        self.sd = sd
        self.max_bytes = max_bytes
        self._lock = threading.RLock()  # a warning logged while rotating comes back here
        # stdout moves with stderr only when it is the same file (as the daemon has it)
        self._fds = (1, 2) if _same(1, 2) else (2,)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._every, name="log-rotation", daemon=True)
        self._thread.start()

    def filter(self, record: logging.LogRecord) -> bool:
        self.check()
        return True

    def check(self) -> None:
        try:
            if os.fstat(2).st_size <= self.max_bytes:
                return
        except OSError:
            return
        with self._lock:
            if self.sd.fd < 0 or os.fstat(2).st_size <= self.max_bytes:
                return
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            try:
                os.replace(LOG, LOG + ".1", src_dir_fd=self.sd.fd, dst_dir_fd=self.sd.fd)
                fd = self.sd.open_file(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            except (OSError, StoreUnusable):
                return  # keep writing where we were rather than lose the log
            for std in self._fds:
                os.dup2(fd, std)
            os.close(fd)

    def _every(self) -> None:
        while not self._stop.wait(self.PERIOD):
            self.check()

    def stop(self) -> None:
        self._stop.set()


def _empty(fd: int) -> bool:
    """Nothing in the directory but what an interrupted creation left (removed)."""
    names = os.listdir(fd)
    if any(not n.startswith(_NEW) for n in names):
        return False
    for n in names:
        _remove_tree(fd, n)
    return True


def _remove_tree(dirfd: int, name: str) -> None:
    """Remove `name` and what is in it, never following a link."""
    with contextlib.suppress(OSError):
        try:
            sub = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
        except NotADirectoryError:
            os.unlink(name, dir_fd=dirfd)
            return
        except OSError:  # a symbolic link (ELOOP) or gone
            os.unlink(name, dir_fd=dirfd)
            return
        try:
            for n in os.listdir(sub):
                _remove_tree(sub, n)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dirfd)


def _same(fd1: int, fd2: int) -> bool:
    try:
        a, b = os.fstat(fd1), os.fstat(fd2)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _open_top(path: str, st: os.stat_result) -> int:
    """The store directory's fd. A symbolic link to it is followed only if it is ours
    (or root's): one planted in a shared directory by someone else is refused."""
    if stat.S_ISLNK(st.st_mode):
        if not _mine(st):
            raise StoreUnusable(f"store {path} is a symbolic link of uid {st.st_uid}: refused")
        flags = _DIR_FLAGS & ~os.O_NOFOLLOW
    else:
        flags = _DIR_FLAGS
    try:
        return os.open(path, flags)
    except NotADirectoryError:
        raise StoreMissing(f"{path} is not a ferryfs store (not a directory)") from None
    except OSError as e:
        raise _unusable(path, e) from None


def _check(
    where: str, st: os.stat_result, is_dir: bool, chmod: Callable[[int], None] | None = None
) -> bool:
    """Refuse what someone else owns or may write; tighten (via `chmod`) what others
    may read, True if it did."""
    if is_dir and not stat.S_ISDIR(st.st_mode):
        raise StoreMissing(f"{where} is not a directory")
    if not _mine(st):
        raise StoreUnusable(
            f"{where} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}) "
            "or root: refused"
        )
    if st.st_mode & 0o022:
        raise StoreUnusable(
            f"{where} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): refused; "
            "check what is in it, then chmod go-w"
        )
    return chmod is not None and _tighten(where, st, chmod)


def _tighten(where: str, st: os.stat_result, chmod: Callable[[int], None]) -> bool:
    """Take group and others' bits off what we own (a store made by an older ferryfs,
    or under a loose umask). True if it was loose and is now private."""
    if not (st.st_mode & 0o077 and st.st_uid == os.geteuid()):
        return False
    try:
        chmod(stat.S_IMODE(st.st_mode) & 0o700)
    except OSError as e:
        log.warning("%s is readable by others and could not be made private: %s", where, e)
        return False
    return True


def _unusable(where: str, e: OSError) -> StoreUnusable | StoreMissing:
    if e.errno == errno.ELOOP:
        return StoreUnusable(f"{where} is a symbolic link: refused")
    if e.errno == errno.ENOENT:
        return StoreMissing(f"{where} does not exist: not a ferryfs store")
    return StoreUnusable(f"cannot use {where}: {e.strerror or e}")


def _write_mark(dirfd: int) -> None:
    fd = os.open(
        MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE, dir_fd=dirfd
    )
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, MARK_TEXT)
    finally:
        os.close(fd)


def _init_database(dbfd: int) -> None:
    """An empty LMDB environment in the directory `dbfd`, its files 0600."""
    from .kv import create_environment  # lmdb: only when a store is made

    create_environment(f"/proc/self/fd/{dbfd}")
    for name in (DATA, LMDB_LOCK):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(name, FILE_MODE, dir_fd=dbfd)


def fsync_dir(path: str) -> None:
    """Make a rename or a new name in directory `path` durable."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def opened(path: str, create: bool = False) -> Iterator[StoreDir]:
    sd = StoreDir.open(path, create)
    try:
        yield sd
    finally:
        sd.close()


def open_log(log_path: str) -> BinaryIO:
    """A daemon's log file for appending: opened without following a link, created
    0600, refused unless a regular file of ours that others cannot write, and moved
    to NAME.1 first when over LOG_MAX. For STORE/daemon.log (and the read-only
    mount's log beside it)."""
    parent, name = os.path.split(os.path.abspath(log_path))
    try:
        dfd = os.open(parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError as e:
        raise _unusable(parent, e) from None
    try:
        _check(parent, os.fstat(dfd), is_dir=True)
        sd = StoreDir(parent, dfd, -1)
        fd = sd.open_file(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        if os.fstat(fd).st_size > LOG_MAX:
            os.close(fd)
            os.replace(name, name + ".1", src_dir_fd=dfd, dst_dir_fd=dfd)
            fd = sd.open_file(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    finally:
        os.close(dfd)
    return os.fdopen(fd, "ab")

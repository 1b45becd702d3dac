"""The read-only Phase 3 mounts that `ferryfs rollback` left, so `ferryfs umount` knows them.

One line per mount (mountpoint, source, store; tab-separated) in a file
`rollbacks` kept where only its owner can write: /run/ferryfs as root;
otherwise ferryfs/ in $XDG_RUNTIME_DIR, or .local/state/ferryfs/ in $HOME or
the passwd home, the first of them that is the caller's own and writable by
no one else (never a shared place such as /tmp, where another user could
plant the directory, or a symlink in it, first).

The directory is made 0700 and checked on its fd (a directory, not a link,
owned by the caller, writable by no one else); the file is read and written
through that fd with O_NOFOLLOW, and replaced atomically (a new file, fsync,
then a rename).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import stat

from ferryfs.store.errors import UsageError

NAME = "rollbacks"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RecordUnsafe(UsageError):
    """The record's directory is not private to the caller (exit 2)."""


def _private(st: os.stat_result) -> bool:
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def place() -> str | None:
    """The directory that holds the caller's record (made by `open_dir`), or None
    if the caller has no private base for it."""
    if os.geteuid() == 0:
        return "/run/ferryfs"
    home = pwd.getpwuid(os.geteuid()).pw_dir
    # XDG_RUNTIME_DIR and HOME may be another user's after su or runuser:
    # each is used only when it is the caller's own and no one else writes to it.
    for base, sub in (
        (os.environ.get("XDG_RUNTIME_DIR"), "ferryfs"),
        (os.environ.get("HOME"), ".local/state/ferryfs"),
        (home, ".local/state/ferryfs"),
    ):
        if base and os.path.isabs(base):
            try:
                if _private(os.lstat(base)):
                    return os.path.join(base, sub)
            except OSError:
                continue
    return None


def open_dir(create: bool = True) -> int | None:
    """An fd of the record's directory, made 0700 if missing (None if missing and
    not `create`); RecordUnsafe if it is not a private directory of the caller's."""
    path = place()
    if path is None:
        if not create:
            return None
        raise RecordUnsafe(
            "no private directory for the rollback record (XDG_RUNTIME_DIR and HOME "
            "are not yours): set XDG_RUNTIME_DIR to a directory only you can write"
        )
    if create:
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise RecordUnsafe(
                f"cannot make {path} for the rollback record: {e.strerror}"
            ) from None
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        if create:
            raise RecordUnsafe(f"{path} vanished while being made") from None
        return None
    except OSError as e:
        raise RecordUnsafe(
            f"{path} (for the rollback record) is not a directory of yours: remove it"
        ) from e
    st = os.fstat(fd)
    if not _private(st):
        os.close(fd)
        raise RecordUnsafe(
            f"{path} (for the rollback record) belongs to uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):04o}, writable by others than uid {os.geteuid()}: "
            "remove it"
        )
    return fd


def _read(dfd: int | None) -> list[list[str]]:
    if dfd is None:
        return []
    try:
        fd = os.open(NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return []
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RecordUnsafe(f"{place()}/{NAME} is a symlink: remove it") from None
        raise
    with os.fdopen(fd, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def _write(dfd: int, rows: list[list[str]]) -> None:
    tmp = f"{NAME}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dfd)  # ours from a crash: the directory is private
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
    )
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines("\t".join(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, NAME, src_dir_fd=dfd, dst_dir_fd=dfd)


def record(mnt: str, src: str, store: str) -> None:
    dfd = open_dir()
    assert dfd is not None
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)  # two rollbacks at once must not lose a row
        _write(dfd, [r for r in _read(dfd) if r[0] != mnt] + [[mnt, src, store]])
    finally:
        os.close(dfd)


def lookup(mnt: str) -> list[str] | None:
    dfd = open_dir(create=False)
    try:
        return next((r for r in _read(dfd) if r[0] == mnt), None)
    finally:
        if dfd is not None:
            os.close(dfd)


def forget(mnt: str) -> None:
    dfd = open_dir(create=False)
    if dfd is None:
        return
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        rows = _read(dfd)
        if any(r[0] == mnt for r in rows):
            _write(dfd, [r for r in rows if r[0] != mnt])
    finally:
        os.close(dfd)


def check() -> None:
    """Make sure a record can be kept, before a rollback changes anything."""
    dfd = open_dir()
    if dfd is not None:
        try:
            _read(dfd)
        finally:
            os.close(dfd)

"""Every error the store raises, each with the errno a filesystem call maps it
to and, for the ones a user sees, the exit code a command exits with.

The FUSE adapter turns `OpError` into `FUSEError(e.errno)` in one place; the
CLI prints `str(e)` of a `FerryError` on one line and exits with `e.exit_code`.
"""

from __future__ import annotations

import errno as _errno


class FerryError(Exception):
    """An error a user may see: one line saying what is wrong and what to do."""

    exit_code: int = 1
    errno: int = _errno.EIO


class OpError(FerryError):
    """A filesystem operation that fails the POSIX way."""


class NotFound(OpError):
    errno = _errno.ENOENT


class Exists(OpError):
    errno = _errno.EEXIST


class NotEmpty(OpError):
    errno = _errno.ENOTEMPTY


class NotADir(OpError):
    errno = _errno.ENOTDIR


class IsADir(OpError):
    errno = _errno.EISDIR


class NameTooLong(OpError):
    errno = _errno.ENAMETOOLONG


class Invalid(OpError):
    errno = _errno.EINVAL


class NotPermitted(OpError):
    errno = _errno.EPERM


class NoSpace(OpError):
    errno = _errno.ENOSPC


class NoData(OpError):
    """A missing extended attribute."""

    errno = _errno.ENODATA


class TooManyLinks(OpError):
    errno = _errno.EMLINK


class ReadOnly(OpError):
    """The store is in failsafe mode or opened read-only."""

    errno = _errno.EROFS


class CorruptChunk(OpError):
    """A chunk whose bytes do not hash to its key: the read gets EIO, never the bytes."""

    errno = _errno.EIO

    def __init__(self, digest: bytes) -> None:
        super().__init__(f"chunk {digest.hex()[:16]} fails its hash")
        self.digest = digest


class SourceError(OpError):
    """A Phase 3 file could not be read safely (unreadable, vanished, changed, not regular)."""

    errno = _errno.EIO


class StoreLocked(FerryError):
    exit_code = 8


class SchemaMismatch(FerryError):
    exit_code = 8


class StoreMissing(FerryError):
    exit_code = 8


class StoreUnusable(FerryError):
    """A store path that may not or cannot be used: owned or writable by someone else,
    a symbolic link, not creatable, not readable."""

    exit_code = 8


class StoreDamaged(OpError):
    """The database itself is damaged (cut short, a page that is not what it should
    be): a read or write of it fails with EIO, a command with exit 8, fsck with 4."""

    errno = _errno.EIO
    exit_code = 8
    advice = "restore it from a backup, or move the store aside to start again from Phase 3"


class UsageError(FerryError):
    exit_code = 2


class PointRefused(FerryError):
    """A rollback-point action refused with nothing changed (no such point, files not
    yet migrated or verified, the Phase 3 tree out of reach)."""

    exit_code = 1


class CheckCannotRun(FerryError):
    """fsck or points verify cannot run at all (e2fsck's exit 8)."""

    exit_code = 8

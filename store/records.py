"""Byte layouts of the store's keys and values, and the Inode record.

Integers in keys are big-endian so LMDB's byte order is numeric order.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field
from hashlib import blake2b

# blake3-256's size, as chunker.DIGEST_SIZE (a test holds them equal): not
# imported from there, as the chunker's libraries (pyfastcdc, blake3) would
# then load with every reader of records, `ferryfs search` among them.
DIGEST_SIZE = 32

ROOT_INO = 1
# Version 2: a chunk record may lie in a pack (packs.py) or name a dictionary
# (dictionaries.py). Version 1 stores have only records alone and no dictionary;
# they read as they are, and opening one for writing marks it version 2 (their
# small records move into packs in idle time: no stop-the-world step).
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)

U64 = struct.Struct(">Q")

# Inode flags.
STORED = 1  # file: extents in the store (MIGRATED); dir: children imported (LISTED)
CHANGED = 2  # changed through the mount since the Phase 3 snapshot (or created there)

_INODE = struct.Struct(">BIIIIQqqqQQQ")


@dataclass
class Inode:
    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    flags: int = 0
    parent: int = 0  # directories only: the one directory holding this one
    version: int = 0  # bumped on every content change; guards prepared rewrites
    target: bytes = field(default=b"")  # symlinks only

    @property
    def stored(self) -> bool:
        return bool(self.flags & STORED)

    @property
    def changed(self) -> bool:
        return bool(self.flags & CHANGED)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_legacy(self) -> bool:
        """A regular file whose bytes are still only in Phase 3 (not MIGRATED)."""
        return self.is_reg and not self.stored

    @property
    def is_migrated(self) -> bool:
        """A regular file whose bytes are in the store."""
        return self.is_reg and self.stored

    @property
    def is_unlisted(self) -> bool:
        """A directory whose Phase 3 entries are not imported yet."""
        return self.is_dir and not self.stored

    @property
    def state(self) -> str:
        """`legacy`/`migrated` for files, `unlisted`/`listed` for directories."""
        if self.is_dir:
            return "listed" if self.stored else "unlisted"
        return "migrated" if self.stored or not self.is_reg else "legacy"

    def pack(self) -> bytes:
        return (
            _INODE.pack(
                self.flags,
                self.mode,
                self.uid,
                self.gid,
                self.nlink,
                self.size,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
                self.rdev,
                self.parent,
                self.version,
            )
            + self.target
        )

    @classmethod
    def unpack(cls, ino: int, buf: bytes | memoryview) -> Inode:
        f = _INODE.unpack_from(buf, 0)
        return cls(
            ino,
            f[1],
            f[2],
            f[3],
            f[4],
            f[5],
            f[6],
            f[7],
            f[8],
            f[9],
            f[0],
            f[10],
            f[11],
            bytes(buf[_INODE.size :]),
        )


def ino_key(ino: int) -> bytes:
    return U64.pack(ino)


def name_cookie(name: bytes) -> int:
    """A stable 63-bit, non-zero readdir cookie for `name` (the order of entries)."""
    h = int.from_bytes(blake2b(name, digest_size=8).digest(), "big") >> 1
    return h or 1


def dirent_key(parent: int, name: bytes) -> bytes:
    return U64.pack(parent) + U64.pack(name_cookie(name)) + name


def dirent_prefix(parent: int) -> bytes:
    return U64.pack(parent)


def extent_key(ino: int, off: int) -> bytes:
    return U64.pack(ino) + U64.pack(off)


HOLE = b"\0" * DIGEST_SIZE  # an extent of zeros that names no chunk


def extent_value(digest: bytes, length: int) -> bytes:
    return digest + U64.pack(length)


def unpack_extent(key: bytes, value: bytes | memoryview) -> tuple[int, bytes, int]:
    """(offset, digest, length) of an extents item."""
    return U64.unpack_from(key, 8)[0], bytes(value[:DIGEST_SIZE]), U64.unpack_from(value, 32)[0]


def xattr_key(ino: int, name: bytes) -> bytes:
    return U64.pack(ino) + name


# The Phase 3 origin of an imported inode, as snapshotted: where it lives in the
# tree (a path relative to its root, never leaving it) and its stat then.
_LEGACY = struct.Struct(">QqqQQB32s")


@dataclass
class Legacy:
    size: int
    mtime_ns: int
    ctime_ns: int
    st_ino: int
    st_dev: int
    hashed: bool
    blake3: bytes
    path: bytes

    def pack(self) -> bytes:
        return (
            _LEGACY.pack(
                self.size,
                self.mtime_ns,
                self.ctime_ns,
                self.st_ino,
                self.st_dev,
                int(self.hashed),
                self.blake3,
            )
            + self.path
        )

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Legacy:
        f = _LEGACY.unpack_from(buf, 0)
        return cls(f[0], f[1], f[2], f[3], f[4], bool(f[5]), f[6], bytes(buf[_LEGACY.size :]))

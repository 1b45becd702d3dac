"""A file's bytes through the store: reads (healing a corrupt chunk from Phase 3,
else failsafe), and writes and truncates as a plan under a read transaction
followed by a version-checked commit, replanned when the file moved meanwhile.
A LEGACY file is migrated first (migration.py). The extents themselves:
content.py."""

from __future__ import annotations

import time
from typing import Protocol

from . import cas, content, migration
from . import namespace as ns
from .errors import CorruptChunk, Invalid, IsADir, SourceError
from .kv import Txn
from .migration import Host
from .readahead import ReadAhead
from .records import CHANGED, STORED, Inode


class FileHost(Host, Protocol):
    readahead: ReadAhead


def read(s: FileHost, ino: int, off: int, n: int) -> bytes:
    """Bytes of a file; a LEGACY file is migrated first (a write)."""
    data = read_stored(s, ino, off, n)
    if data is None:
        migration.migrate(s, ino)
        data = read_stored(s, ino, off, n)
        if data is None:
            raise SourceError("not migrated")
    return bytes(data)


def read_stored(s: FileHost, ino: int, off: int, n: int) -> bytes | memoryview | None:
    """Bytes of a file in one read transaction, a view rather than a copy when
    they lie in one chunk (content.read_view); None if the file is LEGACY."""
    with s.backend.read() as txn:
        node = ns.get(txn, ino)
        if node.is_legacy:
            return None
        data = content.read_view(txn, ino, node.size, off, n, s.cache)
    s.readahead.note(ino, off, off + len(data), node.size)
    return data


def read_or_heal(s: FileHost, ino: int, off: int, n: int) -> tuple[bytes | memoryview | None, bool]:
    """`read_stored`, and whether a corrupt chunk was healed from Phase 3 first (a
    write). A chunk that cannot be healed sets failsafe (writes refused until fsck
    has looked at the store), then its CorruptChunk is raised: never wrong bytes."""
    try:
        return read_stored(s, ino, off, n), False
    except CorruptChunk as e:
        if not migration.heal(s, ino, e.digest):
            s.failsafe = (
                f"chunk {e.digest.hex()[:16]} of inode {ino} is corrupt and cannot be healed"
            )
            raise
    return read_stored(s, ino, off, n), True


def data_ranges(s: Host, ino: int) -> list[tuple[int, int, bool]]:
    """(offset, length, is_hole) runs tiling a MIGRATED file, from one snapshot:
    a copy writes the data runs and seeks over the holes (see content.data_ranges).
    Invalid for anything else (a LEGACY file's bytes are in Phase 3)."""
    with s.backend.read() as txn:
        node = ns.get(txn, ino)
        if not node.is_migrated:
            raise Invalid("not a migrated regular file")
        return content.data_ranges(txn, ino, node.size)


def plan_write(s: Host, ino: int, spans: list[tuple[int, bytes]]) -> content.Rewrite:
    """Chunk, hash and compress a write (read transactions only)."""
    with s.backend.read() as txn:
        node = ns.get(txn, ino)
        if node.is_dir:
            raise IsADir("is a directory")
        if not node.stored:
            raise Invalid("migrate the file before writing")
        return content.plan_write(
            txn, ino, node.version, node.size, spans, s.chunker, s.cache, s.dictionary
        )


def commit(s: Host, rw: content.Rewrite, mtime: bool = True) -> Inode | None:
    """Apply a planned rewrite; None if the file changed since it was planned."""
    t = time.time_ns()

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
        return s.transact(op)
    except cas.MissingChunk:
        return None


def write_spans(s: Host, ino: int, spans: list[tuple[int, bytes]]) -> Inode:
    """Write sorted, disjoint spans into a file in one transaction."""
    with s.backend.read() as txn:
        node = ns.get(txn, ino)
    if not spans:
        return node
    if node.is_legacy:
        migration.migrate(s, ino)
    while True:
        done = commit(s, plan_write(s, ino, spans))
        if done is not None:
            return done


def truncate(s: Host, ino: int, size: int) -> Inode:
    if size < 0:
        raise Invalid("negative size")
    with s.backend.read() as txn:
        node = ns.get(txn, ino)
    if node.is_dir:
        raise IsADir("is a directory")
    if not node.is_reg:
        raise Invalid("not a regular file")
    if not node.stored:
        if size == 0:
            node = s.transact(lambda txn: _drop_legacy_content(txn, ino, time.time_ns()))
            if not node.size:
                return node
        else:
            migration.migrate(s, ino)
    while True:
        with s.backend.read() as txn:
            node = ns.get(txn, ino)
            rw = content.plan_truncate(txn, ino, node.version, node.size, size, s.cache)
        done = commit(s, rw)
        if done is not None:
            return done


def _drop_legacy_content(txn: Txn, ino: int, t: int) -> Inode:
    """Truncating a LEGACY file to 0: it becomes an empty MIGRATED file, no read of
    Phase 3 needed (if it was migrated meanwhile, the caller truncates that)."""
    node = ns.get(txn, ino)
    if not node.stored:
        node.flags |= STORED | CHANGED
        node.size = 0
        node.version += 1
        node.mtime_ns = node.ctime_ns = t
        ns.put(txn, node)
    return node

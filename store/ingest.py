"""Migrating one Phase 3 file: read it safely, chunk, hash and compress it
(no lock held), then commit its extents in one transaction.

A file larger than what we keep in memory stages its new chunks in earlier
transactions, each chunk also listed in `pending` so that a crash before the
final commit leaves nothing but chunks the next writer frees on open.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from . import cas, codec, phase3
from .chunker import Chunker, digest
from .errors import SourceError
from .kv import Txn
from .phase3 import Phase3Tree
from .records import Legacy

# Compressed bytes of new chunks held before they are staged into the store.
STAGE_BYTES = 32 << 20
READ_BLOCK = 4 << 20


class Preempted(Exception):
    """A background migration gave way to foreground work; nothing was committed."""


@dataclass
class Migration:
    ino: int
    base_version: int
    size: int
    mtime_ns: int
    ctime_ns: int
    legacy: Legacy
    extents: list[tuple[int, bytes, int]] = field(default_factory=list)
    records: dict[bytes, bytes] = field(default_factory=dict)
    staged: list[bytes] = field(default_factory=list)
    logical_new: int = 0  # plain bytes of chunks new to the store


def prepare(
    tree: Phase3Tree,
    ino: int,
    version: int,
    legacy: Legacy,
    chunker: Chunker,
    has_chunk: Callable[[bytes], bool],
    stage: Callable[[dict[bytes, bytes]], None],
    level: int = 3,
    stop: Callable[[], bool] | None = None,
) -> Migration:
    """Read and chunk the Phase 3 file behind `legacy`; SourceError if it cannot be
    read safely or changes while being read."""
    fd = tree.open_file(legacy.path)
    try:
        before = os.fstat(fd)
        drift = phase3.drift(legacy, before)
        if drift:
            # The mount shows the entry it imported; migrating what is there now
            # would quietly take other content under that entry's stat.
            raise SourceError(drift)
        m = Migration(ino, version, 0, before.st_mtime_ns, before.st_ctime_ns, legacy)
        whole = blake3.blake3()
        held = 0
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            for piece in chunker.stream(f):
                if stop is not None and stop():
                    raise Preempted()
                d = digest(piece)
                whole.update(piece)
                n = len(piece)
                if d not in m.records and not has_chunk(d):
                    rec = codec.encode(piece, level)
                    m.records[d] = rec
                    held += len(rec)
                    m.logical_new += n
                m.extents.append((m.size, d, n))
                m.size += n
                if held > STAGE_BYTES:
                    stage(m.records)
                    m.staged.extend(m.records)
                    m.records = {}
                    held = 0
        after = os.fstat(fd)
    except OSError as e:
        raise SourceError(os.strerror(e.errno or 5).lower()) from e
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
        before.st_size,
        before.st_mtime_ns,
        before.st_ctime_ns,
    ) or m.size != after.st_size:
        raise SourceError("changed while being read")
    legacy.size, legacy.mtime_ns, legacy.ctime_ns = m.size, m.mtime_ns, m.ctime_ns
    legacy.hashed, legacy.blake3 = True, whole.digest()
    return m


def commit_extents(txn: Txn, m: Migration) -> None:
    """Put the extents and references of a prepared migration (the caller checks state)."""
    from .records import extent_key, extent_value

    for off, d, n in m.extents:
        cas.add_ref(txn, d, m.records.get(d))
        txn.put("extents", extent_key(m.ino, off), extent_value(d, n))
    for d in m.staged:
        txn.delete("pending", d)


def stage_records(txn: Txn, records: dict[bytes, bytes]) -> None:
    for d, rec in records.items():
        if txn.get("chunks", d) is None:
            txn.put("chunks", d, rec)
        txn.put("pending", d, b"")


def free_pending(txn: Txn) -> int:
    """Free staged chunks no file came to reference (after a crash). Returns the count."""
    freed = 0
    for d, _ in list(txn.range("pending", b"")):
        txn.delete("pending", d)
        if txn.get("refs", d) is None and txn.delete("chunks", d):
            freed += 1
    return freed


def unstage(txn: Txn, m: Migration) -> None:
    """A prepared migration that will not commit: free the chunks it staged that
    nothing references (free_pending would, at the next open)."""
    for d in m.staged:
        txn.delete("pending", d)
        if txn.get("refs", d) is None:
            txn.delete("chunks", d)

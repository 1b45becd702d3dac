"""Migrating Phase 3 files into the store, healing chunks from Phase 3, the errors
that say why a file is not migrated, and the walks over the imported tree.

Preparing a migration is pure computation: it reads the Phase 3 file safely,
chunks, hashes and compresses it, and opens no write transaction (so it may run
on any thread, at any priority). Committing it is one write transaction that
checks the file is still the LEGACY version prepared (its inode's `version`),
writes the new chunk records and the extents, and marks it MIGRATED.

A file whose new chunks are more than `STAGE_BYTES` (compressed) is not held
whole in memory: `prepare` hands each such group to its caller's `spill`, which
must write it with `stage_chunks` (a write transaction: on the writer's thread)
before returning. A staged chunk is also listed in `pending`, so a crash before
the commit leaves only chunks that the next writer's open frees (`free_pending`)
and that fsck does not count as orphans; a migration dropped at commit frees its
staged chunks at once (`unstage`).

The functions take the store (`Host`: what of `Store` they use) as first
argument; `Store` delegates to them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import blake3

from . import cas, codec, content, phase3
from . import namespace as ns
from .chunker import Chunker, digest
from .dictionaries import Dictionary
from .errors import FerryError, NotFound, OpError, SourceError
from .file_errors import record_error
from .kv import Backend, Txn
from .phase3 import Phase3File, Phase3Tree
from .records import (
    HOLE,
    ROOT_INO,
    STORED,
    Inode,
    Legacy,
    extent_key,
    extent_value,
    ino_key,
)

T = TypeVar("T")

# Compressed bytes of new chunks a preparation holds before it spills them.
STAGE_BYTES = 32 << 20
# Entries of UNLISTED subdirectories listed along with a directory a lookup or a
# readdir needs: ~20 ms of lstat and one commit, instead of a commit per directory.
LIST_AHEAD = 1024
# ... and for at most this long: a chain of directories 1,024 deep has one entry
# each, and listing all of them at once held the thread answering every request
# for a third of a second.
LIST_AHEAD_SECONDS = 0.02

Spill = Callable[[dict[bytes, bytes]], None]


class Host(Protocol):
    backend: Backend
    tree: Phase3Tree | None
    chunker: Chunker
    cache: cas.ChunkCache
    dictionary: Dictionary | None  # for new text chunks (dictionaries.py)
    readonly: bool
    failsafe: str | None

    def transact(self, fn: Callable[[Txn], T]) -> T: ...


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
    records: dict[bytes, bytes] = field(default_factory=dict)  # new chunks, not written
    staged: list[bytes] = field(default_factory=list)  # new chunks spilled (pending)


# -- preparing and committing -------------------------------------------------------------


def prepare_migration(
    s: Host, ino: int, stop: Callable[[], bool] | None = None, spill: Spill | None = None
) -> Migration | None:
    """Read and chunk a LEGACY file (read transactions only); None if it is not
    LEGACY. `stop` is polled between chunks; when it says so, Preempted is raised.
    `spill`: see the module's docstring; without it every new chunk stays in the
    Migration until `commit_migrations` writes it."""
    with s.backend.read() as txn:
        node = ns.get(txn, ino)
        if not node.is_legacy:
            return None
        leg = ns.get_legacy(txn, ino)
    if leg is None or s.tree is None:
        raise SourceError("no Phase 3 origin")

    def has_chunk(d: bytes) -> bool:
        with s.backend.read() as t:
            return cas.has(t, d)

    return _read_and_chunk(
        s.tree, ino, node.version, leg, s.chunker, has_chunk, spill, stop, dictionary=s.dictionary
    )


def prepare_batch(
    s: Host,
    inos: list[int],
    spill: Spill | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[Migration | OpError | None]:
    """`prepare_migration` of several files in one call, each one's result (an
    OpError, such as a SourceError or NotFound, in its place rather than
    raised): one task of a worker thread for many small files instead of one
    each. The files of a batch are usually siblings (they come in path order),
    so this thread keeps the Phase 3 directory fds it opens (`cached_walks`)
    and each file is one open, not a walk from the root.

    `stop` is polled between chunks as in `prepare_migration`; when it says so
    the list ends early: the files from the one given way on are not in it
    (nothing of them was kept), and the caller has them to give back."""
    out: list[Migration | OpError | None] = []
    with _walks(s):
        for ino in inos:
            if stop is not None and stop():
                break
            try:
                out.append(prepare_migration(s, ino, stop, spill))
            except Preempted:
                break
            except OpError as e:
                out.append(e)
    return out


def _read_and_chunk(
    tree: Phase3Tree,
    ino: int,
    version: int,
    legacy: Legacy,
    chunker: Chunker,
    has_chunk: Callable[[bytes], bool],
    spill: Spill | None,
    stop: Callable[[], bool] | None,
    level: int = 3,
    dictionary: Dictionary | None = None,
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
        for piece in _pieces(fd, before.st_size, chunker):
            if stop is not None and stop():
                raise Preempted()
            d = digest(piece)
            if m.extents or before.st_size > len(piece):  # else the file's hash is d
                whole.update(piece)
            n = len(piece)
            if d not in m.records and not has_chunk(d):  # (spilled ones: in the store)
                rec = codec.encode(piece, level, dictionary)
                m.records[d] = rec
                held += len(rec)
            m.extents.append((m.size, d, n))
            m.size += n
            if held > STAGE_BYTES and spill is not None:
                spill(m.records)
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
    one = len(m.extents) == 1 and m.size == after.st_size
    legacy.hashed, legacy.blake3 = True, m.extents[0][1] if one else whole.digest()
    return m


def _pieces(fd: int, size: int, chunker: Chunker) -> Iterator[bytes]:
    """The chunks of the file open at `fd`, `size` bytes long by its fstat.

    A file shorter than the minimum chunk is one chunk whatever the cut points
    (FastCDC never cuts before `min_size`), so it is read with one pread and
    no chunker is made for it: most files of a session store are that small,
    and the chunker's set-up was a fixed cost per file. One byte more than
    `size` is asked for, so a file that grew is read past its stat and the
    caller's size check sees it."""
    if size < chunker.min_size:
        data = _read_small(fd, size + 1)
        if data:
            yield data
        return
    with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
        yield from chunker.stream(f)


def _read_small(fd: int, want: int) -> bytes:
    parts = []
    got = 0
    while got < want:
        b = os.pread(fd, want - got, got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def stage_chunks(s: Host, records: dict[bytes, bytes]) -> None:
    """Write chunk records of a migration not committed yet, each listed in
    `pending` (a write transaction: the `spill` of `prepare_migration`)."""
    s.transact(lambda txn: stage_records(txn, records))


def stage_records(txn: Txn, records: dict[bytes, bytes]) -> None:
    for d, rec in records.items():
        if txn.get("chunks", d) is None:
            cas.put(txn, d, rec)
        txn.put("pending", d, b"")


def free_pending(txn: Txn) -> int:
    """Free staged chunks no file came to reference (after a crash). Returns the count."""
    freed = 0
    for d, _ in list(txn.range("pending", b"")):
        txn.delete("pending", d)
        if txn.get("refs", d) is None and cas.free(txn, d):
            freed += 1
    return freed


def unstage(txn: Txn, m: Migration) -> None:
    """A prepared migration that will not commit: free the chunks it staged that
    nothing references (free_pending would, at the next open)."""
    for d in m.staged:
        txn.delete("pending", d)
        if txn.get("refs", d) is None:
            cas.free(txn, d)


def commit_extents(txn: Txn, m: Migration) -> None:
    """Put the new chunks, extents and references of a prepared migration (the
    caller checks state)."""
    for off, d, n in m.extents:
        cas.add_ref(txn, d, m.records.get(d))
        txn.put("extents", extent_key(m.ino, off), extent_value(d, n))
    for d in m.staged:
        txn.delete("pending", d)


def commit_migrations(s: Host, ms: list[Migration]) -> list[Inode]:
    """Commit prepared migrations in one transaction. A file deleted meanwhile, or
    no longer LEGACY (written, truncated, migrated by someone else), is dropped
    from the batch and the rest commit: the app deleting or rewriting a file is
    not an error. The chunks a dropped file staged are freed unless referenced."""

    def op(txn: Txn) -> list[Inode]:
        done = []
        dropped = []
        for m in ms:
            v = txn.get("inodes", ino_key(m.ino))
            node = None if v is None else Inode.unpack(m.ino, v)
            if node is None or node.stored or node.version != m.base_version:
                dropped.append(m)
                continue
            commit_extents(txn, m)
            # Not the times: the Phase 3 file had the entry's stat when it was
            # read (prepare checks), and a utimens or rename through the mount
            # since then must not be undone.
            node.flags |= STORED
            node.size = m.size
            ns.put(txn, node)
            ns.put_legacy(txn, m.ino, m.legacy)
            txn.delete("errors", ino_key(m.ino))
            done.append(node)
        for m in dropped:  # after the others: one of them may share a staged chunk
            unstage(txn, m)
        return done

    for _ in range(3):
        try:
            return s.transact(op)
        except cas.MissingChunk:
            # A chunk deduplicated against was freed meanwhile: redo those files,
            # without the ones deleted since. One that cannot be read again (it
            # changed in Phase 3) gets its error; the others still commit. This
            # thread writes anyway: it stages big files' chunks itself.
            again = []
            for m in ms:
                try:
                    p = prepare_migration(s, m.ino, spill=stage_here(s))
                except NotFound:
                    continue
                except SourceError as e:
                    record_error(s, m.ino, str(e))
                    continue
                if p is not None:
                    again.append(p)
            ms = again
    raise FerryError("migration keeps racing with writes; try again")


def stage_here(s: Host) -> Spill:
    """A `spill` that stages from the calling thread (which must be the writer)."""
    return lambda records: stage_chunks(s, records)


def migrate(s: Host, ino: int) -> Inode:
    """Migrate one LEGACY file now, from this thread (a writer: it stages a big
    file's chunks as it goes); SourceError is recorded and raised."""
    try:
        m = prepare_migration(s, ino, spill=stage_here(s))
    except SourceError as e:
        record_error(s, ino, str(e))
        raise
    if m is not None:
        commit_migrations(s, [m])
    with s.backend.read() as txn:
        return ns.get(txn, ino)


# -- reading and healing from Phase 3 ---------------------------------------------------------


def open_legacy(s: Host, ino: int, record: bool = True) -> Phase3File:
    """The Phase 3 copy of a LEGACY file, to serve its reads until it is migrated.

    SourceError, recorded in status, if that is unsafe or the file changed in
    Phase 3 since its entry was imported. Such a file then stays LEGACY and its
    opens and reads get EIO: the mount keeps showing the entry it imported
    (stat, and the rollback point's manifest, describe the old version), and
    quietly taking the new content would serve bytes that match neither.
    Truncating it to 0 or deleting it through the mount still works. With
    `record` False nothing is written (the search indexer, a reader only)."""
    with s.backend.read() as txn:
        leg = ns.get_legacy(txn, ino)
    if leg is None or s.tree is None:
        raise SourceError("no Phase 3 origin")
    try:
        f = Phase3File(s.tree.open_file(leg.path), leg)
        try:
            f.check()
        except BaseException:
            f.close()
            raise
    except SourceError as e:
        if record:
            record_error(s, ino, str(e))
        raise
    return f


def read_legacy(s: Host, f: Phase3File, ino: int, off: int, n: int) -> bytes:
    """Bytes of a LEGACY file from its Phase 3 copy `f` (open_legacy); SourceError,
    recorded in status, if the file changed there before or during the read."""
    try:
        return f.pread(n, off)
    except SourceError as e:
        record_error(s, ino, str(e))
        raise


def heal(s: Host, ino: int, bad: bytes) -> bool:
    """Rewrite the chunk `bad` from the Phase 3 copy of `ino`, if the file is
    unmodified since Phase 3 and its bytes there still hash to `bad`. Not in
    failsafe or read-only: the read then gets EIO (its ReadOnly was EROFS)."""
    if s.readonly or s.failsafe is not None or bad == HOLE:
        return False  # (a gap between extents reads as CorruptChunk(HOLE))
    with s.backend.read() as txn:
        node = ns.get(txn, ino)
        leg = ns.get_legacy(txn, ino)
        spots = [(o, n) for o, d, n in content.all_extents(txn, ino) if d == bad]
    if node.changed or leg is None or s.tree is None or not spots:
        return False
    try:
        fd = s.tree.open_file(leg.path)
    except SourceError:
        return False
    try:
        for off, n in spots:
            plain = os.pread(fd, n, off)
            if len(plain) == n and digest(plain) == bad:
                s.transact(partial(_put_chunk, digest=bad, record=codec.encode(plain)))
                s.cache.discard(bad)
                return True
    finally:
        os.close(fd)
    return False


def _put_chunk(txn: Txn, digest: bytes, record: bytes) -> None:
    cas.put(txn, digest, record)


# -- walks over the tree ----------------------------------------------------------------------


def legacy_files_by_path(s: Host) -> Iterator[int]:
    """See `legacy_files_sized`: the inodes alone."""
    for ino, _size in legacy_files_sized(s):
        yield ino


def legacy_files_sized(s: Host) -> Iterator[tuple[int, int]]:
    """(inode, size) of the LEGACY files of the listed tree, depth first with names in byte order:
    the order of `sorted(paths)`, and of an app reading a session's files
    together. Migrating in this order lays each session's chunks side by side
    in the store, so a cold read of a session is one run of the disk, not
    seeks to wherever a hash or inode order put each file. One directory's
    entries are held at a time (per level of the walk)."""
    stack: list[Iterator[tuple[bytes, int, int, int]]] = [iter(_sorted_entries(s, ROOT_INO))]
    linked: set[int] = set()  # files of several names: yielded at the first
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        _, ino, nlink, size = entry
        if nlink == 0:
            stack.append(iter(_sorted_entries(s, ino)))
        elif nlink == 1:
            yield ino, size
        elif ino not in linked:
            linked.add(ino)
            yield ino, size


def _sorted_entries(s: Host, d: int) -> list[tuple[bytes, int, int, int]]:
    """(name, ino, link count or 0 for a directory, size) of `d`'s directories
    and LEGACY files, by name."""
    out = []
    with s.backend.read() as txn:
        for _, name, c in ns.entries(txn, d):
            node = ns.get(txn, c)
            if node.is_dir:
                out.append((name, c, 0, 0))
            elif node.is_legacy:
                out.append((name, c, max(1, node.nlink), node.size))
    out.sort()
    return out


def _walks(s: Host) -> contextlib.AbstractContextManager[None]:
    """Phase3Tree.cached_walks: listing a deep chain opens each directory once."""
    return s.tree.cached_walks() if s.tree is not None else contextlib.nullcontext()


def ensure_listed(s: Host, ino: int, ahead: int = 0) -> Inode:
    """List directory `ino` if it is UNLISTED and, in the same transaction, its
    UNLISTED subdirectories breadth first until about `ahead` more entries.

    Listing ahead is metadata readahead: a synced commit costs milliseconds,
    and whoever looks up one name in a fresh tree usually walks on into it."""
    with s.backend.read() as txn:
        d = ns.get(txn, ino)
    if not d.is_unlisted:
        return d

    def op(txn: Txn) -> Inode:
        with _walks(s):
            listed = ns.listed(txn, s.tree, ino)
            if ahead > 0:
                subdirs = deque(c for _, _, c in ns.entries(txn, ino) if ns.get(txn, c).is_dir)
                _import_queue(s, txn, subdirs, ahead, time.monotonic() + LIST_AHEAD_SECONDS)
            return listed

    return s.transact(op)


def _import_queue(
    s: Host, txn: Txn, queue: deque[int], entries: int, deadline: float | None
) -> int:
    """List UNLISTED directories breadth first from `queue` (descending through
    listed ones) until about `entries` entries were seen, or `deadline`
    (time.monotonic) passed; what is left to visit stays in `queue`. Returns how
    many directories were listed."""
    listed = seen = 0
    while queue and seen < entries:
        ino = queue.popleft()
        d = ns.get(txn, ino)
        if not d.stored:
            if deadline is not None and listed and time.monotonic() > deadline:
                queue.appendleft(ino)
                break
            ns.import_dir(txn, s.tree, d)
            listed += 1
        for _, _, c in ns.entries(txn, ino):
            seen += 1
            if ns.get(txn, c).is_dir:
                queue.append(c)
    return listed


def import_step(s: Host, queue: deque[int], entries: int = 4096) -> int:
    """One transaction of `import_all`: see `_import_queue`. On failure `queue` is
    as it was (the transaction was undone, so is its progress)."""
    snapshot = list(queue)

    def op(txn: Txn) -> int:
        with _walks(s):
            return _import_queue(s, txn, queue, entries, None)

    try:
        return s.transact(op)
    except BaseException:
        queue.clear()
        queue.extend(snapshot)
        raise


def import_all(s: Host, entries: int = 4096) -> int:
    """List every UNLISTED directory, breadth first, about `entries` directory
    entries per transaction (a bigger transaction's dirty pages are memory that
    grows with the tree). Returns how many directories were listed."""
    listed = 0
    queue: deque[int] = deque([ROOT_INO])
    while queue:
        listed += import_step(s, queue, entries)
    return listed

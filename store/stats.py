"""Figures about a store: how many files and directories are migrated and listed,
how many bytes each state holds, what the chunks cost at rest, and the free space
of the filesystem the store is on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from . import cas, codec, index, packs
from . import namespace as ns
from .kv import Backend, Txn
from .records import U64, Inode


@dataclass
class Stats:
    files_total: int = 0
    files_migrated: int = 0
    files_legacy: int = 0
    dirs_total: int = 0
    dirs_listed: int = 0
    bytes_logical: int = 0
    bytes_migrated: int = 0
    bytes_legacy: int = 0
    bytes_unique: int = 0  # (the same as bytes_after_dedup; kept for older readers)
    bytes_after_dedup: int = 0  # plain bytes of the distinct chunks
    bytes_compressed: int = 0  # what the chunk records take (alone or in packs)
    bytes_stored: int = 0  # the database on disk (du of data.mdb, a sparse file)
    bytes_overhead: int = 0  # bytes_stored - bytes_compressed: pages, dead pack bytes
    bytes_store_dir: int = 0  # du of the whole store directory (database and index)
    chunks: int = 0
    chunks_packed: int = 0
    packs: int = 0
    bytes_packs: int = 0  # the packs' bytes, live and dead
    bytes_packs_dead: int = 0
    dictionaries: int = 0
    chunks_dict: int = 0  # chunks compressed with a dictionary
    bytes_cold_plain: int = 0  # plain bytes of chunks recompressed cold
    bytes_cold_compressed: int = 0  # what those take now
    errors: int = 0
    files_indexed: int = 0  # files whose current content the search index holds
    index_pending: int = 0  # files and directories marked for the index to look at
    bytes_index: int = 0  # the search index's files on disk (STORE/index)


def stats(backend: Backend, path: str | None = None) -> Stats:
    """The store's figures, from one read snapshot (a walk of every inode and chunk);
    `path`, the store directory, for the size of its search index."""
    s = Stats()
    with backend.read() as txn:
        for k, v in txn.range("inodes", b""):
            node = Inode.unpack(U64.unpack(k)[0], v)
            if node.is_dir:
                s.dirs_total += 1
                s.dirs_listed += node.stored
            elif node.is_reg:
                s.files_total += 1
                s.bytes_logical += node.size
                if node.stored:
                    s.files_migrated += 1
                    s.bytes_migrated += node.size
                else:
                    s.files_legacy += 1
                    s.bytes_legacy += node.size
        _chunk_figures(txn, s)
        for k, _ in txn.range("errors", b""):
            s.errors += ns.error_applies(txn, U64.unpack(k)[0])
        s.files_indexed, s.index_pending = index.counts(txn)
    s.bytes_stored = backend.disk_bytes()
    s.bytes_overhead = max(0, s.bytes_stored - s.bytes_compressed)
    s.bytes_index = index.bytes_on_disk(path)
    s.bytes_store_dir = _du(path) if path is not None else s.bytes_stored
    return s


def _chunk_figures(txn: Txn, s: Stats) -> None:
    for k, v in txn.range("chunks", b""):
        s.chunks += 1
        if packs.is_pointer(v):
            loc = packs.locate(v)
            n, kind = loc.length, loc.codec
            s.chunks_packed += 1
            rec = packs.record(txn, k)
        else:
            n, kind, rec = len(v), v[0] if len(v) else 0, v
        plain = cas.plain_length(rec) if rec else None
        s.bytes_compressed += n
        s.bytes_after_dedup += plain or 0
        if kind & codec.KIND == codec.ZSTD_DICT:
            s.chunks_dict += 1
        if kind & codec.COLD:
            s.bytes_cold_plain += plain or 0
            s.bytes_cold_compressed += n
    s.bytes_unique = s.bytes_after_dedup
    for _pack, i in packs.all_info(txn):
        if i is not None:
            s.packs += 1
            s.bytes_packs += i.size
            s.bytes_packs_dead += i.dead_bytes
    s.dictionaries = sum(1 for _ in txn.range("dicts", b""))


def _du(path: str) -> int:
    """Bytes allocated under `path`, as `du -B1 -s` counts them."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # gone meanwhile
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def iter_inodes(backend: Backend) -> Iterator[Inode]:
    """Every inode in inode order, from one read snapshot held while iterating."""
    with backend.read() as txn:
        for k, v in txn.range("inodes", b""):
            yield Inode.unpack(U64.unpack(k)[0], v)


def statfs(path: str | None) -> tuple[int, int, int, int]:
    """(block size, total blocks, free blocks, files) of the filesystem at `path`."""
    st = os.statvfs(path or ".")
    return st.f_frsize, st.f_blocks, st.f_bavail, st.f_files

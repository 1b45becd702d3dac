"""Figures about a store: how many files and directories are migrated and listed,
how many bytes each state holds, what the chunks cost at rest, and the free space
of the filesystem the store is on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from . import index
from . import namespace as ns
from .kv import Backend
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
    bytes_unique: int = 0
    bytes_compressed: int = 0
    bytes_stored: int = 0
    chunks: int = 0
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
        for _, v in txn.range("chunks", b""):
            s.chunks += 1
            s.bytes_compressed += len(v)
        for k, _ in txn.range("errors", b""):
            s.errors += ns.error_applies(txn, U64.unpack(k)[0])
        s.files_indexed, s.index_pending = index.counts(txn)
    s.bytes_stored = backend.disk_bytes()
    s.bytes_index = index.bytes_on_disk(path)
    return s


def iter_inodes(backend: Backend) -> Iterator[Inode]:
    """Every inode in inode order, from one read snapshot held while iterating."""
    with backend.read() as txn:
        for k, v in txn.range("inodes", b""):
            yield Inode.unpack(U64.unpack(k)[0], v)


def statfs(path: str | None) -> tuple[int, int, int, int]:
    """(block size, total blocks, free blocks, files) of the filesystem at `path`."""
    st = os.statvfs(path or ".")
    return st.f_frsize, st.f_blocks, st.f_bavail, st.f_files

"""Inodes and directory entries inside a transaction, and importing a Phase 3
directory's entries one directory at a time.

Directories start UNLISTED: their children are imported on first need (a
lookup, a listing, a change, or the sweep), so opening a store of a million
files costs nothing up front.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator

from . import index
from .errors import NameTooLong, NotADir, NotFound, SourceError
from .kv import Txn
from .phase3 import Phase3Tree, join
from .records import (
    STORED,
    U64,
    Inode,
    Legacy,
    dirent_key,
    dirent_prefix,
    ino_key,
)

NAME_MAX = 255


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name longer than {NAME_MAX} bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise NotFound("bad name")


def get(txn: Txn, ino: int) -> Inode:
    v = txn.get("inodes", ino_key(ino))
    if v is None:
        raise NotFound(f"inode {ino}")
    return Inode.unpack(ino, v)


def put(txn: Txn, inode: Inode) -> None:
    txn.put("inodes", ino_key(inode.ino), inode.pack())
    if stat.S_ISREG(inode.mode) or (stat.S_ISDIR(inode.mode) and not inode.stored):
        index.mark(txn, inode.ino)  # the search index must look again (index.py)


def child(txn: Txn, parent: int, name: bytes) -> int | None:
    v = txn.get("dirents", dirent_key(parent, name))
    return None if v is None else U64.unpack(v)[0]


def entries(txn: Txn, parent: int, after_cookie: int = 0) -> Iterator[tuple[int, bytes, int]]:
    """(cookie, name, child ino) of `parent`'s entries past `after_cookie`, in cookie order."""
    start = dirent_prefix(parent) + U64.pack(after_cookie + 1)
    for k, v in txn.range("dirents", start, dirent_prefix(parent + 1)):
        yield U64.unpack_from(k, 8)[0], bytes(k[16:]), U64.unpack(v)[0]


def is_empty(txn: Txn, ino: int) -> bool:
    return next(entries(txn, ino), None) is None


def add_entry(txn: Txn, parent: int, name: bytes, ino: int) -> None:
    k = dirent_key(parent, name)
    old = txn.get("dirents", k)
    if old is not None:
        index.unnamed(txn, U64.unpack(old)[0], parent, name)
    txn.put("dirents", k, U64.pack(ino))
    index.named(txn, ino, parent, name)


def remove_entry(txn: Txn, parent: int, name: bytes) -> None:
    k = dirent_key(parent, name)
    old = txn.get("dirents", k)
    if old is not None:
        index.unnamed(txn, U64.unpack(old)[0], parent, name)
    txn.delete("dirents", k)


def alloc(txn: Txn) -> int:
    v = txn.get("meta", b"next_ino")
    ino = U64.unpack(v)[0] if v is not None else 2
    txn.put("meta", b"next_ino", U64.pack(ino + 1))
    return ino


def get_legacy(txn: Txn, ino: int) -> Legacy | None:
    v = txn.get("legacy", ino_key(ino))
    return None if v is None else Legacy.unpack(v)


def put_legacy(txn: Txn, ino: int, leg: Legacy) -> None:
    txn.put("legacy", ino_key(ino), leg.pack())


def record_error(txn: Txn, ino: int, message: str) -> None:
    txn.put("errors", ino_key(ino), message.encode())


def import_dir(txn: Txn, tree: Phase3Tree | None, d: Inode) -> Inode:
    """Import the Phase 3 entries of directory `d` (UNLISTED) and mark it LISTED."""
    if not d.is_dir:
        raise NotADir(f"inode {d.ino}")
    leg = get_legacy(txn, d.ino)
    subdirs = 0
    if leg is not None and tree is not None:
        try:
            for e in tree.listdir(leg.path):
                subdirs += _import_entry(txn, tree, d.ino, leg.path, e.name, e.st, e.target)
        except SourceError as err:
            record_error(txn, d.ino, f"cannot list: {err}")
    d.flags |= STORED
    d.nlink = 2 + subdirs
    put(txn, d)
    return d


def _import_entry(
    txn: Txn,
    tree: Phase3Tree,
    parent: int,
    parent_path: bytes,
    name: bytes,
    st: object,
    target: bytes,
) -> int:
    import os

    assert isinstance(st, os.stat_result)
    if len(name) > NAME_MAX or child(txn, parent, name) is not None:
        return 0
    mode = st.st_mode
    if stat.S_ISREG(mode) and st.st_nlink > 1:
        known = txn.get("p3ino", U64.pack(st.st_dev) + U64.pack(st.st_ino))
        other_ino = U64.unpack(known)[0] if known is not None else 0
        # Its other names may all be unlinked (and the inode purged) by now.
        if other_ino and txn.get("inodes", ino_key(other_ino)) is not None:
            other = get(txn, other_ino)
            other.nlink += 1
            put(txn, other)
            txn.delete("meta", b"orphan:" + ino_key(other_ino))  # named again
            add_entry(txn, parent, name, other_ino)
            return 0
    ino = alloc(txn)
    node = Inode(
        ino,
        mode,
        st.st_uid,
        st.st_gid,
        1,
        st.st_size,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )
    subdir = 0
    if stat.S_ISDIR(mode):
        node.parent = parent
        node.nlink = max(2, st.st_nlink)
        node.size = 4096
        subdir = 1
    elif stat.S_ISLNK(mode):
        node.flags |= STORED
        node.target = target
        node.size = len(target)
    elif stat.S_ISREG(mode):
        if st.st_nlink > 1:
            txn.put("p3ino", U64.pack(st.st_dev) + U64.pack(st.st_ino), U64.pack(ino))
    else:
        node.flags |= STORED  # FIFOs, sockets, devices: nothing to migrate
        node.rdev = st.st_rdev
        node.size = 0
    put(txn, node)
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        put_legacy(
            txn,
            ino,
            Legacy(
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
                st.st_dev,
                False,
                b"\0" * 32,
                join(parent_path, name),
            ),
        )
    add_entry(txn, parent, name, ino)
    return subdir

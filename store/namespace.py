"""Inodes and directory entries inside a transaction: the POSIX rules of creating,
linking, removing and renaming names, setting attributes and xattrs, each a
function of one write transaction (`Store` runs them through `transact`), and
importing a Phase 3 directory's entries one directory at a time.

Directories start UNLISTED: their children are imported on first need (a
lookup, a listing, a change, or the sweep), so opening a store of a million
files costs nothing up front.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator

from . import content, index
from .errors import (
    Exists,
    Invalid,
    IsADir,
    NameTooLong,
    NoData,
    NotADir,
    NotEmpty,
    NotFound,
    NotPermitted,
    SourceError,
    TooManyLinks,
)
from .kv import Txn
from .phase3 import Phase3Tree, join
from .records import (
    CHANGED,
    ROOT_INO,
    SCHEMA_VERSION,
    STORED,
    U64,
    Inode,
    Legacy,
    dirent_key,
    dirent_prefix,
    ino_key,
    xattr_key,
)

log = logging.getLogger("ferryfs.phase3")

NAME_MAX = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
MAX_LINKS = 65000


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
    index.touched(txn, inode)  # the search index must look again (index.py)


def child(txn: Txn, parent: int, name: bytes) -> int | None:
    v = txn.get("dirents", dirent_key(parent, name))
    return None if v is None else U64.unpack(v)[0]


def entries(txn: Txn, parent: int, after_cookie: int = 0) -> Iterator[tuple[int, bytes, int]]:
    """(cookie, name, child ino) of `parent`'s entries past `after_cookie`, in cookie order."""
    start = dirent_prefix(parent) + U64.pack(after_cookie + 1)
    for k, v in txn.range("dirents", start, dirent_prefix(parent + 1)):
        yield U64.unpack_from(k, 8)[0], bytes(k[16:]), U64.unpack(v)[0]


def lookup(txn: Txn, parent: int, name: bytes) -> int:
    """The inode `name` in `parent` names; NotFound if none."""
    c = child(txn, parent, name)
    if c is None:
        raise NotFound(name.decode(errors="replace"))
    return c


def listing(txn: Txn, ino: int, after: int, limit: int) -> list[tuple[int, bytes, Inode]]:
    """Up to `limit` entries of directory `ino` after cookie `after`: (cookie, name, inode)."""
    out: list[tuple[int, bytes, Inode]] = []
    for cookie, name, c in entries(txn, ino, after):
        out.append((cookie, name, get(txn, c)))
        if len(out) >= limit:
            break
    return out


def is_empty(txn: Txn, ino: int) -> bool:
    return next(entries(txn, ino), None) is None


def add_entry(txn: Txn, parent: int, name: bytes, ino: int) -> None:
    index.entry(txn, parent, name, ino)  # the inodes' names, for search (index.py)
    txn.put("dirents", dirent_key(parent, name), U64.pack(ino))


def remove_entry(txn: Txn, parent: int, name: bytes) -> None:
    index.entry(txn, parent, name, None)
    txn.delete("dirents", dirent_key(parent, name))


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


def init_root(
    txn: Txn,
    st: os.stat_result,
    from_phase3: bool,
    t: int,
    chunker: tuple[int, int, int],
    source: str | None,
) -> None:
    """A new store's meta records and root directory, made from the stat `st` of
    the Phase 3 root (`from_phase3`: the root is then UNLISTED, its entries
    imported on first need) or of where the store is made."""
    txn.put("meta", b"schema", U64.pack(SCHEMA_VERSION))
    txn.put("meta", b"created_ns", U64.pack(t))
    txn.put("meta", b"chunker", ",".join(str(x) for x in chunker).encode())
    if source is not None:
        txn.put("meta", b"source", os.fsencode(os.path.abspath(source)))
    root = Inode(
        ROOT_INO,
        stat.S_IFDIR | stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        max(2, st.st_nlink) if from_phase3 else 2,
        4096,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )
    if not from_phase3:
        root.flags |= STORED
    put(txn, root)
    if from_phase3:
        leg = Legacy(0, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, False, bytes(32), b"")
        put_legacy(txn, ROOT_INO, leg)
    txn.put("meta", b"next_ino", U64.pack(ROOT_INO + 1))


def orphan_key(ino: int) -> bytes:
    """The `meta` key marking `ino` as kept while unnamed (the kernel still knows it)."""
    return b"orphan:" + ino_key(ino)


def error_applies(txn: Txn, ino: int) -> bool:
    """An error record is about migrating a file or listing a directory: it stops
    applying when the inode is gone or the file is no longer LEGACY (migrated since,
    or its content replaced through the mount)."""
    v = txn.get("inodes", ino_key(ino))
    return v is not None and not Inode.unpack(ino, v).is_migrated


def listed(txn: Txn, tree: Phase3Tree | None, ino: int) -> Inode:
    """Directory `ino`, its Phase 3 entries imported first if it is UNLISTED."""
    d = get(txn, ino)
    if not d.is_dir:
        raise NotADir(f"inode {ino} is not a directory")
    if d.is_unlisted:
        d = import_dir(txn, tree, d)
    return d


def _touch(d: Inode, t: int) -> None:
    d.mtime_ns = d.ctime_ns = t
    d.flags |= CHANGED


def _changed(txn: Txn, node: Inode, t: int) -> None:
    node.ctime_ns = t
    node.flags |= CHANGED
    put(txn, node)


def mknod_mode(mode: int) -> int:
    """The mode mknod(2) makes: a regular file for type 0; no directory or symlink."""
    if stat.S_IFMT(mode) == 0:
        mode |= stat.S_IFREG
    if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
        raise Invalid("mknod of a directory or symlink")
    return mode


def readlink(txn: Txn, ino: int) -> bytes:
    node = get(txn, ino)
    if not node.is_link:
        raise Invalid("not a symlink")
    return node.target


def check_rename(old_name: bytes, new_name: bytes, flags: int) -> None:
    check_name(old_name)
    check_name(new_name)
    if flags & RENAME_EXCHANGE and flags & RENAME_NOREPLACE:
        raise Invalid("RENAME_EXCHANGE and RENAME_NOREPLACE together")


def new_node(
    txn: Txn,
    tree: Phase3Tree | None,
    parent: int,
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    t: int,
    rdev: int = 0,
    target: bytes = b"",
) -> Inode:
    """A new file, directory, symlink or special file `name` in `parent`."""
    check_name(name)
    d = listed(txn, tree, parent)
    if child(txn, parent, name) is not None:
        raise Exists(name.decode(errors="replace"))
    ino = alloc(txn)
    node = Inode(ino, mode, uid, gid, 1, 0, t, t, t, rdev, STORED | CHANGED)
    if stat.S_ISDIR(mode):
        node.nlink, node.parent, node.size = 2, parent, 4096
        d.nlink += 1
    if stat.S_ISLNK(mode):
        node.target, node.size = target, len(target)
    put(txn, node)
    add_entry(txn, parent, name, ino)
    _touch(d, t)
    put(txn, d)
    return node


def link(txn: Txn, tree: Phase3Tree | None, ino: int, parent: int, name: bytes, t: int) -> Inode:
    """Another name, `name` in `parent`, for the non-directory `ino`."""
    check_name(name)
    node = get(txn, ino)
    if node.is_dir:
        raise NotPermitted("hard link to a directory")
    d = listed(txn, tree, parent)
    if child(txn, parent, name) is not None:
        raise Exists(name.decode(errors="replace"))
    if node.nlink >= MAX_LINKS:
        raise TooManyLinks("too many links")
    node.nlink += 1
    txn.delete("meta", orphan_key(ino))
    _changed(txn, node, t)
    add_entry(txn, parent, name, ino)
    _touch(d, t)
    put(txn, d)
    return node


def drop_link(txn: Txn, node: Inode, t: int, keep_orphans: bool) -> None:
    """One directory entry of `node` is gone: count it, and purge at zero (or, with
    `keep_orphans`, mark it for `forget`: the kernel may still use it)."""
    node.nlink -= 1 if not node.is_dir else node.nlink
    node.ctime_ns = t
    node.flags |= CHANGED
    if node.nlink <= 0 and not keep_orphans:
        purge(txn, node.ino)
        return
    put(txn, node)
    if node.nlink <= 0:
        txn.put("meta", orphan_key(node.ino), b"")


def purge(txn: Txn, ino: int) -> None:
    """Delete every record of `ino`: contents, inode, origin, error, xattrs, mark."""
    content.delete_all(txn, ino)
    index.mark(txn, ino)  # its search document goes too (index.py)
    txn.delete("inodes", ino_key(ino))
    txn.delete("legacy", ino_key(ino))
    txn.delete("errors", ino_key(ino))
    for k, _ in list(txn.range("xattrs", ino_key(ino), ino_key(ino + 1))):
        txn.delete("xattrs", k)
    txn.delete("meta", orphan_key(ino))


def purge_orphans(txn: Txn) -> int:
    """Purge the inodes left marked by a process that kept them while unnamed (at
    open, no kernel knows them any more). Returns how many were purged."""
    n = 0
    for k, _ in list(txn.range("meta", b"orphan:", b"orphan;")):
        ino = U64.unpack_from(k, 7)[0]
        v = txn.get("inodes", ino_key(ino))
        if v is not None and Inode.unpack(ino, v).nlink > 0:
            txn.delete("meta", k)  # a stale mark: a name still holds the inode
            continue
        purge(txn, ino)
        n += 1
    return n


def forget(txn: Txn, ino: int) -> None:
    """The kernel forgot `ino`: purge it if no directory entry names it any more."""
    if txn.get("meta", orphan_key(ino)) is not None:
        purge(txn, ino)


def remove(
    txn: Txn,
    tree: Phase3Tree | None,
    parent: int,
    name: bytes,
    directory: bool,
    t: int,
    keep_orphans: bool,
) -> Inode:
    """unlink (a non-directory) or rmdir (an empty directory) `name` in `parent`."""
    check_name(name)
    shown = name.decode(errors="replace")
    d = listed(txn, tree, parent)
    c = child(txn, parent, name)
    if c is None:
        raise NotFound(shown)
    if directory:
        node = listed(txn, tree, c)  # NotADir for a file
        if not is_empty(txn, c):
            raise NotEmpty(shown)
        d.nlink -= 1
    else:
        node = get(txn, c)
        if node.is_dir:
            raise IsADir(shown)
    remove_entry(txn, parent, name)
    drop_link(txn, node, t, keep_orphans)
    _touch(d, t)
    put(txn, d)
    return node


def rename(
    txn: Txn,
    tree: Phase3Tree | None,
    old_parent: int,
    old_name: bytes,
    new_parent: int,
    new_name: bytes,
    flags: int,
    t: int,
    keep_orphans: bool,
) -> None:
    """rename(2) and renameat2(2)'s RENAME_NOREPLACE and RENAME_EXCHANGE."""
    src_dir = listed(txn, tree, old_parent)
    dst_dir = src_dir if new_parent == old_parent else listed(txn, tree, new_parent)
    c = child(txn, old_parent, old_name)
    if c is None:
        raise NotFound(old_name.decode(errors="replace"))
    node = get(txn, c)
    other_ino = child(txn, new_parent, new_name)
    if other_ino == c:
        return  # same inode under both names: POSIX says do nothing
    other = get(txn, other_ino) if other_ino is not None else None
    if node.is_dir:
        _check_not_ancestor(txn, c, new_parent)
    if flags & RENAME_EXCHANGE:
        if other is None:
            raise NotFound(new_name.decode(errors="replace"))
        if other.is_dir:
            _check_not_ancestor(txn, other.ino, old_parent)
        add_entry(txn, old_parent, old_name, other.ino)
        add_entry(txn, new_parent, new_name, c)
        if node.is_dir != other.is_dir and old_parent != new_parent:
            delta = 1 if node.is_dir else -1
            src_dir.nlink -= delta
            dst_dir.nlink += delta
        for n, p in ((node, new_parent), (other, old_parent)):
            if n.is_dir:
                n.parent = p
            _changed(txn, n, t)
    else:
        if other is not None:
            if flags & RENAME_NOREPLACE:
                raise Exists(new_name.decode(errors="replace"))
            if other.is_dir and not node.is_dir:
                raise IsADir(new_name.decode(errors="replace"))
            if node.is_dir and not other.is_dir:
                raise NotADir(new_name.decode(errors="replace"))
            if other.is_dir:
                listed(txn, tree, other.ino)
                if not is_empty(txn, other.ino):
                    raise NotEmpty(new_name.decode(errors="replace"))
                dst_dir.nlink -= 1
            drop_link(txn, other, t, keep_orphans)
        remove_entry(txn, old_parent, old_name)
        add_entry(txn, new_parent, new_name, c)
        if node.is_dir:
            node.parent = new_parent
            if old_parent != new_parent:
                src_dir.nlink -= 1
                dst_dir.nlink += 1
        _changed(txn, node, t)
    _touch(src_dir, t)
    put(txn, src_dir)
    if dst_dir is not src_dir:
        _touch(dst_dir, t)
        put(txn, dst_dir)


def _check_not_ancestor(txn: Txn, ino: int, target_parent: int) -> None:
    p = target_parent
    while True:
        if p == ino:
            raise Invalid("cannot move a directory into itself")
        if p == ROOT_INO or p == 0:
            return
        p = get(txn, p).parent


def setattr(
    txn: Txn,
    ino: int,
    t: int,
    mode: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    atime_ns: int | None = None,
    mtime_ns: int | None = None,
    ctime_ns: int | None = None,
) -> Inode:
    """chmod, chown and utimens of `ino` (not its size: that is content)."""
    node = get(txn, ino)
    if mode is not None:
        node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
    if uid is not None:
        node.uid = uid
    if gid is not None:
        node.gid = gid
    if atime_ns is not None:
        node.atime_ns = atime_ns
    if mtime_ns is not None:
        node.mtime_ns = mtime_ns
    _changed(txn, node, ctime_ns if ctime_ns is not None else t)
    return node


def getxattr(txn: Txn, ino: int, name: bytes) -> bytes:
    get(txn, ino)
    v = txn.get("xattrs", xattr_key(ino, name))
    if v is None:
        raise NoData(name.decode(errors="replace"))
    return bytes(v)


def listxattr(txn: Txn, ino: int) -> list[bytes]:
    get(txn, ino)
    return [bytes(k[8:]) for k, _ in txn.range("xattrs", ino_key(ino), ino_key(ino + 1))]


def setxattr(txn: Txn, ino: int, name: bytes, value: bytes, flags: int, t: int) -> None:
    node = get(txn, ino)
    k = xattr_key(ino, name)
    exists = txn.get("xattrs", k) is not None
    if flags & XATTR_CREATE and exists:
        raise Exists(name.decode(errors="replace"))
    if flags & XATTR_REPLACE and not exists:
        raise NoData(name.decode(errors="replace"))
    txn.put("xattrs", k, value)
    _changed(txn, node, t)


def removexattr(txn: Txn, ino: int, name: bytes, t: int) -> None:
    node = get(txn, ino)
    if not txn.delete("xattrs", xattr_key(ino, name)):
        raise NoData(name.decode(errors="replace"))
    _changed(txn, node, t)


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
            txn.delete("meta", orphan_key(other_ino))  # named again
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
        if tree.other_fs(st):
            # Another filesystem mounted inside SRC (proc, a tmpfs, ...): not
            # crossed, as `find -xdev`. Shown as an empty directory, listed now.
            node.flags |= STORED
            node.nlink = 2
            log.info(
                "not crossing into another filesystem mounted at %r in Phase 3: "
                "shown as an empty directory",
                join(parent_path, name),
            )
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

"""Writing the changes a rollback would lose out as plain files.

Each changed or new file goes to DEST/<its path in the mount> with its mode
and times; symlinks and FIFOs are recreated; a directory moved before it was
ever listed is copied from Phase 3; the Phase 3 paths no longer present are
listed in DEST/.ferryfs-deleted, one per line (backslash and newline escaped).
"""

from __future__ import annotations

import os
import stat

from . import content
from . import namespace as ns
from .changes import Changes
from .phase3 import Phase3Tree, join
from .records import Inode
from .store import Store

BLOCK = 4 << 20
DELETED = ".ferryfs-deleted"


def export_changes(store: Store, tree: Phase3Tree, changes: Changes, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    root = os.fsencode(dest)
    for path, node in changes.changed:
        target = os.path.join(root, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _write_node(store, tree, node, target)
    for new, old in changes.moved_dirs:
        _copy_phase3(tree, old, os.path.join(root, new))
    with open(os.path.join(root, DELETED.encode()), "wb") as f:
        for p in changes.deleted:
            f.write(p.replace(b"\\", b"\\\\").replace(b"\n", b"\\n") + b"\n")


def _write_node(store: Store, tree: Phase3Tree, node: Inode, target: bytes) -> None:
    if os.path.lexists(target):
        os.unlink(target)
    if node.is_link:
        os.symlink(node.target, target)
        return
    if stat.S_ISFIFO(node.mode):
        os.mkfifo(target, stat.S_IMODE(node.mode))
    elif node.is_reg:
        with open(target, "wb") as out:
            if node.stored:
                off = 0
                while off < node.size:
                    with store.backend.read() as txn:
                        data = content.read(txn, node.ino, node.size, off, BLOCK, store.cache)
                    out.write(data)
                    off += len(data)
            else:
                with store.backend.read() as txn:
                    leg = ns.get_legacy(txn, node.ino)
                if leg is not None:
                    fd = tree.open_file(leg.path)
                    with os.fdopen(fd, "rb") as f:
                        while block := f.read(BLOCK):
                            out.write(block)
    elif node.is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        return  # sockets and devices are not exported
    os.chmod(target, stat.S_IMODE(node.mode))
    os.utime(target, ns=(node.atime_ns, node.mtime_ns))


def _copy_phase3(tree: Phase3Tree, rel: bytes, target: bytes) -> None:
    os.makedirs(target, exist_ok=True)
    for e in tree.listdir(rel):
        p, t = join(rel, e.name), os.path.join(target, e.name)
        if stat.S_ISDIR(e.st.st_mode):
            _copy_phase3(tree, p, t)
        elif stat.S_ISLNK(e.st.st_mode):
            os.symlink(e.target, t)
        elif stat.S_ISREG(e.st.st_mode):
            fd = tree.open_file(p)
            with os.fdopen(fd, "rb") as f, open(t, "wb") as out:
                while block := f.read(BLOCK):
                    out.write(block)
            os.utime(t, ns=(e.st.st_atime_ns, e.st.st_mtime_ns))

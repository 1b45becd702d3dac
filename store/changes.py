"""What changed through the mount since the rollback point: the files a rollback
would lose. Read from one snapshot of the store and a listing of the Phase 3
tree; writes nothing.

A file is unchanged when it sits at its Phase 3 path and was never changed
through the mount (no CHANGED flag); anything else the store shows is changed
or new. A Phase 3 path the store no longer shows is deleted. Directories not
listed yet are unchanged by definition (nothing could touch their children).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from . import namespace as ns
from .errors import SourceError
from .kv import Txn
from .phase3 import Phase3Tree, join
from .records import ROOT_INO, Inode
from .store import Store


@dataclass
class Changes:
    changed: list[tuple[bytes, Inode]] = field(default_factory=list)  # store path, inode
    moved_dirs: list[tuple[bytes, bytes]] = field(default_factory=list)  # unlisted: new, old
    deleted: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changed or self.moved_dirs or self.deleted)


def find_changes(store: Store, tree: Phase3Tree | None) -> Changes:
    out = Changes()
    present: set[bytes] = set()
    listed_origins: list[bytes] = []
    with store.backend.read() as txn:
        root = ns.get(txn, ROOT_INO)
        if root.stored:
            listed_origins.append(b"")
        for path, node in _walk(txn, ROOT_INO, b""):
            present.add(path)
            leg = ns.get_legacy(txn, node.ino)
            in_place = leg is not None and leg.path == path
            if node.is_dir:
                if node.stored and leg is not None:
                    listed_origins.append(leg.path)
                if not node.stored and not in_place and leg is not None:
                    out.moved_dirs.append((path, leg.path))
                elif not in_place and path:
                    present.add(path)
                continue
            if not in_place or node.changed:
                out.changed.append((path, node))
    if tree is not None:
        for origin in listed_origins:
            try:
                for e in tree.listdir(origin):
                    p = join(origin, e.name)
                    if p not in present:
                        out.deleted.append(p)
            except SourceError:
                continue
    return out


def _walk(txn: Txn, ino: int, path: bytes) -> Iterator[tuple[bytes, Inode]]:
    """(path, inode) of everything under directory `ino`, not descending into UNLISTED
    ones; parents before children. A stack, not recursion: a tree thousands of
    directories deep must still roll back."""
    stack: list[tuple[int, bytes]] = [(ino, path)]
    while stack:
        d, dpath = stack.pop()
        subdirs: list[tuple[int, bytes]] = []
        for _, name, child in list(ns.entries(txn, d)):
            node = ns.get(txn, child)
            p = join(dpath, name)
            yield p, node
            if node.is_dir and node.stored:
                subdirs.append((child, p))
        stack.extend(reversed(subdirs))

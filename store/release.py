"""Releasing the Phase 3 data: what `points expire --yes` does once every
rollback point has expired.

"Deleting the Phase 3 data" means unlinking each Phase
3 file whose exact content is verifiably in the store: migrated, its store
content hashing to the blake3 recorded at migration, its Phase 3 copy hashing
to the same and unchanged since the point. It refuses everything (deletes
nothing) if any file is not migrated, any directory not imported, or `fsck
--deep` finds any problem; files it cannot vouch for (changed or deleted
through the mount, second names of hard links) and all directories are kept.
The store records the release first: rollback and healing from Phase 3 are
then refused.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field

from . import content
from .errors import PointRefused, SourceError
from .fsck import Checker
from .phase3 import Phase3Tree, split
from .points import Row, compare, expected_hash, released, rows
from .records import U64, Inode, Legacy
from .store import Store


@dataclass
class Release:
    deleted: int = 0
    deleted_bytes: int = 0
    kept: list[tuple[str, str]] = field(default_factory=list)  # path, why


def release_phase3(store: Store, tree: Phase3Tree, pid: int) -> Release:
    """Delete the Phase 3 files whose exact content is verifiably in the store.

    The caller has the writer lock (the store is not mounted), has checked that
    every point has expired, and has the operator's yes. This checks the rest and
    raises PointRefused, having deleted nothing, on any doubt."""
    if released(store):
        raise PointRefused("the Phase 3 data was already released")
    with store.backend.read() as txn:
        legacy_files, unlisted = 0, 0
        for k, v in txn.range("inodes", b""):
            node = Inode.unpack(U64.unpack(k)[0], v)
            if node.is_unlisted:
                unlisted += 1
            elif node.is_legacy:
                legacy_files += 1
    if legacy_files or unlisted:
        raise PointRefused(
            f"{legacy_files} files not migrated and {unlisted} directories not imported: "
            "run ferryfs migrate (or let the sweep finish) first; nothing deleted"
        )
    store.tree = tree
    report = Checker(store, deep=True, resume=False).run()  # the whole store, now
    if report.problems or report.partial:
        first = report.problems[0] if report.problems else None
        raise PointRefused(
            f"fsck --deep finds {len(report.problems)} problems"
            + (f" (first: {first.kind} {first.path}: {first.detail})" if first else "")
            + "; nothing deleted"
        )
    out = Release()
    doomed: list[tuple[bytes, Row]] = []
    with store.backend.read() as txn:
        named: set[bytes] = set()
        for k, v in txn.range("legacy", b""):
            ino, leg = U64.unpack(k)[0], Legacy.unpack(v)
            raw = txn.get("inodes", U64.pack(ino))
            held = Inode.unpack(ino, raw) if raw is not None else None
            if held is None or not held.is_reg:
                continue
            named.add(leg.path)
            known = expected_hash(txn, pid, leg)
            shown = "/" + os.fsdecode(leg.path)
            if known is None:
                out.kept.append((shown, "changed in Phase 3 before it was migrated"))
            elif held.changed and (
                held.size != leg.size or content.stored_hash(txn, ino) != leg.blake3
            ):
                out.kept.append((shown, "changed through the mount: Phase 3 holds the old version"))
            else:
                doomed.append((leg.path, known))
        for _k, path, r in rows(txn, pid):
            if stat.S_ISREG(r.mode) and path not in named:
                out.kept.append(("/" + os.fsdecode(path), "not in the store under this name"))
    # Recorded first: from here on rollback and healing from Phase 3 are refused.
    store.transact(lambda txn: txn.put("meta", b"phase3_released", U64.pack(time.time_ns())))
    for path, r in doomed:
        parts = split(path)
        try:
            dfd = tree.walk_to(parts[:-1])
        except SourceError as e:
            out.kept.append(("/" + os.fsdecode(path), f"cannot be reached ({e})"))
            continue
        try:
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or compare(r, st):
                out.kept.append(("/" + os.fsdecode(path), "changed since it was verified"))
                continue
            os.unlink(parts[-1], dir_fd=dfd)
            out.deleted += 1
            out.deleted_bytes += r.size
        except FileNotFoundError:
            pass
        finally:
            os.close(dfd)
    return out

"""Rollback points: the Phase 3 tree as it was, and how long it is kept.

A point is a record in the `points` db (id -> JSON: created, retention days).
Its manifest is the `legacy` db: the stat of every Phase 3 entry as first seen
(directories are imported before anything in them can change through the
mount, so that stat is always the untouched one), plus the blake3 of each file
once it is migrated. A million-file tree is a million small records, never one
value, and recording the point costs nothing at mount time.

`release_phase3` is what `expire --yes` does with the Phase 3 data of an expired
point: it deletes the Phase 3 files, and only when every one of them is
migrated and verified against its hash, the store is not mounted, and the
caller said yes. Afterwards the store records that its Phase 3 data is gone:
rollback and healing from Phase 3 are no longer possible.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass

from .errors import FerryError
from .kv import Txn
from .phase3 import Phase3Tree, _split
from .records import U64, Legacy
from .store import Store

DAY_NS = 86_400 * 10**9
DEFAULT_RETENTION_DAYS = 30


class PointError(FerryError):
    exit_code = 1


@dataclass
class Point:
    id: int
    created_ns: int
    retention_days: int

    @property
    def expires_ns(self) -> int:
        return self.created_ns + self.retention_days * DAY_NS

    def expired(self, now_ns: int | None = None) -> bool:
        return (now_ns or time.time_ns()) >= self.expires_ns


def _read(txn: Txn) -> list[Point]:
    out = []
    for k, v in txn.range("points", b""):
        d = json.loads(bytes(v))
        out.append(Point(U64.unpack(k)[0], d["created_ns"], d["retention_days"]))
    return out


def list_points(store: Store) -> list[Point]:
    with store.backend.read() as txn:
        return _read(txn)


def ensure_first_point(store: Store, retention_days: int = DEFAULT_RETENTION_DAYS) -> Point:
    """The store's first rollback point, made now if it has none."""

    def op(txn: Txn) -> Point:
        pts = _read(txn)
        if pts:
            return pts[0]
        p = Point(1, time.time_ns(), retention_days)
        txn.put(
            "points",
            U64.pack(p.id),
            json.dumps({"created_ns": p.created_ns, "retention_days": p.retention_days}).encode(),
        )
        return p

    return store._write(op)


def delete_point(store: Store, point_id: int) -> None:
    if not store._write(lambda txn: txn.delete("points", U64.pack(point_id))):
        raise PointError(f"no rollback point {point_id}")


def manifest(store: Store) -> list[tuple[int, Legacy]]:
    with store.backend.read() as txn:
        return [(U64.unpack(k)[0], Legacy.unpack(v)) for k, v in txn.range("legacy", b"")]


def drifted(store: Store, tree: Phase3Tree, deep: bool) -> list[tuple[str, str]]:
    """(path, how) of each Phase 3 file that no longer matches the manifest."""
    from .fsck import phase3_drift

    out = []
    for ino, leg in manifest(store):
        node_is_dir = stat.S_ISDIR(store.getattr(ino).mode) if _exists(store, ino) else False
        if node_is_dir or (not leg.path and not leg.size):
            continue
        how = phase3_drift(tree, leg, deep)
        if how:
            out.append(("/" + os.fsdecode(leg.path), how))
    return out


def _exists(store: Store, ino: int) -> bool:
    with store.backend.read() as txn:
        return txn.get("inodes", U64.pack(ino)) is not None


def released(store: Store) -> bool:
    with store.backend.read() as txn:
        return txn.get("meta", b"phase3_released") is not None


def release_phase3(store: Store, tree: Phase3Tree) -> int:
    """Delete the Phase 3 files of a fully migrated, verified store. Returns the count.

    The caller has checked the point expired, has the writer lock (not mounted) and
    has the operator's yes; this checks the rest and refuses on any doubt."""
    from .fsck import Checker

    s = store.stats()
    if s.files_legacy or s.dirs_listed != s.dirs_total:
        raise PointError(
            f"{s.files_legacy} files not migrated and {s.dirs_total - s.dirs_listed} "
            "directories not listed: run ferryfs migrate first"
        )
    report = Checker(store, deep=True).run()
    if report.problems:
        raise PointError(
            f"fsck --deep finds {len(report.problems)} problems (first: "
            f"{report.problems[0].kind} {report.problems[0].path}); nothing deleted"
        )
    files = [leg for ino, leg in manifest(store) if leg.hashed]
    n = 0
    for leg in files:
        parts = _split(leg.path)
        dfd = tree._walk_to(parts[:-1])
        try:
            os.unlink(parts[-1], dir_fd=dfd)
            n += 1
        except FileNotFoundError:
            pass
        finally:
            os.close(dfd)
    store._write(lambda txn: txn.put("meta", b"phase3_released", U64.pack(time.time_ns())))
    return n

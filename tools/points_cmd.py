"""Rollback points: create, list, verify [--deep], delete, expire [--yes] (kept 30 days by default).

    ferryfs points create STORE [--name N] [--keep-days D]  a new point, kept D days
    ferryfs points list STORE [--json]                      names, creation and expiry
    ferryfs points verify STORE [ID] [--deep] [--json]      0 matches, 4 drifted, 8 cannot run
    ferryfs points delete STORE ID                          forgets the point; Phase 3 untouched
    ferryfs points expire STORE [--yes]

`expire` without --yes only says what it would do (exit 1). With --yes it
deletes the expired points and, once every point has expired, the Phase 3 files
whose content is verifiably in the store (see store/points.py): it refuses, and
deletes nothing, unless every file is migrated and `fsck --deep` is clean.
Rollback to Phase 3 is then no longer possible. Points may be given as `ID
STORE` too.

The first mount or migrate records the first point ("initial", 30 days).
`create` records another (the store unmounted, like delete and expire): the
Phase 3 tree is frozen, so what a new point adds is a longer promise, as the
Phase 3 data is released only once every point has expired. It refuses a tree
that drifted from the current point.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime

from ferryfs.store import points, release
from ferryfs.store.errors import CheckCannotRun, PointRefused, UsageError
from ferryfs.store.store import Store

from ._common import shown
from .daemons import phase3_of
from .progress import Bar

MATCHES, DRIFTED = 0, 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("create", "list", "verify", "delete", "expire"))
    p.add_argument("where", nargs="+", metavar="STORE [ID]", help="the store directory")
    p.add_argument("--deep", action="store_true", help="verify: compare contents too")
    p.add_argument("--yes", action="store_true", help="expire: really delete")
    p.add_argument("--json", action="store_true", help="list, verify: print as JSON")
    p.add_argument("--name", help="create: the point's name (default: its creation time)")
    p.add_argument(
        "--keep-days",
        type=int,
        default=points.DEFAULT_RETENTION_DAYS,
        help="create: days the point is kept (default %(default)s)",
    )


def _store_and_id(args: argparse.Namespace) -> tuple[str, int | None]:
    w = args.where
    if len(w) == 1:
        return w[0], None
    if len(w) == 2:
        a, b = w
        if a.isdigit() and not os.path.isdir(a):
            a, b = b, a
        if b.isdigit():
            return a, int(b)
    raise UsageError(f"points {args.action} takes STORE and at most one point ID")


def _when(ns: int, seconds: bool = False) -> str:
    fmt = "%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC"
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime(fmt)


def _create(store: Store, name: str, keep_days: int) -> int:
    tree = phase3_of(store)
    if tree is None:
        raise PointRefused(f"the Phase 3 tree ({store.source_path()}) cannot be reached")
    try:
        p = points.create_point(store, tree, name, keep_days)
    finally:
        tree.close()
    print(
        f"rollback point {p.id} {p.name!r}: {p.files} files, {p.nbytes / 1e6:.1f} MB, "
        f"kept until {_when(p.expires_ns)}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    store_dir, pid = _store_and_id(args)
    if args.action in ("list", "verify"):
        with Store.open(store_dir, readonly=True) as store:
            return _list(store, args) if args.action == "list" else _verify(store, pid, args)
    if args.action == "create":
        if pid is not None:
            raise UsageError("points create takes STORE only (the id is chosen for it)")
        # Checked before the store is opened: a bad argument is exit 2 even when mounted.
        name = args.name if args.name is not None else _when(time.time_ns(), seconds=True)
        points.check_point_args(name, args.keep_days)
    with Store.open(store_dir) as store:  # StoreLocked (exit 8) when mounted
        if args.action == "create":
            return _create(store, name, args.keep_days)
        if args.action == "delete":
            if pid is None:
                raise UsageError("points delete needs the point's id (see points list)")
            points.delete_point(store, pid)
            print(f"deleted rollback point {pid}; the Phase 3 tree is untouched")
            return 0
        return _expire(store, args)


def _list(store: Store, args: argparse.Namespace) -> int:
    now = time.time_ns()
    released = points.released(store)
    pts = points.list_points(store)
    rows = [
        {
            "id": p.id,
            "name": p.name,
            "created": _when(p.created_ns),
            "created_ns": p.created_ns,
            "retention_days": p.retention_days,
            "expires": _when(p.expires_ns),
            "expired": p.expired(now),
            "complete": p.complete,
            "entries": p.entries,
            "files": p.files,
            "bytes": p.nbytes,
            "phase3_released": released,
        }
        for p in pts
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    names = {p.id: p.name or "-" for p in pts}  # points from before names: "-"
    width = max((len(n) for n in names.values()), default=0)
    for p in pts:
        flags = ("  EXPIRED" if p.expired(now) else "") + (
            "" if p.complete else "  INCOMPLETE (recorded again on the next mount)"
        )
        print(
            f"{p.id:>3}  {names[p.id]:<{width}}  created {_when(p.created_ns)}  "
            f"expires {_when(p.expires_ns)} ({p.retention_days} days)  "
            f"{p.files} files, {p.nbytes / 1e6:.1f} MB{flags}"
        )
    if not pts:
        print("no rollback points")
    if released:
        print("the Phase 3 data was released by points expire: nothing to roll back to")
    return 0


def _verify(store: Store, pid: int | None, args: argparse.Namespace) -> int:
    if points.released(store):
        raise CheckCannotRun("the Phase 3 data was released by points expire: nothing to verify")
    if pid is None:
        with store.backend.read() as txn:
            cur = points.current(txn)
        if cur is None:
            raise CheckCannotRun("the store has no complete rollback point")
        pid = cur.id
    try:
        point = points.get_point(store, pid)
    except PointRefused as e:
        raise CheckCannotRun(str(e)) from None
    if not point.complete:
        raise CheckCannotRun(f"rollback point {pid} was never finished recording")
    tree = phase3_of(store)
    if tree is None:
        raise CheckCannotRun(f"the Phase 3 tree ({store.source_path()}) cannot be reached")
    try:
        with Bar("verifying", point.nbytes if args.deep else 0) as bar:
            drift, checked = points.verify(store, tree, pid, args.deep, progress=bar.advance)
    finally:
        tree.close()
    if args.json:
        print(
            json.dumps(
                {
                    "point": pid,
                    "deep": args.deep,
                    "checked": checked,
                    "matches": not drift,
                    "drifted": [{"path": d.shown, "how": d.how} for d in drift],
                }
            )
        )
    else:
        for d in drift:
            print(f"drifted  {shown(d.shown)}  {d.how}")
        print(
            f"the Phase 3 tree matches rollback point {pid} ({checked} entries"
            f"{', contents too' if args.deep else ''})"
            if not drift
            else f"{len(drift)} entries drifted from rollback point {pid}"
        )
    return MATCHES if not drift else DRIFTED


def _expire(store: Store, args: argparse.Namespace) -> int:
    now = time.time_ns()
    pts = points.list_points(store)
    expired = [p for p in pts if p.expired(now)]
    if not expired:
        print("no expired rollback points")
        return 0
    live = [p for p in pts if not p.expired(now)]
    releasing = not live and not points.released(store)
    if not args.yes:
        what = f"delete {len(expired)} expired points" + (
            " and the Phase 3 files whose content is verifiably in the store "
            "(only if every file is migrated and fsck --deep is clean)"
            if releasing
            else ""
        )
        print(f"would {what}; rerun with --yes to do it")
        return 1
    if releasing:
        tree = store.tree
        if tree is None:
            raise PointRefused(
                f"the Phase 3 tree ({store.source_path()}) cannot be reached; nothing deleted"
            )
        with store.backend.read() as txn:
            cur = points.current(txn)
        if cur is None:
            raise PointRefused("no complete rollback point to verify against; nothing deleted")
        rel = release.release_phase3(store, tree, cur.id)
        for path, why in rel.kept:
            print(f"kept  {shown(path)}  {why}")
        print(
            f"deleted {rel.deleted} Phase 3 files ({rel.deleted_bytes / 1e6:.1f} MB, each "
            f"verified in the store); kept {len(rel.kept)} files and every directory"
        )
    elif live:
        print(f"the Phase 3 data is kept: point {live[0].id} has not expired")
    for p in expired:
        points.delete_point(store, p.id)
    print(f"deleted {len(expired)} expired rollback points")
    return 0

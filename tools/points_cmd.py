"""Rollback points: list, verify [--deep], delete, expire (retention 30 days by default).

`expire` deletes expired points; with `--yes` it also deletes their Phase 3 data
(the original files), and only when every file is migrated and `fsck --deep`
is clean. After that, rollback to Phase 3 is no longer possible.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime

from ferryfs.store import points
from ferryfs.store.errors import FerryError, StoreLocked, UsageError
from ferryfs.store.store import Store

from .fsck_cmd import phase3_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "verify", "delete", "expire"))
    p.add_argument("store", help="the store directory")
    p.add_argument("id", nargs="?", type=int, help="the point (delete)")
    p.add_argument("--deep", action="store_true", help="verify: compare contents too")
    p.add_argument("--yes", action="store_true", help="expire: delete Phase 3 data too")
    p.add_argument("--json", action="store_true", help="print as JSON")


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def run(args: argparse.Namespace) -> int:
    if args.action in ("list", "verify"):
        with Store.open(args.store, readonly=True) as store:
            return _list(store, args) if args.action == "list" else _verify(store, args)
    try:
        store = Store.open(args.store)
    except StoreLocked:
        raise FerryError(f"store {args.store} is mounted or in use; unmount it first") from None
    with store:
        if args.action == "delete":
            if args.id is None:
                raise UsageError("points delete needs the point's id (see points list)")
            points.delete_point(store, args.id)
            print(f"deleted rollback point {args.id} (the Phase 3 tree is untouched)")
            return 0
        return _expire(store, args)


def _list(store: Store, args: argparse.Namespace) -> int:
    pts = points.list_points(store)
    files = sum(1 for _, leg in points.manifest(store) if leg.size or leg.hashed)
    rows = [
        {
            "id": p.id,
            "created": _when(p.created_ns),
            "retention_days": p.retention_days,
            "expires": _when(p.expires_ns),
            "expired": p.expired(),
            "manifest_entries": files,
            "phase3_released": points.released(store),
        }
        for p in pts
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(
                f"{r['id']:>3}  created {r['created']}  expires {r['expires']}"
                f"{'  EXPIRED' if r['expired'] else ''}  {r['manifest_entries']} entries"
            )
        if not rows:
            print("no rollback points")
    return 0


def _verify(store: Store, args: argparse.Namespace) -> int:
    tree = phase3_of(store)
    if tree is None:
        raise FerryError("the Phase 3 tree cannot be reached to verify it")
    try:
        drift = points.drifted(store, tree, args.deep)
    finally:
        tree.close()
    if args.json:
        print(
            json.dumps({"matches": not drift, "drifted": [{"path": p, "how": h} for p, h in drift]})
        )
    else:
        for p, h in drift:
            print(f"drifted  {p}  {h}")
        print(
            "the Phase 3 tree matches the rollback point"
            if not drift
            else f"{len(drift)} files drifted from the rollback point"
        )
    return 0 if not drift else 4


def _expire(store: Store, args: argparse.Namespace) -> int:
    now = time.time_ns()
    expired = [p for p in points.list_points(store) if p.expired(now)]
    if not expired:
        print("no expired rollback points")
        return 0
    if not args.yes:
        print(
            f"{len(expired)} expired points; rerun with --yes to delete them and their "
            "Phase 3 data (only if everything is migrated and verified)"
        )
        return 1
    tree = store.tree
    if tree is None:
        raise FerryError("the Phase 3 tree cannot be reached")
    n = points.release_phase3(store, tree)
    for p in expired:
        points.delete_point(store, p.id)
    print(f"deleted {len(expired)} expired points and {n} Phase 3 files (all verified)")
    return 0

"""Check a store against its invariants (works beside a live mount); --repair fixes it.

Exit codes as e2fsck: 0 clean, 1 errors found and all repaired, 4 errors left,
8 could not run (bad arguments, --repair on a store in use, not a store,
another schema version).
"""

from __future__ import annotations

import argparse
import json
import sys

from ferryfs.store.errors import FerryError, StoreLocked
from ferryfs.store.fsck import Checker, Report, repair
from ferryfs.store.phase3 import Phase3Tree
from ferryfs.store.store import Store

from .mounts import control_get, is_ferryfs
from .progress import Bar

CLEAN, REPAIRED, LEFT, CANNOT = 0, 1, 4, 8


class CannotRun(FerryError):
    exit_code = CANNOT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="the store directory")
    p.add_argument(
        "--deep",
        action="store_true",
        help="also verify every chunk's hash, every unmodified file against "
        "Phase 3, and the Phase 3 tree against the rollback point",
    )
    p.add_argument("--repair", action="store_true", help="fix what can be (store not mounted)")
    p.add_argument("--yes", action="store_true", help="repair without asking")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--max-duration",
        type=float,
        metavar="SECONDS",
        help="stop at a safe point; the next run carries on",
    )


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except FerryError as e:
        if e.exit_code == CANNOT:
            raise
        raise CannotRun(str(e)) from None


def _run(args: argparse.Namespace) -> int:
    if args.max_duration is not None and args.max_duration <= 0:
        raise CannotRun("--max-duration must be positive")
    if args.repair:
        try:
            store = Store.open(args.store)
        except StoreLocked:
            raise CannotRun(
                f"store {args.store} is in use (mounted or migrating): --repair needs it "
                "unmounted; run fsck without --repair to check it live"
            ) from None
    else:
        store = Store.open(args.store, readonly=True)
        if args.deep:
            store.tree = phase3_of(store)
    with store:
        total = store.stats().bytes_compressed if args.deep else 0
        with Bar("checking", total) as bar:
            report = Checker(
                store, deep=args.deep, max_seconds=args.max_duration, progress=bar.advance
            ).run()
        # The figure that matters to an operator: file bytes verified per second.
        report.bytes_checked = store.stats().bytes_migrated if args.deep else 0
        found = len(report.problems)
        if found and args.repair:
            if not args.yes and not _confirm(found):
                print("ferryfs: nothing repaired", file=sys.stderr)
                return _print(args, report, LEFT)
            repair(store, report)
            after = Checker(store, deep=args.deep).run()
            code = REPAIRED if not after.problems else LEFT
            report.lost = sorted(set(report.lost) | {p.path for p in after.problems})
            return _print(args, report, code, after)
        return _print(args, report, LEFT if found else CLEAN)


def phase3_of(store: Store) -> Phase3Tree | None:
    """The store's Phase 3 tree, even when an in-place mount shadows it (through the
    daemon's directory fd); None if it cannot be reached."""
    src = store.source_path()
    if src is None:
        return None
    try:
        if is_ferryfs(src):
            fd = int(control_get(src, "srcfd"))
            return Phase3Tree.open(f"/proc/{int(control_get(src, 'pid'))}/fd/{fd}")
        return Phase3Tree.open(src)
    except (FerryError, OSError, ValueError):
        return None


def _confirm(n: int) -> bool:
    if not sys.stdin.isatty():
        raise CannotRun("--repair asks for confirmation: pass --yes when not on a terminal")
    return input(f"repair {n} problems? [y/N] ").strip().lower() in ("y", "yes")


def _print(args: argparse.Namespace, r: Report, code: int, after: Report | None = None) -> int:
    rate = r.bytes_checked / r.seconds / 1e6 if r.seconds else 0.0
    if args.json:
        print(
            json.dumps(
                {
                    "errors": len(r.problems),
                    "repaired": r.repaired,
                    "left": len(after.problems) if after is not None else len(r.problems),
                    "lost": r.lost,
                    "partial": r.partial,
                    "problems": [p.as_dict() for p in r.problems],
                    "chunks_checked": r.chunks_checked,
                    "bytes_checked": r.bytes_checked,
                    "seconds": round(r.seconds, 3),
                    "mb_per_s": round(rate, 1),
                    "exit_code": code,
                }
            )
        )
        return code
    for p in r.problems[:200]:
        print(f"{p.kind:24} {p.path or '-'}  {p.detail}")
    if len(r.problems) > 200:
        print(f"... and {len(r.problems) - 200} more (--json lists all)")
    deep = f"; {r.chunks_checked} chunks, {rate:.0f} MB/s" if r.chunks_checked else ""
    state = "partial (run again to carry on)" if r.partial else "done"
    print(f"fsck {state}: {len(r.problems)} problems{deep} in {r.seconds:.1f} s")
    if after is not None:
        print(f"repaired {r.repaired}; {len(after.problems)} left")
        for path in r.lost:
            print(f"could not save {path}")
    return code

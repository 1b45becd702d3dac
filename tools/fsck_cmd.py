"""Check a store against its invariants (works beside a live mount); --repair fixes it.

Exit codes as e2fsck: 0 clean, 1 errors found and all repaired, 4 errors left,
8 could not run (bad arguments, --repair on a store in use, --repair with no
terminal to ask and no --yes, not a store, another schema version).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ferryfs.store.errors import CheckCannotRun, FerryError, StoreDamaged, StoreLocked
from ferryfs.store.fsck import Checker, Problem, Report
from ferryfs.store.fsck_repair import defuse_orphan_marks, hold_writer_lock, repair
from ferryfs.store.store import Store

from ._common import confirm, shown
from .daemons import phase3_of
from .progress import Bar

CLEAN, REPAIRED, LEFT, CANNOT = 0, 1, 4, 8
SHOWN = 200  # problems printed as text (--json lists all)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="the store directory")
    p.add_argument(
        "--deep",
        action="store_true",
        help="also decode and hash every chunk, every unmodified file against its "
        "Phase 3 hash, and Phase 3's files against the rollback point by content",
    )
    p.add_argument("--repair", action="store_true", help="fix what can be (store not mounted)")
    p.add_argument("--yes", action="store_true", help="repair without asking")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--max-duration",
        type=float,
        metavar="SECONDS",
        help="stop at a safe point after about this long; the next run carries on",
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="--deep threads")


class DamageLeft(FerryError):
    """The database itself is damaged: errors left, whatever else fsck could do."""

    exit_code = LEFT


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except StoreDamaged as e:
        raise DamageLeft(str(e)) from None
    except FerryError as e:
        if e.exit_code in (CANNOT, LEFT):
            raise
        raise CheckCannotRun(str(e)) from None
    except Exception as e:  # never a traceback, never "clean" or "repaired"
        # Damage LMDB let through as garbage the checks did not foresee: whatever it
        # is, the store is not known to be good.
        raise DamageLeft(
            f"fsck stopped on damage it cannot check past ({type(e).__name__}: {e}); "
            f"the store's database is damaged: {StoreDamaged.advice}"
        ) from None


def _run(args: argparse.Namespace) -> int:
    if args.max_duration is not None and args.max_duration <= 0:
        raise CheckCannotRun("--max-duration must be a positive number of seconds")
    if args.jobs < 1:
        raise CheckCannotRun("--jobs must be at least 1")
    if args.repair and args.max_duration is not None:
        raise CheckCannotRun("--repair checks the whole store: drop --max-duration")
    if args.repair and not args.yes and not sys.stdin.isatty():
        raise CheckCannotRun("--repair asks first: pass --yes when not on a terminal")
    # --repair holds the writer lock from the check to the repair, so it repairs
    # exactly what it found and asked about.
    held = hold_writer_lock(args.store) if args.repair else None
    try:
        # verify: every page in use checked before LMDB reads one it may abort on
        with Store.open(args.store, readonly=True, verify=True) as store:
            store.tree = phase3_of(store)
            total = 2 * store.stats().bytes_migrated if args.deep else 0
            with Bar("checking", total) as bar:
                report = Checker(
                    store,
                    deep=args.deep,
                    max_seconds=args.max_duration,
                    progress=bar.advance,
                    jobs=args.jobs,
                    resume=not args.repair,
                ).run()
        fixable = [p for p in report.problems if p.repairable]
        if not args.repair or not report.problems:
            return _print(args, report, LEFT if report.problems else CLEAN)
        if not fixable:  # nothing to do: say what is lost
            lost = sorted({p.path for p in report.problems if _is_file_damage(p)})
            return _print(args, report, LEFT, report, 0, lost)
        if not args.yes and not _ask_repair(len(fixable), len(report.problems)):
            print("ferryfs: nothing repaired", file=sys.stderr)
            return _print(args, report, LEFT)
        if held is not None:
            defuse_orphan_marks(held)  # before a writer's open purges marked inodes
    finally:
        if held is not None:
            held.close()
    try:
        store = Store.open(args.store)
    except StoreLocked:  # taken in the instant between
        raise CheckCannotRun(
            f"store {args.store} was opened by another process: try again"
        ) from None
    with store:
        lost = repair(store, report)
        after = Checker(store, deep=args.deep, jobs=args.jobs, resume=False).run()
    left = {p.ident() for p in after.problems}
    repaired = sum(p.ident() not in left for p in report.problems)
    lost = sorted(set(lost) | {p.path for p in after.problems if _is_file_damage(p)})
    code = REPAIRED if not after.problems else LEFT
    return _print(args, report, code, after, repaired, lost)


def _is_file_damage(p: Problem) -> bool:
    return bool(p.path) and p.kind in (
        "corrupt-chunk",
        "missing-chunk",
        "content-differs",
        "extent-gap",
        "extent-overlap",
        "extents-past-end",
    )


def _ask_repair(fixable: int, found: int) -> bool:
    more = f" ({found - fixable} more cannot be)" if found > fixable else ""
    return confirm(f"repair {fixable} problems{more}? [y/N] ")


def _rates(r: Report) -> tuple[float, float]:
    """MB/s of file content verified, and of bytes read and hashed (store + Phase 3)."""
    if not r.seconds:
        return 0.0, 0.0
    return r.file_bytes / r.seconds / 1e6, (r.store_bytes + r.phase3_bytes) / r.seconds / 1e6


def _print(
    args: argparse.Namespace,
    r: Report,
    code: int,
    after: Report | None = None,
    repaired: int = 0,
    lost: list[str] | None = None,
) -> int:
    files_rate, read_rate = _rates(r)
    left = after.problems if after is not None else r.problems
    if args.json:
        doc: dict[str, object] = {
            "errors": len(r.problems),
            "repaired": repaired,
            "left": len(left),
            "lost": lost or [],
            "partial": r.partial,
            "problems": [p.as_dict() for p in r.problems],
            "notes": r.notes,
            "point": r.point,
            "files_checked": r.files_checked,
            "chunks_checked": r.chunks_checked,
            "rows_checked": r.rows_checked,
            "file_bytes": r.file_bytes,
            "store_bytes": r.store_bytes,
            "phase3_bytes": r.phase3_bytes,
            "seconds": round(r.seconds, 3),
            "mb_per_s": round(files_rate, 1),
            "read_mb_per_s": round(read_rate, 1),
            "exit_code": code,
        }
        if after is not None:
            doc["remaining"] = [p.as_dict() for p in after.problems]
        print(json.dumps(doc))
        return code
    for p in r.problems[:SHOWN]:
        fix = "" if p.repairable else "  (cannot be repaired)"
        print(f"{p.kind:26} {shown(p.path) or '-'}  {shown(p.detail)}{fix}")
    if len(r.problems) > SHOWN:
        print(f"... and {len(r.problems) - SHOWN} more (--json lists all)")
    for note in r.notes:
        print(f"note: {shown(note)}")
    deep = ""
    if args.deep:
        deep = (
            f"; {r.file_bytes / 1e6:.1f} MB of files verified ({files_rate:.0f} MB/s), "
            f"{(r.store_bytes + r.phase3_bytes) / 1e6:.1f} MB read and hashed "
            f"({read_rate:.0f} MB/s), {r.chunks_checked} chunks outside those files checked"
        )
    state = "stopped at --max-duration (run again to carry on)" if r.partial else "done"
    fixable = sum(p.repairable for p in r.problems)
    print(
        f"fsck {state}: {len(r.problems)} problems ({fixable} repairable) "
        f"in {r.seconds:.1f} s{deep}"
    )
    if after is not None:
        print(f"repaired {repaired}; {len(after.problems)} left")
        for p in after.problems[:SHOWN]:
            print(f"left: {p.kind:26} {shown(p.path) or '-'}  {shown(p.detail)}")
        for path in lost or []:
            print(f"could not save {shown(path)}")
    return code

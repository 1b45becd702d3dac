"""Recompress the chunks of cold files (not modified for --cold-days) at a high zstd
level with the store's trained dictionary (the report's Step 4). The store must not
be mounted: a mount does this itself when its sweep is idle. Resumable: stopped or
killed, the next run carries on where it was."""

from __future__ import annotations

import argparse
import json

from ferryfs.store import recompress, upkeep
from ferryfs.store.errors import UsageError
from ferryfs.store.store import Store

from ._common import mb
from .progress import Bar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="the store directory (not mounted)")
    p.add_argument(
        "--cold-days",
        type=float,
        default=recompress.COLD_DAYS,
        help=f"files unmodified for this many days are cold (default {recompress.COLD_DAYS})",
    )
    p.add_argument(
        "--level",
        type=int,
        default=recompress.LEVEL,
        help=f"zstd level for cold chunks (default {recompress.LEVEL})",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="count what would be done; change nothing"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    if args.cold_days < 0:
        raise UsageError("--cold-days must be 0 or more")
    if not 1 <= args.level <= 22:
        raise UsageError("--level must be between 1 and 22")
    with Store.open(args.store, readonly=args.dry_run) as store:
        # Plain bytes of the cold files, as a mount's status counts them (recompress.py):
        # the total is known once the walk has found the cold files.
        with Bar("recompressing", 0) as bar:

            def progress(r: recompress.Result) -> None:
                bar.update(r.bytes_walked, r.bytes_total)

            r = recompress.run(
                store, args.cold_days, args.level, dry_run=args.dry_run, progress=progress
            )
        if not args.dry_run:
            upkeep.compact(store)  # the packs the old records leave mostly dead
            upkeep.shrink_file(store)  # and LMDB keeps their pages: give them back
    with Store.open(args.store, readonly=True) as store:
        stats = store.stats()
    if args.json:
        print(json.dumps({**r.as_dict(), "bytes_stored": stats.bytes_stored}))
        return 0
    verb = "would recompress" if args.dry_run else "recompressed"
    print(
        f"{r.files_cold} cold files, {r.files_hot} hot; {verb} {r.chunks_recompressed} chunks "
        f"({mb(r.bytes_plain)} plain, {mb(r.bytes_before)} -> {mb(r.bytes_after)}); "
        f"{r.chunks_already} cold already; {r.seconds:.1f} s; "
        f"store {mb(stats.bytes_stored)} on disk"
    )
    return 0

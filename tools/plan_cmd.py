"""Estimate a migration (files, bytes, dedup and compression, time, disk) and write nothing.

Walks SRC without following symlinks, samples up to --sample-mb of its files
through the same chunking, hashing and compression as `ferryfs migrate`, and
compares the disk the store would need with the free space where it would go
(`SRC.ferry` beside SRC unless --store says otherwise). Exit 0 even when the
store would not fit: the report says so (`fits` in --json).
"""

from __future__ import annotations

import argparse
import json

from . import planner


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the Phase 3 tree")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument(
        "--sample-mb",
        type=float,
        default=planner.DEFAULT_SAMPLE_BYTES / 1e6,
        help="content to read for the estimate, in MB (default: %(default)g)",
    )
    p.add_argument("--store", help="where the store would go (default: SRC.ferry beside SRC)")


def run(args: argparse.Namespace) -> int:
    p = planner.plan(args.src, round(args.sample_mb * 1e6), store=args.store)
    if args.json:
        print(json.dumps(p.as_json()))
        return 0
    for key, value in rows(p):
        print(f"{key:<12}  {value}")
    return 0


def rows(p: planner.Plan) -> list[tuple[str, str]]:
    """The human report, one (label, value) pair per line."""
    sampled = p.sampled_bytes / p.bytes if p.bytes else 1.0
    note = "" if sampled >= 0.999 else " (lower bound: dedup with unsampled files unseen)"
    # Saved means what `status` and `stats` mean by it: 1 - bytes on disk / bytes,
    # so the estimate of the whole store (records too), not of the chunks alone.
    saved = 1 - p.disk_needed / p.bytes if p.bytes else 0.0
    verdict = "fits" if p.fits else "DOES NOT FIT: free space or pick another --store"
    other = [
        (
            "not crossed",
            f"{len(p.other_filesystems)} other filesystem(s) mounted inside, shown empty: "
            + ", ".join(p.other_filesystems[:5])
            + (", ..." if len(p.other_filesystems) > 5 else ""),
        )
    ]
    return [
        ("files", f"{p.files:,} in {p.dirs:,} directories, {_size(p.bytes)}"),
        *(other if p.other_filesystems else []),
        (
            "skipped",
            f"{p.symlinks:,} symlinks, {p.special:,} special, {p.unreadable:,} unreadable",
        ),
        ("sampled", f"{p.sampled_files:,} files, {_size(p.sampled_bytes)} ({sampled:.0%})"),
        ("dedup", f"{p.dedup_ratio:.2f}x{note}"),
        ("compression", f"{p.compression_ratio:.2f}x (zstd 3, unique chunks)"),
        ("chunks", f"about {_size(p.est_stored_bytes)} after dedup and compression"),
        ("saved", f"about {max(0.0, saved):.0%} (about {_size(p.disk_needed)} on disk)"),
        ("time", f"about {_duration(p.est_seconds)} with {p.jobs} jobs"),
        ("disk needed", f"{_size(p.disk_needed)} of {_size(p.disk_free)} free: {verdict}"),
        ("store", p.store),
    ]


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"

"""Write a realistic sample Phase 3 tree (sessions and attachments) into an empty directory.

The same --seed gives the same files, byte for byte; see ferryfs.tools.sampletree
for what the tree contains.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from ferryfs.store.errors import UsageError
from ferryfs.tools.sampletree import generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", type=Path, help="new or empty directory to fill")
    parser.add_argument(
        "--sessions", type=int, default=200, metavar="N", help="session logs (default 200)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument(
        "--attachment-mb",
        type=float,
        default=None,
        metavar="M",
        help="scale attachments to about M megabytes in all (default: about 0.1 MB a session)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    root: Path = args.dir
    if args.sessions < 0:
        raise UsageError(f"--sessions must be 0 or more, not {args.sessions}")
    if args.attachment_mb is not None and not args.attachment_mb >= 0:
        raise UsageError(f"--attachment-mb must be 0 or more, not {args.attachment_mb}")
    if root.exists() or root.is_symlink():
        if not root.is_dir():
            raise UsageError(f"{root} exists and is not a directory; give a new or empty one")
        with os.scandir(root) as entries:
            if any(True for _ in entries):
                raise UsageError(f"{root} is not empty; give a new or empty directory")

    start = time.monotonic()
    summary = generate(root, args.sessions, args.seed, args.attachment_mb)
    seconds = time.monotonic() - start
    if args.json:
        print(json.dumps({"dir": str(root), **asdict(summary), "seconds": round(seconds, 3)}))
    else:
        print(
            f"wrote {summary.files} files, {summary.bytes / 1e6:.1f} MB in {root} "
            f"({summary.sessions} sessions, {summary.resumed} resumed; "
            f"{summary.attachments} attachments, {summary.duplicate_attachments} duplicates) "
            f"in {seconds:.1f} s"
        )
    return 0

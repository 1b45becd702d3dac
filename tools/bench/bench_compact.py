"""The benchmark's `compact` section (issue 14's compaction target): after deleting
half the files through a live mount and letting it go idle, stored bytes fall to
within 10% of a fresh migrate of what is left.

For each tree (a sample tree of at most SAMPLE_MB, and the small-file tree of
bench_smalltree.py at SMALL_SCALE): mount it with a fresh store, wait for the
sweep to migrate everything and settle (`status`: done), delete every other
regular file (in path order) through the mount, wait for the idle upkeep to run
out of work again (`sweep_idle_rounds` moves on, state done: packs compacted,
cold chunks recompressed, LMDB's free pages punched out: store/reclaim.py), then
unmount and `du -B1` the store. Against: a fresh `ferryfs migrate` (with the
index, as the mount builds it) of a hard-linked copy of what is left, then
`ferryfs recompress --cold-days 30`, since the mount's idle upkeep recompresses
files untouched for 30 days too (without it the two stores would differ by
compression level, not by compaction).

What else stands between the two is shown part by part: each LMDB database's
pages, the free pages still holding disk, the search index, the daemon's log.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
from bench_common import (
    check,
    disk_usage,
    ferryfs_command,
    fresh,
    markdown_table,
    sample_tree,
    tree_size,
    verdict,
)
from bench_mounts import ferryfs_mount
from bench_smalltree import small_tree
from ferryfs.store import lmdbfile, reclaim
from ferryfs.store.kv import DBS
from ferryfs.tools.mounts import status

SAMPLE_MB = 40.0  # the section's own sample tree: the mount's sweep and recompression take time
SMALL_SCALE = 0.05  # of the small-file tree: 1,000 sessions and 5% of /usr/share/doc
QUICK_SCALE = 0.02
MOUNT_FLAGS = ("--idle-ms", "200", "--max-load", "99")
SETTLE_SECONDS = 1200.0
TARGET = 1.10


@dataclass
class Parts:
    """Where a store's bytes on disk are."""

    total: int = 0
    db: int = 0
    index: int = 0
    other: int = 0  # the daemon's log, lock files
    dbs: dict[str, int] = field(default_factory=dict)  # pages in use, by database
    free_held: int = 0  # free LMDB pages still holding disk


@dataclass
class Row:
    tree: str
    files: int = 0
    left_files: int = 0
    left_bytes: int = 0
    migrated: int = 0
    live: Parts = field(default_factory=Parts)
    fresh: Parts = field(default_factory=Parts)
    settle_s: float = 0.0
    reclaimed: int = 0
    error: str = ""


def parts(store: Path) -> Parts:
    p = Parts(total=disk_usage(store))
    db = store / "db"
    p.db = disk_usage(db)
    index = store / "index"
    p.index = disk_usage(index) if index.exists() else 0
    p.other = p.total - p.db - p.index
    env = lmdb.open(str(db), readonly=True, lock=False, max_dbs=len(DBS) + 1)
    try:
        with env.begin() as txn:
            main = txn.stat(env.open_db(None))
            psize = main["psize"]
            p.dbs["(main)"] = psize * (main["branch_pages"] + main["leaf_pages"])
            for name in DBS:
                try:
                    h = env.open_db(name.encode(), txn=txn, create=False)
                except lmdb.NotFoundError:
                    continue
                st = txn.stat(h)
                p.dbs[name] = psize * (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"])
    finally:
        env.close()
    fd = os.open(db / "data.mdb", os.O_RDONLY)
    try:
        new = lmdbfile.metas(fd, psize)[-1]
        for pages in lmdbfile.free_records(fd, psize, new).values():
            for pg in pages:
                p.free_held += reclaim.data_bytes(fd, pg * psize, (pg + 1) * psize)
    finally:
        os.close(fd)
    return p


def regular_files(tree: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, names in os.walk(tree):
        for name in names:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out.append(p.relative_to(tree))
    return sorted(out)


def settle(mnt: Path, after: int) -> dict[str, object]:
    """Wait until the sweep's idle upkeep has run out of work after round `after`."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        s = status(str(mnt))
        if s["sweep_state"] == "done" and int(s.get("sweep_idle_rounds", 0)) > after:
            return s
        time.sleep(0.2)
    raise TimeoutError(f"the mount's sweep did not settle in {SETTLE_SECONDS:.0f} s")


def measure(name: str, tree: Path, work: Path) -> Row:
    row = Row(name)
    tag = name.split()[0]
    files = regular_files(tree)
    gone, left = files[::2], files[1::2]
    row.files, row.left_files = len(files), len(left)
    row.left_bytes = sum((tree / p).stat().st_size for p in left)
    try:
        store = fresh(work / f"compact-{tag}.ferry")
        mnt = work / f"compact-{tag}.mnt"
        with ferryfs_mount(tree, mnt, store, MOUNT_FLAGS):
            s = settle(mnt, 0)
            row.migrated = disk_usage(store)
            rounds = int(s["sweep_idle_rounds"])  # type: ignore[call-overload]
            t0 = time.monotonic()
            for rel in gone:
                os.unlink(mnt / rel)
            s = settle(mnt, rounds)
            row.settle_s = time.monotonic() - t0
            row.reclaimed = int(s.get("reclaimed_bytes", 0))  # type: ignore[call-overload]
        row.live = parts(store)
        copy = fresh(work / f"compact-{tag}-left")
        for rel in left:
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(tree / rel, copy / rel)
        again = fresh(work / f"compact-{tag}-fresh.ferry")
        cmd = ferryfs_command()
        check([*cmd, "migrate", str(copy), "--store", str(again)], work / f"compact-{tag}-m.log")
        check(
            [*cmd, "recompress", str(again), "--cold-days", "30"],
            work / f"compact-{tag}-r.log",
        )
        row.fresh = parts(again)
    except (subprocess.SubprocessError, OSError, Exception) as e:  # a failed row, not a crash
        row.error = str(e).splitlines()[0] if str(e) else type(e).__name__
    return row


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def compact_section(out: Path, work: Path, tree: Path, quick: bool) -> list[str]:
    """`tree`: the run's sample tree, used as it is with --quick (20 MB)."""
    load = os.getloadavg()[0]
    sample = tree if quick else sample_tree(out, SAMPLE_MB)
    scale = QUICK_SCALE if quick else SMALL_SCALE
    trees = [
        (f"sample tree ({tree_size(sample)[1] / 1e6:.0f} MB)", sample),
        (f"small files (scale {scale:g})", small_tree(out, scale)[0]),
    ]
    rows = [measure(name, t, work) for name, t in trees]
    ok_rows = [r for r in rows if not r.error]
    table = markdown_table(
        [
            "tree",
            "files",
            "left MB",
            "migrated MB",
            "after delete + idle MB (db)",
            "fresh migrate of the rest MB (db)",
            "live/fresh",
            "punched MB (all rounds)",
            "settle s",
        ],
        [
            [r.tree, f"{r.files:,}", "failed: " + r.error, "", "", "", "", "", ""]
            if r.error
            else [
                r.tree,
                f"{r.files:,}",
                mb(r.left_bytes),
                mb(r.migrated),
                f"{mb(r.live.total)} ({mb(r.live.db)})",
                f"{mb(r.fresh.total)} ({mb(r.fresh.db)})",
                f"{r.live.total / r.fresh.total:.2f}",
                mb(r.reclaimed),
                f"{r.settle_s:.1f}",
            ]
            for r in rows
        ],
    )
    lines = [
        f"Stored bytes (du -B1 of the store directory; the database alone in brackets)"
        f" after deleting half the files through a live mount and letting it go idle,"
        f" against a fresh migrate of what is left; load average {load:.1f} before,"
        f" {os.getloadavg()[0]:.1f} after.",
        "",
        table,
        "",
        f"- live: `ferryfs mount SRC MNT --store S {' '.join(MOUNT_FLAGS)}`, wait for"
        " `status` done, delete every other file through MNT, wait until the idle upkeep"
        " is done again, `ferryfs umount MNT`",
        "- fresh: `ferryfs migrate LEFT --store F && ferryfs recompress F --cold-days 30`"
        " (LEFT: hard links of the files left; the mount's idle upkeep recompresses"
        " 30-day-cold files too)",
        "",
        "Where the bytes are (MB; LMDB databases by pages in use):",
        "",
    ]
    for r in ok_rows:
        names = [n for n in ("(main)", *DBS) if r.live.dbs.get(n) or r.fresh.dbs.get(n)]
        lines.append(f"{r.tree}:")
        lines.append("")
        lines.append(
            markdown_table(
                ["part", "live", "fresh", "live - fresh"],
                [
                    [label, mb(a), mb(b), mb(a - b)]
                    for label, a, b in [
                        ("total", r.live.total, r.fresh.total),
                        ("search index", r.live.index, r.fresh.index),
                        ("other files (daemon.log, locks)", r.live.other, r.fresh.other),
                        ("database file", r.live.db, r.fresh.db),
                        ("free pages still on disk", r.live.free_held, r.fresh.free_held),
                        *[(f"db {n}", r.live.dbs.get(n, 0), r.fresh.dbs.get(n, 0)) for n in names],
                    ]
                ],
            )
        )
        lines.append("")
    lines.append("Target:")
    lines.append("")
    for r in rows:
        if r.error or not r.fresh.total:
            lines.append(f"- {r.tree}: n/a (a run failed)")
            continue
        ratio = r.live.total / r.fresh.total
        lines.append(
            f"- {r.tree}, after delete + idle <= 1.10x a fresh migrate of the rest:"
            f" {verdict(ratio <= TARGET, ratio, 'x fresh')}"
        )
    return lines

"""The small-file table (issue 15): ferryfs on a tree of many small files
(bench_smalltree.py: 20,000 sessions of 2-60 KB and a copy of /usr/share/doc)
beside restic and borg, in the same run.

Reuses the other sections' measured tools: `ferryfs migrate`, `borg create`
and `restic backup` from bench_migrate (rounds, medians), the sweep from
bench_sweep (mount, poll status until done), and the read targets of
bench_read (`borg mount`, ferryfs after migration, ferryfs before migration:
a fresh store, `--no-sweep`, every first open the lazy path). Rows:

- migrate: wall time and files/s against restic backup (target >= 1.0x);
- sweep, mounted and left alone, against offline migrate (>= 0.8x);
- every file read once, cold, through ferryfs before migration (the lazy first
  read) against borg mount cold (<= 1.5x), and after migration (<= 1.0x);
- peak RSS of migrate (< 200 MB), and on a quarter of the tree (flat).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from bench_common import (
    Result,
    bench_ferryfs,
    drop_caches,
    fresh,
    markdown_table,
    verdict,
)
from bench_migrate import (
    INGEST_BOTH,
    RSS_FLAT,
    RSS_LIMIT,
    Job,
    ingest_table,
    run_jobs,
    speed_lines,
)
from bench_read import (
    ReadRow,
    ReadTree,
    Target,
    View,
    borg,
    ferryfs_after,
    ferryfs_lazy,
    plain,
    read_files,
    read_rounds,
    wait_migrated,
)
from bench_smalltree import small_tree
from bench_sweep import SweepRow, run_sweeps, sweep_table

QUICK_SCALE = 0.1


READ_TARGETS: list[tuple[str, str, Target]] = [
    ("plain tree", "", plain),
    ("borg mount", "", borg),
    ("ferryfs after migration", "", ferryfs_after),
    ("ferryfs before migration (lazy)", "", ferryfs_lazy),
]


def _files(root: Path) -> tuple[tuple[bytes, ...], int]:
    base = os.fsencode(root)
    rels, total = [], 0
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_mode & 0o170000 == 0o100000:
                rels.append(os.path.relpath(os.path.join(dirpath, name), base))
                total += st.st_size
    return tuple(sorted(rels)), total


def _read_pass(tree: ReadTree, view: View) -> dict[str, float]:
    drop_caches()
    start = time.perf_counter()
    t = {"all_cold": read_files(view.root, tree.files, tree.nbytes)}
    if view.lazy and view.ferryfs is not None:
        t["all_migrated"] = wait_migrated(view.ferryfs, 0) - start
    return t


def read_table(rows: Sequence[ReadRow], nbytes: int, files: int) -> str:
    headers = ["target", "read all cold s", "MB/s", "files/s", "all migrated at s"]
    out = []
    for r in rows:
        if r.error:
            out.append([r.target, f"failed: {r.error}", "", "", ""])
            continue
        s, m = r.median("all_cold") or 0.0, r.median("all_migrated")
        out.append(
            [
                r.target,
                f"{s:.2f}",
                f"{nbytes / 1e6 / s:.1f}" if s else "-",
                f"{files / s:,.0f}" if s else "-",
                f"{m:.2f}" if m is not None else "-",
            ]
        )
    return markdown_table(headers, out)


def small_section(out: Path, work: Path, quick: bool, repeat: int, scale: float) -> list[str]:
    """Build the trees, run the rounds; the section's markdown lines."""
    scale = min(scale, QUICK_SCALE) if quick else scale
    root, summary = small_tree(out, scale)
    quarter, _ = small_tree(out, scale / 4)
    swork = work / "small"
    swork.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    ingest = run_jobs([Job(name, fn, root) for name, fn in INGEST_BOTH], swork, repeat)
    fresh(swork / "ferryfs-noindex.store")
    after = fresh(swork / "after.store")
    if (swork / "ferryfs.store").is_dir():  # the last round's: the store the reads mount
        (swork / "ferryfs.store").rename(after)
    (small,) = run_jobs([Job("ferryfs migrate", bench_ferryfs, quarter)], swork, repeat)
    files, nbytes = _files(root)
    tree = ReadTree(root, files, nbytes, b"", 0)
    reads = read_rounds(tree, swork, repeat, READ_TARGETS, _read_pass, "small-file reads")
    load_mid = os.getloadavg()[0]
    sweeps = run_sweeps(root, swork, repeat)
    fresh(after)
    return [
        f"Small-file tree: {summary.files:,} files, {summary.bytes / 1e6:.1f} MB"
        f" ({summary.sessions:,} sessions of 2-60 KB, {summary.session_bytes / 1e6:.1f} MB;"
        f" {summary.doc_files:,} files of /usr/share/doc, {summary.doc_bytes / 1e6:.1f} MB;"
        f" {summary.dirs:,} directories; bench_smalltree scale {scale:g}); each row the median"
        f" of {repeat} round(s); load average {load:.1f} before, {load_mid:.1f} midway,"
        f" {os.getloadavg()[0]:.1f} after.",
        "",
        ingest_table(ingest),
        "",
        f"- ferryfs migrate of a quarter of the tree ({small.files:,} files):"
        + (
            f" {small.seconds:.2f} s, peak RSS {small.peak_rss / 2**20:.0f} MB"
            if small.ok
            else f" failed: {small.error}"
        ),
        "",
        read_table(reads, nbytes, len(files)),
        "",
        sweep_table(sweeps, len(files), nbytes),
        "",
        "Small-file targets:",
        "",
        *target_lines(ingest, small, reads, sweeps),
    ]


def target_lines(
    ingest: Sequence[Result], small: Result, reads: Sequence[ReadRow], sweeps: Sequence[SweepRow]
) -> list[str]:
    """One line per target of issue 15's small-file table, PASS or SHORT."""
    by = {r.tool: r for r in ingest}
    lines = speed_lines(ingest)
    ferry = by.get("ferryfs migrate")
    migrate, *runs = sweeps
    ran = [r for r in runs if not r.error and r.runs]
    if not migrate.error and migrate.runs and ran:
        sweep = ran[0]
        ratio = migrate.median() / sweep.median()
        lines.append(
            f"- sweep >= 0.8x migrate's speed: {verdict(ratio >= 0.8, ratio, 'sweep/migrate')}"
            + ("" if sweep is runs[0] else f" ({sweep.name}: the default sweep did not run)")
        )
    else:
        lines.append("- sweep >= 0.8x migrate's speed: n/a (a run failed)")
    cell = {r.target: r.median("all_cold") for r in reads}
    b = cell.get("borg mount")
    for name, limit, what in (
        ("ferryfs before migration (lazy)", 1.5, "lazy first read of every file"),
        ("ferryfs after migration", 1.0, "cold read of every file after migration"),
    ):
        f = cell.get(name)
        if f and b:
            lines.append(
                f"- {what} <= {limit}x borg mount cold:"
                f" {verdict(f / b <= limit, f / b, 'time ferryfs/borg')}"
            )
        else:
            lines.append(f"- {what} <= {limit}x borg mount cold: n/a (a run failed)")
    if ferry and ferry.ok and small.ok and small.peak_rss:
        worst = max(ferry.peak_rss, small.peak_rss)
        lines.append(
            f"- peak RSS < {RSS_LIMIT >> 20} MB: "
            + verdict(worst < RSS_LIMIT, worst / RSS_LIMIT, f"{worst / 2**20:.0f} MB, of limit")
        )
        ratio = ferry.peak_rss / small.peak_rss
        anon = ferry.peak_anon / small.peak_anon if small.peak_anon else 0.0
        lines.append(
            "- RSS flat in file count: "
            + verdict(
                ratio <= RSS_FLAT,
                ratio,
                f"RSS growth for {ferry.files / small.files:.1f}x the files",
            )
            + f"; anonymous memory alone grows {anon:.2f}x"
            + " (RSS also counts the LMDB map's pages, which grow with the store)"
        )
    else:
        lines.append("- peak RSS: n/a (a run failed)")
    return lines

"""The benchmark's `stored` section (issue 14): bytes on disk of a ferryfs store
against borg's repository (`--compression zstd,3`) of the same tree, in the same
run, on three trees: the sample tree, a tree of many small files
(bench_smalltree.py: 20,000 sessions of 2-60 KB and a copy of /usr/share/doc),
and the sample tree's session logs alone; after `ferryfs migrate` (packs,
zstd 3) and after `ferryfs recompress --cold-days 0` (zstd 19 with the store's
trained dictionary).

Stored bytes are `du -B1 -s` of the store directory (the database and the
search index) and of borg's repository; the database alone is shown beside.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench_common import (
    borg_env,
    check,
    disk_usage,
    ferryfs_command,
    fresh,
    markdown_table,
    tree_size,
    verdict,
)
from bench_smalltree import small_tree

QUICK_SCALE = 0.1  # of the small-file tree (bench_smalltree.py) with --quick


def sessions_tree(out: Path, tree: Path) -> Path:
    """The sample tree's session logs (.jsonl/.json), hard-linked into a tree of their own."""
    root = fresh(out / f"sessions-of-{tree.name}")
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            if name.endswith((".jsonl", ".json")):
                src = Path(dirpath) / name
                dst = root / src.relative_to(tree)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)
    return root


@dataclass
class Row:
    tree: str
    files: int
    logical: int
    borg: int = 0
    ingest: int = 0
    ingest_db: int = 0
    cold: int = 0
    cold_db: int = 0
    ingest_s: float = 0.0
    cold_s: float = 0.0
    borg_s: float = 0.0
    # From `ferryfs stats --json` after ingest and after recompression: what the
    # chunk records take, and what the search index takes (the database's rest
    # is LMDB's: the other records, page headroom and free pages).
    ingest_chunks: int = 0
    ingest_index: int = 0
    cold_chunks: int = 0
    cold_index: int = 0
    error: str = ""


def chunk_and_index_bytes(store: Path) -> tuple[int, int]:
    """(bytes_compressed, bytes_index) of `ferryfs stats STORE --json`."""
    out = subprocess.run(
        [*ferryfs_command(), "stats", str(store), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures = json.loads(out)
    return int(figures["bytes_compressed"]), int(figures["bytes_index"])


def measure_tree(name: str, tree: Path, work: Path) -> Row:
    files, logical = tree_size(tree)
    row = Row(name, files, logical)
    tag = name.split()[0]
    try:
        repo = fresh(work / f"stored-{tag}.borg")
        env = borg_env(fresh(work / f"stored-{tag}.borghome"))
        check(["borg", "init", "--encryption=none", str(repo)], work / f"stored-{tag}-bi.log", env)
        run = check(
            ["borg", "create", "--compression", "zstd,3", f"{repo}::a", str(tree)],
            work / f"stored-{tag}-borg.log",
            env,
        )
        row.borg, row.borg_s = disk_usage(repo), run.seconds
        store = fresh(work / f"stored-{tag}.ferry")
        run = check(
            [*ferryfs_command(), "migrate", str(tree), "--store", str(store)],
            work / f"stored-{tag}-migrate.log",
        )
        row.ingest, row.ingest_db, row.ingest_s = (
            disk_usage(store),
            disk_usage(store / "db"),
            run.seconds,
        )
        row.ingest_chunks, row.ingest_index = chunk_and_index_bytes(store)
        run = check(
            [*ferryfs_command(), "recompress", str(store), "--cold-days", "0"],
            work / f"stored-{tag}-recompress.log",
        )
        row.cold, row.cold_db, row.cold_s = disk_usage(store), disk_usage(store / "db"), run.seconds
        row.cold_chunks, row.cold_index = chunk_and_index_bytes(store)
    except (subprocess.SubprocessError, OSError, Exception) as e:  # a failed row, not a crash
        row.error = str(e).splitlines()[0] if str(e) else type(e).__name__
    return row


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def stored_section(out: Path, work: Path, tree: Path, quick: bool) -> list[str]:
    load = os.getloadavg()[0]
    trees = [
        ("sample tree", tree),
        ("small files", small_tree(out, QUICK_SCALE if quick else 1.0)[0]),
        ("session logs", sessions_tree(out, tree)),
    ]
    rows = [measure_tree(name, t, work) for name, t in trees]
    table = markdown_table(
        [
            "tree",
            "files",
            "logical MB",
            "borg MB",
            "ingest MB (db)",
            "ingest/borg",
            "recompressed MB (db)",
            "recompressed/borg",
            "recompress s",
        ],
        [
            [r.tree, f"{r.files:,}", mb(r.logical), "failed: " + r.error, "", "", "", "", ""]
            if r.error
            else [
                r.tree,
                f"{r.files:,}",
                mb(r.logical),
                mb(r.borg),
                f"{mb(r.ingest)} ({mb(r.ingest_db)})",
                f"{r.ingest / r.borg:.2f}",
                f"{mb(r.cold)} ({mb(r.cold_db)})",
                f"{r.cold / r.borg:.2f}",
                f"{r.cold_s:.1f}",
            ]
            for r in rows
        ],
    )
    parts = markdown_table(
        ["tree", "", "chunks MB", "other records and LMDB pages MB", "search index MB"],
        [
            [r.tree, when, mb(chunks), mb(db - chunks), mb(index)]
            for r in rows
            if not r.error
            for when, chunks, db, index in (
                ("ingest", r.ingest_chunks, r.ingest_db, r.ingest_index),
                ("recompressed", r.cold_chunks, r.cold_db, r.cold_index),
            )
        ],
    )
    lines = [
        f"Stored bytes (du -B1 of the store directory, database and search index; the"
        f" database alone in brackets) against borg's repository of the same tree;"
        f" load average {load:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        table,
        "",
        "Where the store's bytes go (chunks: `bytes_compressed` of `ferryfs stats --json`;"
        " the database's rest: every other record, LMDB's page headroom and free pages;"
        " the search index: `bytes_index`):",
        "",
        parts,
        "",
        "- borg: `borg init --encryption=none R && borg create --compression zstd,3 R::a SRC`",
        "- ingest: `ferryfs migrate SRC --store S`;"
        " recompressed: then `ferryfs recompress S --cold-days 0`",
        "",
        "Targets:",
        "",
    ]
    for r in rows:
        if r.error or not r.borg:
            lines.append(f"- {r.tree}: n/a (a run failed)")
            continue
        ok = verdict(r.ingest <= r.borg, r.ingest / r.borg, "x borg")
        lines.append(f"- {r.tree}, ingest <= borg: {ok}")
    logs = rows[2]
    if not logs.error and logs.borg and logs.ingest:
        ratio = logs.cold / logs.borg
        lines.append(
            f"- session logs, recompressed <= 0.75x borg: {verdict(ratio <= 0.75, ratio, 'x borg')}"
        )
        gain = 1 - logs.cold / logs.ingest
        lines.append(
            f"- session logs, recompressed >= 30% smaller than ingest: "
            f"{'PASS' if gain >= 0.30 else 'SHORT'} ({gain:.0%} smaller)"
        )
    return lines

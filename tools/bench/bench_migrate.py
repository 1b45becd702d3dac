"""The benchmark's `migrate` section: `ferryfs migrate` against `borg create` and
`restic backup` on the same sample tree, and ferryfs's memory against file count.

Runs each tool on the sample tree as a child process (`--repeat` rounds of every
tool, keeping each tool's median run: one run on a shared VM varies by a third),
measuring wall time, peak RSS (`wait4` rusage of the child) and the bytes its
repository or store occupies on disk (st_blocks, as `du -B1` counts them, so
sparse LMDB files count what they really use). A second part migrates trees of
many tiny files to show whether ferryfs's memory grows with the number of files.
Prints markdown tables and one PASS/SHORT line per target. Each measured tool is
one small function returning a `Result`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_common import (
    SEED,
    Result,
    ToolFailed,
    bench_ferryfs,
    borg_env,
    check,
    drop_caches,
    ferryfs_command,
    finish,
    fresh,
    markdown_table,
    tree_size,
    verdict,
)
from ferryfs.tools import planner

RSS_LIMIT = 200 * 2**20
RSS_FLAT = 1.2  # peak RSS may grow this much from the smaller tiny-file tree to the larger
TINY_COUNTS = (20_000, 80_000)
QUICK_TINY_COUNTS = (2_000, 8_000)


def tiny_tree(out: Path, count: int) -> Path:
    """`count` small JSON files (200 B-2 KB) in directories of 500: metadata-bound."""
    root, marker = out / f"tiny-{count}", out / f"tiny-{count}.json"
    params = {"count": count, "seed": SEED}
    if root.is_dir() and marker.exists() and json.loads(marker.read_text()) == params:
        return root
    marker.unlink(missing_ok=True)
    fresh(root)
    rng = random.Random(SEED)
    for i in range(count):
        d = root / f"{i // 500:04d}"
        if i % 500 == 0:
            d.mkdir(parents=True)
        body = {"id": i, "role": rng.choice(["user", "assistant"]), "n": rng.random()}
        body["text"] = "lorem ipsum dolor " * rng.randint(10, 100)
        (d / f"{i:06d}.json").write_text(json.dumps(body))
    marker.write_text(json.dumps(params))
    return root


def bench_borg(tree: Path, work: Path) -> Result:
    repo = fresh(work / "borg.repo")
    env = borg_env(fresh(work / "borg.home"))
    r = Result(
        "borg create", "borg init --encryption=none R && borg create --compression zstd,3 R::a SRC"
    )
    check(["borg", "init", "--encryption=none", str(repo)], work / "borg-init.log", env)
    drop_caches()
    run = check(
        ["borg", "create", "--compression", "zstd,3", f"{repo}::a", str(tree)],
        work / "borg.log",
        env,
    )
    return finish(r, run, repo)


def bench_restic(tree: Path, work: Path) -> Result:
    repo = fresh(work / "restic.repo")
    # restic 0.14 has no --insecure-no-password: a fixed password it is.
    env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(fresh(work / "restic.cache"))}
    r = Result("restic backup", "restic init --repository-version 2 -r R && restic backup -r R SRC")
    # Repository version 2 is the one that compresses; 0.14's default is still 1.
    check(
        ["restic", "init", "--repo", str(repo), "--repository-version", "2"],
        work / "restic-init.log",
        env,
    )
    drop_caches()
    run = check(["restic", "backup", "--repo", str(repo), str(tree)], work / "restic.log", env)
    return finish(r, run, repo)


def bench_ferryfs_no_index(tree: Path, work: Path) -> Result:
    """`ferryfs migrate --no-index`: the migration alone, the search index left
    to the next mount's sweep (restic and borg build no index either)."""
    store = fresh(work / "ferryfs-noindex.store")
    cmd = [*ferryfs_command(), "migrate", str(tree), "--store", str(store), "--no-index"]
    r = Result("ferryfs migrate --no-index", "ferryfs migrate SRC --store S --no-index")
    run = check(cmd, work / "ferryfs-noindex.log")
    return finish(r, run, store)


Tool = Callable[[Path, Path], Result]

# The ingest table's rows: the name a failed row shows, and the function.
INGEST: list[tuple[str, Tool]] = [
    ("ferryfs migrate", bench_ferryfs),
    ("borg create", bench_borg),
    ("restic backup", bench_restic),
]
# The same with `ferryfs migrate --no-index` after `ferryfs migrate`.
INGEST_BOTH: list[tuple[str, Tool]] = [
    *INGEST[:1],
    ("ferryfs migrate --no-index", bench_ferryfs_no_index),
    *INGEST[1:],
]


def speed_lines(ingest: Sequence[Result]) -> list[str]:
    """`ferryfs migrate`, with and without the index, against restic's speed on
    the same tree (target >= 1.0x), with files/s: PASS or SHORT."""
    by = {r.tool: r for r in ingest}
    restic = by.get("restic backup")
    lines = []
    for name in ("ferryfs migrate", "ferryfs migrate --no-index"):
        ferry = by.get(name)
        what = f"{name} >= 1.0x restic's speed"
        if ferry and restic and ferry.ok and restic.ok and ferry.seconds:
            ratio = restic.seconds / ferry.seconds
            lines.append(
                f"- {what}: {verdict(ratio >= 1, ratio, 'ferryfs/restic')}"
                f" ({ferry.files_per_s:,.0f} against {restic.files_per_s:,.0f} files/s,"
                f" {ferry.mb_per_s:.1f} against {restic.mb_per_s:.1f} MB/s)"
            )
        elif ferry is not None:
            lines.append(f"- {what}: n/a (a run failed)")
    return lines


@dataclass(frozen=True)
class Job:
    """One row to measure: a tool on a tree."""

    name: str
    fn: Tool
    tree: Path


def run_jobs(jobs: Sequence[Job], work: Path, repeat: int = 1) -> list[Result]:
    """Each job `repeat` times, in rounds (all jobs once, then again) so that a
    neighbour's load on a shared machine hits every tool alike; each run from a
    dropped cache and a fresh repository. A row is the run with the median wall
    time, with the fastest and slowest beside it; a failure makes it a failed row."""
    runs: list[list[Result]] = [[] for _ in jobs]
    failed: dict[int, Result] = {}
    for i in range(repeat):
        for j, job in enumerate(jobs):
            if j in failed:
                continue
            print(f"bench: {job.name} on {job.tree.name} ({i + 1}/{repeat})", file=sys.stderr)
            drop_caches()
            try:
                runs[j].append(job.fn(job.tree, work))
            except (ToolFailed, OSError, subprocess.SubprocessError) as e:
                error = str(e).splitlines()[0] if str(e) else type(e).__name__
                failed[j] = Result(job.name, "", error=error)
    rows = []
    for j, job in enumerate(jobs):
        if j in failed:
            r = failed[j]
        else:
            ordered = sorted(runs[j], key=lambda r: r.seconds)
            r = ordered[len(ordered) // 2]
            r.fastest, r.slowest = ordered[0].seconds, ordered[-1].seconds
        r.files, r.logical = tree_size(job.tree)
        rows.append(r)
    return rows


def ingest_table(results: Sequence[Result]) -> str:
    headers = ["tool", "wall s", "(min-max)", "MB/s", "files/s", "stored MB", "stored/logical"]
    headers += ["peak RSS MB", "anon MB"]
    rows: list[list[str]] = []
    for r in results:
        if not r.ok:
            rows.append([r.tool, f"failed: {r.error}", *[""] * (len(headers) - 2)])
            continue
        rows.append(
            [
                r.tool,
                f"{r.seconds:.2f}",
                f"{r.fastest:.2f}-{r.slowest:.2f}",
                f"{r.mb_per_s:.1f}",
                f"{r.files_per_s:,.0f}",
                f"{r.stored / 1e6:.1f}",
                f"{r.stored / r.logical:.3f}" if r.logical else "-",
                f"{r.peak_rss / 2**20:.0f}",
                f"{r.peak_anon / 2**20:.0f}",
            ]
        )
    return markdown_table(headers, rows)


def memory_lines(results: Sequence[Result]) -> list[str]:
    lines = []
    for r in results:
        if r.ok:
            lines.append(
                f"- ferryfs migrate, {r.files:,} tiny files ({r.logical / 1e6:.1f} MB):"
                f" peak RSS {r.peak_rss / 2**20:.0f} MB (anon {r.peak_anon / 2**20:.0f} MB),"
                f" {r.seconds:.1f} s"
                f" ({r.files_per_s:,.0f} files/s)"
            )
        else:
            lines.append(f"- ferryfs migrate, {r.files:,} tiny files: failed: {r.error}")
    return lines


def target_lines(ingest: Sequence[Result], tiny: Sequence[Result]) -> list[str]:
    """One line per target, PASS or SHORT with the ratio behind it."""
    by = {r.tool: r for r in ingest}
    ferry, borg = by.get("ferryfs migrate"), by.get("borg create")
    lines = speed_lines(ingest)

    def have(*rs: Result | None) -> bool:
        return all(r is not None and r.ok for r in rs)

    if ferry and borg and have(ferry, borg) and borg.stored:
        ratio = ferry.stored / borg.stored
        lines.append(f"- stored <= borg's: {verdict(ratio <= 1, ratio, 'ferryfs/borg')}")
    else:
        lines.append("- stored <= borg's: n/a (a run failed)")
    rss = [r.peak_rss for r in [ferry, *tiny] if r is not None and r.ok]
    if rss:
        worst = max(rss)
        lines.append(
            f"- peak RSS < {RSS_LIMIT // 2**20} MB: "
            + verdict(worst < RSS_LIMIT, worst / RSS_LIMIT, f"{worst / 2**20:.0f} MB, of limit")
        )
    else:
        lines.append(f"- peak RSS < {RSS_LIMIT // 2**20} MB: n/a (a run failed)")
    if len(tiny) == 2 and have(*tiny):
        ratio = tiny[1].peak_rss / tiny[0].peak_rss
        anon = tiny[1].peak_anon / tiny[0].peak_anon if tiny[0].peak_anon else 0.0
        n = tiny[1].files / tiny[0].files
        lines.append(
            "- RSS flat in file count: "
            + verdict(ratio <= RSS_FLAT, ratio, f"RSS growth for {n:.0f}x the files")
            + f"; anonymous memory alone grows {anon:.2f}x"
        )
    else:
        lines.append("- RSS flat in file count: n/a (a run failed)")
    return lines


def plan_lines(trees: Sequence[Path], runs: Sequence[Result]) -> list[str]:
    """What `ferryfs plan` predicted for each tree beside what migrate measured,
    to keep the planner honest (plan runs from a dropped cache too)."""
    lines = []
    for tree, r in zip(trees, runs, strict=True):
        if not r.ok:
            continue
        drop_caches()
        p = planner.plan(str(tree))
        lines.append(
            f"- {r.files:,} files, {r.logical / 1e6:.0f} MB: plan said {p.est_seconds:.1f} s,"
            f" {p.disk_needed / 1e6:.1f} MB on disk; migrate took {r.seconds:.1f} s,"
            f" {r.stored / 1e6:.1f} MB"
        )
    return lines


def migrate_section(
    out: Path, work: Path, tree: Path, quick: bool, repeat: int, cache_note: str
) -> list[str]:
    """The ingest table, memory against file count, plan against measured: lines."""
    files, logical = tree_size(tree)
    load = os.getloadavg()[0]
    ingest = run_jobs([Job(name, fn, tree) for name, fn in INGEST_BOTH], work, repeat)
    tiny_trees = [tiny_tree(out, n) for n in (QUICK_TINY_COUNTS if quick else TINY_COUNTS)]
    tiny_jobs = [Job("ferryfs migrate", bench_ferryfs, t) for t in tiny_trees]
    tiny = run_jobs(tiny_jobs, work, repeat)
    return [
        f"Sample tree: {files:,} files, {logical / 1e6:.1f} MB (`sampletree`, seed {SEED});"
        f" page cache {cache_note}; each row the median of {repeat} runs;"
        f" load average {load:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        ingest_table(ingest),
        "",
        *(f"- {r.tool}: `{r.command}`" for r in ingest if r.ok),
        "",
        "Memory against file count:",
        "",
        *memory_lines(tiny),
        "",
        "`ferryfs plan` against the measurement:",
        "",
        *plan_lines([tree, *tiny_trees], [ingest[0], *tiny]),
        "",
        "Targets:",
        "",
        *target_lines(ingest, tiny),
    ]

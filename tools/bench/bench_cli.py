"""The benchmark's `cli` section: how long the `ferryfs` command takes to start.

Scripts and status loops run `ferryfs status MNT --json` every few seconds, and an
operator types `ferryfs --help`; each is a whole process (interpreter, imports,
the work, exit). Timed from spawn to exit, RUNS times each, against a live mount
of the bench tree (no sweep, so the mount is idle); the median is the figure,
against a target of TARGET_SECONDS.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from bench_common import ToolFailed, ferryfs_command, fresh
from bench_mounts import ferryfs_mount

RUNS = 21
QUICK_RUNS = 7
TARGET_SECONDS = 0.1


def time_command(argv: list[str], runs: int) -> list[float]:
    """Wall seconds of each of `runs` runs of `argv`; ToolFailed if one fails."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        times.append(time.perf_counter() - start)
        if r.returncode != 0:
            err = r.stderr.strip().splitlines()
            raise ToolFailed(f"{' '.join(argv)} exited {r.returncode}: {err[-1] if err else ''}")
    return times


def cli_section(work: Path, tree: Path, quick: bool) -> list[str]:
    runs = QUICK_RUNS if quick else RUNS
    mnt = work / "cli-mnt"
    store = fresh(work / "cli-store")
    ff = ferryfs_command()
    rows: list[tuple[str, list[float]]] = []
    with ferryfs_mount(tree, mnt, store, ["--no-sweep"]):
        for shown, argv in (
            ("ferryfs --help", [*ff, "--help"]),
            ("ferryfs status MNT --json", [*ff, "status", str(mnt), "--json"]),
        ):
            time_command(argv, 1)  # warm the page cache: the figure is start-up, not disk
            rows.append((shown, time_command(argv, runs)))
    lines = [
        f"Whole-process time of each command, spawn to exit, {runs} runs each after one"
        " warm-up, against an idle mount of the bench tree (`--no-sweep`).",
        "",
        "| command                   | median s | min s | max s |",
        "| ------------------------- | -------: | ----: | ----: |",
    ]
    for shown, t in rows:
        lines.append(
            f"| {shown:<25} | {statistics.median(t):8.3f} | {min(t):5.3f} | {max(t):5.3f} |"
        )
    lines += ["", "Targets:", ""]
    for shown, t in rows:
        med = statistics.median(t)
        verdict = "PASS" if med < TARGET_SECONDS else "SHORT"
        lines.append(f"- `{shown}` under {TARGET_SECONDS} s: {verdict} (median {med:.3f} s)")
    return lines

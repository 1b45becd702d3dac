"""The benchmark's `recompress` section (issue 14): reads through a mount before
and after cold recompression, on the trees of the `stored` section (the sample
tree, its session logs alone, and the small-file tree of bench_smalltree.py at
a reduced scale) and on one long JSONL agent log (128 MiB), whose sequential
read is the large text file the dictionary and zstd 19 are for.

Per tree: `ferryfs migrate TREE --store B` once; a copy of B (`cp -a`) is then
recompressed with `ferryfs recompress A --cold-days 0` (zstd 19, the store's
trained dictionary), so B and A hold the same files and differ only in their
chunk records. Each round mounts B and A in turn (`ferryfs mount TREE MNT --store S
--no-sweep`: nothing changes the records while they are read), and through
each: drops the page cache and reads every file once (sorted path order, 1 MiB
reads: bench_read.read_files), then drops it again and reads the tree's largest
file sequentially. Each round reads through both stores (bench_read.read_rounds),
so drift in the machine's load falls on both alike, and their order swaps from one
round to the next (before-after, after-before); each cell is the median.

The target: after recompression, both reads at least 0.9x the speed of before.
"""

from __future__ import annotations

import os
import stat
import statistics
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench_common import ToolFailed, check, drop_caches, ferryfs_command, fresh, markdown_table
from bench_mounts import ferryfs_mount
from bench_read import ReadRow, ReadTree, Target, View, read_files, read_rounds, write_jsonl
from bench_smalltree import small_tree
from bench_stored import sessions_tree

# Of the small-file tree's 20,000 sessions and /usr/share/doc: the whole tree
# takes a migrate and a recompress of minutes each on a shared 2-CPU machine.
SMALL_SCALE = 0.1
QUICK_SMALL_SCALE = 0.05
# One long agent log alone: the sequential read of a large text file, whose chunks
# recompression gives the dictionary (the sample tree's largest file is an attachment).
LOG_BYTES = 128 << 20
QUICK_LOG_BYTES = 16 << 20
TARGET = 0.9  # speed after / speed before, at least
BEFORE, AFTER = "before recompression", "after recompression"


def tree_of(root: Path) -> ReadTree:
    """Every regular file of `root` (sorted), and the largest as the sequential one."""
    base = os.fsencode(root)
    sizes: dict[bytes, int] = {}
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                sizes[os.path.relpath(os.path.join(dirpath, name), base)] = st.st_size
    big = max(sizes, key=lambda rel: (sizes[rel], rel))
    return ReadTree(root, tuple(sorted(sizes)), sum(sizes.values()), big, sizes[big])


def long_log(out: Path, nbytes: int) -> Path:
    """`out/longlog-<MiB>`: one JSONL agent log of `nbytes` (bench_read.write_jsonl),
    reused once written."""
    root = out / f"longlog-{nbytes >> 20}"
    path = root / "session.jsonl"
    if not (path.exists() and path.stat().st_size == nbytes):
        fresh(root).mkdir(parents=True)
        write_jsonl(path, nbytes, 1)
    return root


def make_stores(tree: ReadTree, work: Path) -> tuple[Path, Path, list[str]]:
    """(store before, store after, lines on what making them took)."""
    before, after = fresh(work / "before.store"), fresh(work / "after.store")
    drop_caches()
    run = check(
        [*ferryfs_command(), "migrate", str(tree.root), "--store", str(before)],
        work / "migrate.log",
    )
    lines = [f"`ferryfs migrate` {run.seconds:.1f} s"]
    subprocess.run(["cp", "-a", "--sparse=always", str(before), str(after)], check=True)
    run = check(
        [*ferryfs_command(), "recompress", str(after), "--cold-days", "0", "--json"],
        work / "recompress.log",
    )
    lines.append(f"`ferryfs recompress --cold-days 0` {run.seconds:.1f} s")
    return before, after, lines


def _target(store: Path, mnt: Path) -> Target:
    @contextmanager
    def mount(tree: ReadTree, work: Path) -> Iterator[View]:
        with ferryfs_mount(tree.root, mnt, store, ["--no-sweep"]):
            yield View(mnt, ferryfs=mnt)

    return mount


def passes(tree: ReadTree, view: View) -> dict[str, float]:
    """One round through one store: every file cold, then the largest file cold."""
    drop_caches()
    t = {"all_cold": read_files(view.root, tree.files, tree.nbytes)}
    drop_caches()
    t["seq_cold"] = read_files(view.root, [tree.big], tree.big_bytes)
    return t


def measure(tree: ReadTree, work: Path, repeat: int) -> tuple[list[ReadRow], list[str]]:
    work.mkdir(parents=True, exist_ok=True)
    try:
        before, after, setup = make_stores(tree, work)
    except (ToolFailed, OSError, subprocess.SubprocessError) as e:
        failed = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [ReadRow(BEFORE, "", error=failed), ReadRow(AFTER, "", error=failed)], []
    mnt = work / "mnt"
    targets = [(BEFORE, "", _target(before, mnt)), (AFTER, "", _target(after, mnt))]
    rows = {BEFORE: ReadRow(BEFORE, ""), AFTER: ReadRow(AFTER, "")}
    for i in range(repeat):
        # Before then after, then after then before: whatever the second mount of a
        # round gains or loses (the first one's leftovers) falls on both alike.
        order = targets if i % 2 == 0 else targets[::-1]
        what = f"recompress reads of {tree.root}, round {i + 1}/{repeat}:"
        for got in read_rounds(tree, work, 1, order, passes, what):
            row = rows[got.target]
            row.error = row.error or got.error
            for cell, values in got.times.items():
                row.times.setdefault(cell, []).extend(values)
    return [rows[BEFORE], rows[AFTER]], setup


def _mbps(nbytes: int, seconds: float | None) -> str:
    return f"{nbytes / 1e6 / seconds:,.1f}" if seconds else "-"


def recompress_section(out: Path, work: Path, sample: Path, quick: bool, repeat: int) -> list[str]:
    """Build the trees and stores, run the rounds; the section's markdown lines."""
    load = os.getloadavg()[0]
    scale = QUICK_SMALL_SCALE if quick else SMALL_SCALE
    trees = [
        ("sample tree", sample),
        ("session logs", sessions_tree(out, sample)),
        (f"small files ({scale:g})", small_tree(out, scale)[0]),
        ("one long log", long_log(out, QUICK_LOG_BYTES if quick else LOG_BYTES)),
    ]
    table: list[list[str]] = []
    verdicts: list[str] = []
    notes: list[str] = []
    for name, root in trees:
        tree = tree_of(root)
        rows, setup = measure(tree, work / f"recompress-{root.name}", repeat)
        if setup:
            notes.append(f"- {name}: {', '.join(setup)}")
        by = {r.target: r for r in rows}
        for r in rows:
            if r.error:
                table.append([name, r.target, f"failed: {r.error}", "", "", "", ""])
                continue
            a, s = r.median("all_cold"), r.median("seq_cold")
            table.append(
                [
                    name,
                    r.target,
                    f"{len(tree.files):,}",
                    f"{a:.2f}" if a else "-",
                    _mbps(tree.nbytes, a),
                    f"{tree.big_bytes / 1e6:.1f} MB, {s:.2f}" if s else "-",
                    _mbps(tree.big_bytes, s),
                ]
            )
        verdicts += _verdicts(name, by.get(BEFORE), by.get(AFTER))
    return [
        f"Reads through a mount (`--no-sweep`) of the same tree's store before and after"
        f" `ferryfs recompress --cold-days 0`; page cache dropped before each pass; the two"
        f" stores alternate in each of {repeat} round(s), each cell the median;"
        f" load average {load:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        markdown_table(
            [
                "tree",
                "store",
                "files",
                "read all cold s",
                "MB/s",
                "largest file cold s",
                "MB/s",
            ],
            table,
        ),
        "",
        "Setup (not timed in the table):",
        "",
        *notes,
        "",
        f"Targets (speed after / speed before >= {TARGET}):",
        "",
        *verdicts,
    ]


def _verdicts(name: str, before: ReadRow | None, after: ReadRow | None) -> Sequence[str]:
    out = []
    for cell, what in (("all_cold", "read every file cold"), ("seq_cold", "largest file cold")):
        b = before.median(cell) if before is not None else None
        a = after.median(cell) if after is not None else None
        if not a or not b or before is None or after is None:
            out.append(f"- {name}, {what}: n/a (a run failed)")
            continue
        ratio = b / a  # speed after / speed before: the inverse of the times
        ok = "PASS" if ratio >= TARGET else "SHORT"
        # Each round's pair ran back to back: its ratio shows the spread load makes.
        pairs = zip(before.times[cell], after.times[cell], strict=False)
        paired = [tb / ta for tb, ta in pairs if ta]
        rounds = ", ".join(f"{x:.2f}" for x in paired)
        out.append(
            f"- {name}, {what}: {ok} (speed after/before {ratio:.2f}; by round {rounds};"
            f" their median {statistics.median(paired):.2f})"
        )
    return out

"""The `search` section of the benchmark: `ferryfs search` against ripgrep and
grep, on the sample tree and on one of ten times as many sessions.

For each tree: `ferryfs migrate` with and without the index (their time
ratio), the index's size against the session files' bytes, indexing
throughput alone, then two-word queries picked to have about 10, 100 and 1,000
hits (the same counts on both trees, and one of about 1,000 hits on the big
tree, where the sample tree has too few files for it), each run as a whole command (process
start to exit) by ferryfs (`ferryfs search STORE A B`), ripgrep (`rg -l -i -w
A TREE | xargs rg -l -i -w B`) and grep (`grep -rliw`, the same way), the
page cache of the tree and the store evicted before each run
(POSIX_FADV_DONTNEED on their files: the programs themselves stay cached, and
nobody else's cache is touched), ferryfs with its bytecode compiled as an
installed package has it. Lastly the daemon's peak RSS while a fresh
mount migrates and indexes the sample tree in idle time.

Owns only measuring and printing; each number comes from running the tools as
an operator would.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import ferryfs_command, fresh, markdown_table, sample_tree
from bench_mounts import ferryfs_mount

TARGET_HITS = (10, 100, 1000)
THOUSAND = 1000
SPEEDUP_1X = 5.0
SPEEDUP_10X = 20.0
FLAT = 2.0
FAST_MS = 100.0
INDEX_SHARE = 0.10
MIGRATE_RATIO = 0.7
RSS_CAP = 300 * 2**20
# As installed: with compiled bytecode (an environment that forbids writing it
# makes every start compile ferryfs from source, some 40 ms).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def evict(*paths: Path) -> None:
    """Drop these trees' pages from the page cache (ours only)."""
    for root in paths:
        for d, _, files in os.walk(root):
            for f in files:
                try:
                    fd = os.open(os.path.join(d, f), os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def timed(cmd: list[str] | str, shell: bool = False) -> tuple[float, bytes]:
    t = time.perf_counter()
    p = subprocess.run(cmd, shell=shell, capture_output=True, check=False, env=ENV)
    return time.perf_counter() - t, p.stdout


def session_bytes(tree: Path) -> int:
    return sum(
        p.stat().st_size for p in tree.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")
    )


def migrate(tree: Path, store: Path, index: bool) -> float:
    cmd = [*ferryfs_command(), "migrate", str(tree), "--store", str(fresh(store)), "--json"]
    if not index:
        cmd.append("--no-index")
    evict(tree)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def index_alone(store: Path) -> float:
    """Seconds to build the index of a store migrated without one."""
    code = (
        "import sys\nfrom ferryfs.store import index_writer\n"
        "from ferryfs.store.store import Store\n"
        "s = Store.open(sys.argv[1]); index_writer.build(s); s.close()\n"
    )
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(store)], check=True)
    return time.perf_counter() - t


def hits_of(store: Path, a: str, b: str) -> int:
    out = subprocess.run(
        [*ferryfs_command(), "search", str(store), a, b, "--json", "--limit", "0"],
        capture_output=True,
        check=True,
    )
    return int(json.loads(out.stdout)["total"])


def pick_queries(store: Path, tree: Path, targets: tuple[int, ...]) -> list[tuple[str, str, int]]:
    """A two-word query per target hit count, the nearest of some drawn pairs."""
    from ferryfs.store import index
    from ferryfs.store.text import words

    rng = random.Random(5)
    vocab: set[str] = set()
    for p in sorted(tree.rglob("*.jsonl"))[:40]:
        vocab.update(w for w in words(p.read_text(errors="replace")) if w.isalpha() and len(w) > 3)
    pool = sorted(vocab)
    ix = index.open_index(str(store))
    s = ix.searcher()
    import tantivy

    def count(a: str, b: str) -> int:
        q = tantivy.Query.boolean_query(
            [
                (tantivy.Occur.Must, tantivy.Query.term_query(ix.schema, "text", a)),
                (tantivy.Occur.Must, tantivy.Query.term_query(ix.schema, "text", b)),
            ]
        )
        return int(s.search(q, limit=1, count=True).count)

    out = []
    for t in targets:
        best: tuple[float, str, str, int] | None = None
        for _ in range(400):
            a, b = rng.sample(pool, 2)
            n = count(a, b)
            if n == 0:
                continue
            err = abs(n - t) / t
            if best is None or err < best[0]:
                best = (err, a, b, n)
        if best is not None:
            out.append((best[1], best[2], hits_of(store, best[1], best[2])))
    return out


def run_query(store: Path, tree: Path, a: str, b: str, repeat: int) -> dict[str, float]:
    ff = [*ferryfs_command(), "search", str(store), a, b]
    rg = f"rg -l -i -w {a} {tree} | xargs -d '\\n' -r rg -l -i -w {b}"
    gr = f"grep -rliw {a} {tree} | xargs -d '\\n' -r grep -liw {b}"
    times: dict[str, list[float]] = {"ferryfs": [], "rg": [], "grep": []}
    timed(ff)  # writes the bytecode, if it is not there yet
    for _ in range(repeat):
        for name, cmd, shell in (("ferryfs", ff, False), ("rg", rg, True), ("grep", gr, True)):
            evict(tree, store)
            times[name].append(timed(cmd, shell)[0])
    return {k: statistics.median(v) for k, v in times.items()}


def daemon_peak_rss(tree: Path, work: Path) -> tuple[int, float]:
    """(VmHWM bytes, seconds) of a mount's daemon migrating and indexing `tree` in idle time."""
    src = fresh(work / "search-rss-src")
    subprocess.run(["cp", "-a", str(tree), str(src)], check=True)
    mnt = work / "search-rss-mnt"
    store = fresh(work / "search-rss-store")
    t0 = time.perf_counter()
    peak = 0
    with ferryfs_mount(src, mnt, store, ("--idle-ms", "50")) as pid:
        while True:
            st = json.loads(os.getxattr(mnt, "user.ferryfs.status"))
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
            if st["sweep_state"] == "done" and st["index_pending"] == 0:
                break
            if time.perf_counter() - t0 > 3600:
                break
            time.sleep(0.5)  # sampling the peak, not waiting for an event
        took = time.perf_counter() - t0
    return peak, took


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "SHORT"


def search_section(out: Path, work: Path, tree: Path, mb: float, repeat: int) -> list[str]:
    big = sample_tree(out, mb * 10)
    lines: list[str] = []
    rows = []
    per_tree: dict[str, dict[int, dict[str, float]]] = {}
    targets_met: list[str] = []
    picked_1x: list[tuple[str, str, int]] = []
    for label, t in (("1x", tree), ("10x", big)):
        s0, s1 = work / f"search-{label}-noindex", work / f"search-{label}-store"
        plain = migrate(t, s0, index=False)
        with_index = migrate(t, s1, index=True)
        build = index_alone(s0)
        text_bytes = session_bytes(t)
        stats = json.loads(
            subprocess.run(
                [*ferryfs_command(), "stats", str(s1), "--json"], capture_output=True, check=True
            ).stdout
        )
        share = stats["bytes_index"] / text_bytes
        lines.append(
            f"- {label} tree ({stats['files_total']} files, {stats['bytes_logical'] / 1e6:.0f} MB,"
            f" {text_bytes / 1e6:.0f} MB of session files): migrate {plain:.1f} s without the"
            f" index, {with_index:.1f} s with it ({plain / with_index:.2f}x the speed);"
            f" indexing alone {build:.1f} s ({text_bytes / 1e6 / build:.1f} MB/s of session files);"
            f" index {stats['bytes_index'] / 1e6:.1f} MB = {share:.1%} of the session files."
        )
        targets_met.append(
            f"- {_verdict(share < INDEX_SHARE)}: index under 10% of the session files"
            f" on the {label} tree ({share:.1%})"
        )
        targets_met.append(
            f"- {_verdict(plain / with_index >= MIGRATE_RATIO)}: migrate with the index at"
            f" least 0.7x the speed of migrate without ({plain / with_index:.2f}x, {label})"
        )
        if label == "1x":
            picked = pick_queries(s1, t, TARGET_HITS)
            picked_1x = picked
        else:
            picked = pick_queries(s1, t, tuple(n for _, _, n in picked_1x))
            # The 1x tree has too few session files for 1,000 hits: the issue's
            # "under 100 ms for up to 1,000 hits" is measured here.
            if max((n for _, _, n in picked), default=0) < 0.8 * THOUSAND:
                picked += pick_queries(s1, t, (THOUSAND,))
        per_tree[label] = {}
        for i, (a, b, n) in enumerate(picked):
            r = run_query(s1, t, a, b, repeat)
            if label == "1x" or i < len(picked_1x):
                per_tree[label][n] = r  # compared across trees (flat in tree size)
            rows.append(
                [
                    label,
                    f"`{a} {b}`",
                    str(n),
                    f"{r['ferryfs'] * 1000:.0f} ms",
                    f"{r['rg'] * 1000:.0f} ms",
                    f"{r['grep'] * 1000:.0f} ms",
                    f"{r['rg'] / r['ferryfs']:.1f}x",
                ]
            )
            want = SPEEDUP_1X if label == "1x" else SPEEDUP_10X
            targets_met.append(
                f"- {_verdict(r['rg'] / r['ferryfs'] >= want)}: {want:g}x faster than ripgrep,"
                f" {label}, {n} hits ({r['rg'] / r['ferryfs']:.1f}x)"
            )
            if n <= 1.1 * THOUSAND:
                targets_met.append(
                    f"- {_verdict(r['ferryfs'] * 1000 < FAST_MS)}: whole command under 100 ms,"
                    f" {label}, {n} hits ({r['ferryfs'] * 1000:.0f} ms)"
                )
    table = markdown_table(
        ["tree", "query", "hits", "ferryfs search", "rg", "grep", "rg / ferryfs"], rows
    )
    small, large = per_tree.get("1x", {}), per_tree.get("10x", {})
    for (n1, r1), (n10, r10) in zip(sorted(small.items()), sorted(large.items()), strict=False):
        grow = r10["ferryfs"] / r1["ferryfs"]
        rg_grow = r10["rg"] / r1["rg"]
        targets_met.append(
            f"- {_verdict(grow < FLAT)}: flat in tree size: 10x the tree, {n1} vs {n10} hits,"
            f" ferryfs {grow:.2f}x the time (rg {rg_grow:.1f}x)"
        )
    peak, took = daemon_peak_rss(tree, work)
    targets_met.append(
        f"- {_verdict(0 < peak < RSS_CAP)}: daemon peak RSS while migrating and indexing the 1x"
        f" tree in idle time {peak / 2**20:.0f} MiB (done in {took:.0f} s)"
    )
    return [*lines, "", table, "", *targets_met]

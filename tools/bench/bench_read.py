"""The read table (issue 3): reading the same tree through ferryfs and its peers.

One read tree, built once in `--out` and reused: a copy of the sample tree
under `sample/` and one big JSONL file under `big/` (1 GiB, deterministic,
compressible like a long agent log; 64 MiB with `--quick`). It is read through
five targets, one mount at a time, in rounds (`--repeat`), each cell the median:

- ferryfs before migration: a fresh store, `--no-sweep`, so every first open is
  the lazy path (served from Phase 3 while the file migrates behind);
- ferryfs after migration: a store made once by `ferryfs migrate`, `--no-sweep`;
- `borg mount -f` of an archive of the same tree (`--compression zstd,3`);
- `fuse-overlayfs -f` over the tree (a C passthrough, fresh upper/work dirs);
- the plain tree.

Through each: `find ROOT -ls` cold then warm; every file of `sample/` read once
(sorted path order, 1 MiB reads into one buffer, the same in-process reader for
every target) cold then warm; the big file read sequentially cold then warm.
"Cold" means right after `sync; echo 3 > /proc/sys/vm/drop_caches`; "warm" the
same pass again at once. Every reader checks the byte count it got.

For ferryfs before migration the warm passes start only once the files read
cold have finished migrating (polled through `status`), and that time is shown
too: the first read returns before the migration behind it is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import (
    ToolFailed,
    borg_env,
    check,
    drop_caches,
    ferryfs_command,
    fresh,
    markdown_table,
    verdict,
)
from bench_mounts import ferryfs_mount, fuse_child
from ferryfs.tools.mounts import status

SEED = 1
BIG_BYTES = 2**30
QUICK_BIG_BYTES = 64 * 2**20
BUF = 2**20
MIGRATE_WAIT = 1800.0  # seconds a lazy mount may take to migrate what was read

# Words for the big file, most common first (drawn Zipf-like, as in English text).
_WORDS = """
the of and to a in is it you that was for on are with as they be at one have this
from or had by not but what some we can out other were all there when up use your
how said an each which do their time if will way about many then them would like
so these long make thing see two has look more day could go come did number no
most people my over know than call first who may down been now find any new work
part take get place made where after back little only year show every good give
session file user agent model token request response error retry cache index chunk
store migrate mount commit branch merge test build deploy config schema query table
column value field record stream buffer socket thread process queue worker job task
batch limit timeout latency memory disk page block offset length hash digest encode
decode parse render format export import update delete insert select filter sort
""".split()  # noqa: SIM905
_ROLES = ("user", "assistant", "tool")

CELLS = ("find_cold", "find_warm", "all_cold", "all_warm", "seq_cold", "seq_warm")


@dataclass(frozen=True)
class ReadTree:
    """The tree every target shows. Paths are relative to `root`, as bytes."""

    root: Path
    files: tuple[bytes, ...]  # the regular files under sample/, sorted
    nbytes: int
    big: bytes
    big_bytes: int

    @property
    def big_label(self) -> str:
        n = self.big_bytes
        return f"{n >> 30} GiB" if n % 2**30 == 0 else f"{n >> 20} MiB"


@dataclass
class View:
    """Where a target shows the read tree; `ferryfs` is the mountpoint to ask for
    status when the target is a ferryfs mount; `lazy` when nothing is migrated yet."""

    root: Path
    ferryfs: Path | None = None
    lazy: bool = False


@dataclass
class ReadRow:
    target: str
    command: str
    times: dict[str, list[float]] = field(default_factory=dict)
    error: str = ""

    def median(self, cell: str) -> float | None:
        values = self.times.get(cell)
        return statistics.median(values) if values and not self.error else None


Target = Callable[[ReadTree, Path], contextlib.AbstractContextManager[View]]


# ---------------------------------------------------------------------------
# The tree


def write_jsonl(path: Path, size: int, seed: int) -> None:
    """Exactly `size` bytes of JSONL agent-log-like events (the last line cut off
    at `size`): words drawn Zipf-like, a random id and a timestamp per line, so
    it compresses like real logs (~0.3 with zstd 3) but no two chunks repeat."""
    rng = random.Random(seed)
    population = [w for r, w in enumerate(_WORDS) for _ in range(max(1, 40 // (r + 1)))]
    written = seq = 0
    ts = 1_735_689_600_000
    with open(path, "wb") as f:
        while written < size:
            seq += 1
            ts += rng.randint(200, 90_000)
            text = " ".join(rng.choices(population, k=rng.randint(20, 400)))
            line = (
                f'{{"seq":{seq},"id":"{rng.getrandbits(64):016x}","ts":{ts},'
                f'"type":"message","role":"{rng.choice(_ROLES)}","content":"{text}"}}\n'
            ).encode()
            line = line[: size - written]
            f.write(line)
            written += len(line)


def read_tree(out: Path, sample: Path, big_bytes: int) -> ReadTree:
    """`out/read-<sample>`: a copy of the sample tree and the big file, reused
    while the sample and the parameters are unchanged."""
    root, marker = out / f"read-{sample.name}", out / f"read-{sample.name}.json"
    sample_marker = sample.with_name(sample.name + ".json")
    params = {
        "sample": json.loads(sample_marker.read_text()) if sample_marker.exists() else None,
        "big_bytes": big_bytes,
        "seed": SEED,
    }
    big_name = f"session-{big_bytes >> 20}mib.jsonl".encode()
    if not (root.is_dir() and marker.exists() and json.loads(marker.read_text()) == params):
        print(f"bench: building the read tree {root}", file=sys.stderr)
        marker.unlink(missing_ok=True)
        fresh(root).mkdir()
        subprocess.run(["cp", "-a", str(sample), str(root / "sample")], check=True)
        (root / "big").mkdir()
        write_jsonl(root / "big" / os.fsdecode(big_name), big_bytes, SEED)
        marker.write_text(json.dumps(params))
    files, total = _regular_files(root, b"sample")
    return ReadTree(root, tuple(files), total, b"big/" + big_name, big_bytes)


def _regular_files(root: Path, sub: bytes) -> tuple[list[bytes], int]:
    base = os.fsencode(root)
    rels, total = [], 0
    for dirpath, _dirs, names in os.walk(os.path.join(base, sub)):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_mode & 0o170000 == 0o100000:
                rels.append(os.path.relpath(path, base))
                total += st.st_size
    return sorted(rels), total


# ---------------------------------------------------------------------------
# The passes


def read_files(root: Path, rels: Sequence[bytes], expect: int) -> float:
    """Seconds to read every file of `rels` under `root` once, 1 MiB at a time;
    ToolFailed if the bytes read are not `expect`."""
    buf = bytearray(BUF)
    base = os.fsencode(root)
    total = 0
    t0 = time.perf_counter()
    for rel in rels:
        fd = os.open(os.path.join(base, rel), os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t0
    if total != expect:
        raise ToolFailed(f"read {total:,} bytes under {root}, expected {expect:,}")
    return seconds


def find_ls(root: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        ["find", str(root), "-ls"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        raise ToolFailed(f"find -ls exited {r.returncode}: {err[-1] if err else ''}")
    return seconds


def wait_migrated(mnt: Path, legacy_left: int) -> float:
    """Poll the mount's status until at most `legacy_left` files are LEGACY; the
    perf_counter time it saw that. (The poll is a getxattr: not a foreground
    request, so it does not hold up the migration.)"""
    deadline = time.monotonic() + MIGRATE_WAIT
    while time.monotonic() < deadline:
        s = status(str(mnt))
        if s["files_legacy"] <= legacy_left:
            return time.perf_counter()
        time.sleep(0.2)
    raise ToolFailed(f"files read through {mnt} not migrated after {MIGRATE_WAIT:.0f} s")


def run_passes(tree: ReadTree, view: View) -> dict[str, float]:
    """One round of every pass through one target; seconds per cell."""
    t: dict[str, float] = {}
    drop_caches()
    t["find_cold"] = find_ls(view.root)
    t["find_warm"] = find_ls(view.root)
    drop_caches()
    start = time.perf_counter()
    t["all_cold"] = read_files(view.root, tree.files, tree.nbytes)
    if view.lazy and view.ferryfs is not None:
        t["all_migrated"] = wait_migrated(view.ferryfs, 1) - start  # the big file is left
    t["all_warm"] = read_files(view.root, tree.files, tree.nbytes)
    drop_caches()
    start = time.perf_counter()
    t["seq_cold"] = read_files(view.root, [tree.big], tree.big_bytes)
    if view.lazy and view.ferryfs is not None:
        t["seq_migrated"] = wait_migrated(view.ferryfs, 0) - start
    t["seq_warm"] = read_files(view.root, [tree.big], tree.big_bytes)
    return t


# ---------------------------------------------------------------------------
# The targets: (tree, work) -> a context manager yielding a View


@contextlib.contextmanager
def plain(tree: ReadTree, work: Path) -> Iterator[View]:
    yield View(tree.root)


@contextlib.contextmanager
def overlay(tree: ReadTree, work: Path) -> Iterator[View]:
    d = fresh(work / "overlay")
    (d / "upper").mkdir(parents=True)
    (d / "work").mkdir()
    mnt = work / "mnt-overlay"
    opts = f"lowerdir={tree.root},upperdir={d / 'upper'},workdir={d / 'work'}"
    with fuse_child(["fuse-overlayfs", "-f", "-o", opts, str(mnt)], mnt, work / "overlay.log"):
        yield View(mnt)


@contextlib.contextmanager
def borg(tree: ReadTree, work: Path) -> Iterator[View]:
    mnt = work / "mnt-borg"
    cmd = ["borg", "mount", "-f", f"{work / 'borg.repo'}::a", str(mnt)]
    with fuse_child(cmd, mnt, work / "borg-mount.log", borg_env(work / "borg.home")):
        # borg archives absolute paths without their leading slash
        yield View(mnt / str(tree.root).lstrip("/"))


@contextlib.contextmanager
def ferryfs_after(tree: ReadTree, work: Path) -> Iterator[View]:
    mnt = work / "mnt-ferryfs"
    with ferryfs_mount(tree.root, mnt, work / "after.store", ["--no-sweep"]):
        yield View(mnt, ferryfs=mnt)


@contextlib.contextmanager
def ferryfs_lazy(tree: ReadTree, work: Path) -> Iterator[View]:
    mnt = work / "mnt-ferryfs"
    store = fresh(work / "lazy.store")
    try:
        with ferryfs_mount(tree.root, mnt, store, ["--no-sweep"]):
            yield View(mnt, ferryfs=mnt, lazy=True)
    finally:
        fresh(store)


def prepare(tree: ReadTree, work: Path) -> list[str]:
    """Make the borg archive and the migrated store the targets read; one line
    each on what it took. A failure here fails only that target's row."""
    lines = []
    repo = fresh(work / "borg.repo")
    env = borg_env(fresh(work / "borg.home"))
    try:
        check(["borg", "init", "--encryption=none", str(repo)], work / "borg-init.log", env)
        drop_caches()
        run = check(
            ["borg", "create", "--compression", "zstd,3", f"{repo}::a", str(tree.root)],
            work / "borg-create.log",
            env,
        )
        lines.append(f"- `borg create --compression zstd,3` of the read tree: {run.seconds:.1f} s")
    except ToolFailed as e:
        lines.append(f"- borg create of the read tree failed: {e}")
    store = fresh(work / "after.store")
    try:
        drop_caches()
        cmd = [*ferryfs_command(), "migrate", str(tree.root), "--store", str(store)]
        run = check(cmd, work / "after-migrate.log")
        lines.append(f"- `ferryfs migrate` of the read tree: {run.seconds:.1f} s")
    except ToolFailed as e:
        lines.append(f"- ferryfs migrate of the read tree failed: {e}")
    return lines


# The rows, in the order they run in each round.
TARGETS: list[tuple[str, str, Target]] = [
    ("plain tree", "the directory itself", plain),
    ("fuse-overlayfs", "fuse-overlayfs -f -o lowerdir=SRC,upperdir=U,workdir=W MNT", overlay),
    ("borg mount", "borg mount -f R::a MNT (archive made with --compression zstd,3)", borg),
    ("ferryfs after migration", "ferryfs migrate SRC --store S; ferryfs mount SRC MNT "
     "--store S --no-sweep", ferryfs_after),
    ("ferryfs before migration", "ferryfs mount SRC MNT --store FRESH --no-sweep",
     ferryfs_lazy),
]  # fmt: skip


def run_reads(tree: ReadTree, work: Path, repeat: int) -> list[ReadRow]:
    """Every target `repeat` times, in rounds; a target that fails once is a failed row."""
    return read_rounds(tree, work, repeat, TARGETS, run_passes, "reads")


def read_rounds(
    tree: ReadTree,
    work: Path,
    repeat: int,
    targets: list[tuple[str, str, Target]],
    passes: Callable[[ReadTree, View], dict[str, float]],
    what: str,
) -> list[ReadRow]:
    """`passes` through every target (name, command, mount) `repeat` times, in
    rounds; a target that fails once is a failed row."""
    rows = [ReadRow(name, command) for name, command, _ in targets]
    for i in range(repeat):
        for row, (name, _, target) in zip(rows, targets, strict=True):
            if row.error:
                continue
            print(f"bench: {what} through {name} ({i + 1}/{repeat})", file=sys.stderr)
            try:
                with target(tree, work) as view:
                    times = passes(tree, view)
            except (ToolFailed, OSError, subprocess.SubprocessError) as e:
                row.error = str(e).splitlines()[0] if str(e) else type(e).__name__
                continue
            for cell, seconds in times.items():
                row.times.setdefault(cell, []).append(seconds)
    return rows


# ---------------------------------------------------------------------------
# Printing


def read_table(rows: Sequence[ReadRow], tree: ReadTree) -> str:
    big = tree.big_label
    headers = ["target", "find -ls cold s", "warm s", "read all cold s", "MB/s", "warm s", "MB/s"]
    headers += [f"{big} seq cold s", "MB/s", "warm s", "MB/s"]
    out: list[list[str]] = []
    for r in rows:
        if r.error:
            out.append([r.target, f"failed: {r.error}", *[""] * (len(headers) - 2)])
            continue
        cells = [r.target]
        for cell in CELLS:
            s = r.median(cell)
            cells.append(f"{s:.2f}" if s is not None else "-")
            if cell.startswith(("all", "seq")):
                n = tree.nbytes if cell.startswith("all") else tree.big_bytes
                cells.append(f"{n / 1e6 / s:,.0f}" if s else "-")
        out.append(cells)
    return markdown_table(headers, out)


def spread_lines(rows: Sequence[ReadRow]) -> list[str]:
    """Each row's fastest and slowest round of the cold passes; the lazy row's
    migration time."""
    lines = []
    for r in rows:
        if r.error or len(r.times.get("all_cold", [])) < 2:
            continue
        parts = []
        for cell, what in (("all_cold", "read all cold"), ("seq_cold", "sequential cold")):
            v = r.times.get(cell, [])
            if v:
                parts.append(f"{what} {min(v):.2f}-{max(v):.2f} s")
        lines.append(f"- {r.target}: " + ", ".join(parts))
    return lines


def lazy_lines(rows: Sequence[ReadRow], tree: ReadTree) -> list[str]:
    lines = []
    for r in rows:
        a, s = r.median("all_migrated"), r.median("seq_migrated")
        if a is None or s is None:
            continue
        lines.append(
            f"- {r.target}: the first read of all returned in {r.median('all_cold'):.2f} s;"
            f" its files were all migrated {a:.2f} s after it started. The first read of the"
            f" {tree.big_label} file took {r.median('seq_cold'):.2f} s; it was migrated"
            f" {s:.2f} s after it started."
        )
    return lines


def target_lines(rows: Sequence[ReadRow], tree: ReadTree) -> list[str]:
    by = {r.target: r for r in rows}

    def cell(target: str, c: str) -> float | None:
        r = by.get(target)
        return r.median(c) if r is not None else None

    after, lazy = "ferryfs after migration", "ferryfs before migration"
    big = tree.big_label
    checks = [
        # (what, numerator, denominator, limit, <= or >=, ratio label)
        ("read all after migration, cold <= borg mount cold",
         cell(after, "all_cold"), cell("borg mount", "all_cold"), 1.0, "time ferryfs/borg"),
        ("read all after migration, warm <= fuse-overlayfs warm",
         cell(after, "all_warm"), cell("fuse-overlayfs", "all_warm"), 1.0,
         "time ferryfs/overlay"),
        ("lazy first read of all <= 1.5 x borg mount cold",
         cell(lazy, "all_cold"), cell("borg mount", "all_cold"), 1.5, "time ferryfs/borg"),
    ]  # fmt: skip
    lines = []
    for what, num, den, limit, label in checks:
        if num is None or den is None or not den:
            lines.append(f"- {what}: n/a (a run failed)")
            continue
        ratio = num / den
        lines.append(f"- {what}: {verdict(ratio <= limit, ratio, label)}")
    speeds = [
        (f"{big} sequential after migration, cold >= borg mount cold",
         cell(after, "seq_cold"), cell("borg mount", "seq_cold"), 1.0, "speed ferryfs/borg"),
        (f"{big} sequential after migration, warm >= 0.8 x fuse-overlayfs warm",
         cell(after, "seq_warm"), cell("fuse-overlayfs", "seq_warm"), 0.8,
         "speed ferryfs/overlay"),
        (f"{big} sequential after migration, cold >= 0.8 x fuse-overlayfs warm (the strict"
         " reading)", cell(after, "seq_cold"), cell("fuse-overlayfs", "seq_warm"), 0.8,
         "speed ferryfs/overlay"),
    ]  # fmt: skip
    for what, num, den, limit, label in speeds:
        if num is None or den is None or not num:
            lines.append(f"- {what}: n/a (a run failed)")
            continue
        ratio = den / num  # speeds: the inverse of the times
        lines.append(f"- {what}: {verdict(ratio >= limit, ratio, label)}")
    return lines


def read_section(out: Path, work: Path, sample: Path, quick: bool, repeat: int) -> list[str]:
    """Build the tree, run the rounds; the section's markdown lines."""
    tree = read_tree(out, sample, QUICK_BIG_BYTES if quick else BIG_BYTES)
    rwork = work / "read"
    rwork.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    prep = prepare(tree, rwork)
    rows = run_reads(tree, rwork, repeat)
    return [
        f"Read tree: {len(tree.files):,} files, {tree.nbytes / 1e6:.1f} MB under `sample/`"
        f" (a copy of the sample tree) and one {tree.big_label} JSONL file under `big/`;"
        f" page cache dropped before each cold pass; each cell the median of {repeat}"
        f" round(s); load average {load:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        read_table(rows, tree),
        "",
        *[f"- {r.target}: `{r.command}`" for r in rows],
        "",
        "Setup (not timed in the table):",
        "",
        *prep,
        *lazy_lines(rows, tree),
        *(["", "Spread over the rounds:", "", *spread_lines(rows)] if repeat > 1 else []),
        "",
        "Read targets:",
        "",
        *target_lines(rows, tree),
    ]

"""The benchmark: ferryfs migrate against borg and restic on the same sample tree;
reads through ferryfs, borg mount and fuse-overlayfs; the idle sweep.

    python -m ferryfs.tools.bench [--out DIR] [--mb 200] [--quick] [--repeat 3]
                                  [--only migrate,read,sweep]

Three sections, each printed as soon as it is done: `migrate` (this module),
`read` (bench_read.py: the read table of issue 3) and `sweep` (bench_sweep.py:
sweep time and read latency, issue 4), `search` (bench_search.py: ferryfs search
against ripgrep and grep, issue 13); their mounts live in bench_mounts.py.
The `migrate` section:

Builds (or reuses) a sample Phase 3 tree of at least `--mb` MB in `--out`, then
runs each tool on it as a child process (`--repeat` rounds of every tool,
keeping each tool's median run: one run on a shared VM varies by a third),
measuring wall time, peak RSS
(`wait4` rusage of the child) and the bytes its repository or store occupies
on disk (st_blocks, as `du -B1` counts them, so sparse LMDB files count what
they really use). A second part migrates trees of many tiny files to show
whether ferryfs's memory grows with the number of files. Prints markdown tables
to paste into the README and one PASS/SHORT line per target.

Owns only measuring and printing: the tools run as their users would run them.
Each measured tool is one small function returning a `Result`.
A tool that fails gives a row saying so; the bench goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import planner
from .sampletree import generate

SEED = 1
SESSIONS_PER_MB = 2  # about 40% of the bytes are session text, the rest attachments
TIMEOUT = 3600.0
RSS_LIMIT = 200 * 2**20
RSS_FLAT = 1.2  # peak RSS may grow this much from the smaller tiny-file tree to the larger
TINY_COUNTS = (20_000, 80_000)
QUICK_TINY_COUNTS = (2_000, 8_000)


@dataclass
class Result:
    """One measured run of one tool. `error` set means the run failed."""

    tool: str
    command: str
    seconds: float = 0.0
    files: int = 0
    logical: int = 0  # bytes of the tree the tool read
    stored: int = 0  # bytes on disk of what it wrote
    peak_rss: int = 0  # bytes, from wait4: includes pages of mapped files
    peak_anon: int = 0  # bytes, anonymous only, sampled (see measure)
    fastest: float = 0.0  # wall seconds of the fastest and slowest of the repeats
    slowest: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def mb_per_s(self) -> float:
        return self.logical / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else 0.0


@dataclass
class Run:
    """A finished child process: exit code, wall seconds, peak RSS, output tail."""

    returncode: int
    seconds: float
    peak_rss: int
    peak_anon: int  # sampled every 20 ms or so: a lower bound
    tail: str


class ToolFailed(Exception):
    """A tool exited non-zero, timed out, or could not start; the message is one line."""


# ---------------------------------------------------------------------------
# Running and measuring


def measure(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run `cmd` with output to `log`; its wall time and peak RSS from wait4.

    Polls with WNOHANG (1 ms) rather than a blocking wait so that a hung tool is
    killed at TIMEOUT; the poll adds at most a millisecond to the time.
    """
    full_env = {**os.environ, **(env or {})}
    with open(log, "wb") as out:
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
        except OSError as e:
            raise ToolFailed(f"cannot run {cmd[0]}: {e.strerror}") from None
        peak_anon = 0
        polls = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if polls % 20 == 0:
                peak_anon = max(peak_anon, _rss_anon(proc.pid))
            polls += 1
            if time.monotonic() - t0 > TIMEOUT:
                os.kill(proc.pid, signal.SIGKILL)
                os.wait4(proc.pid, 0)
                proc.returncode = -signal.SIGKILL
                raise ToolFailed(f"{Path(cmd[0]).name} timed out after {TIMEOUT:.0f} s")
            time.sleep(0.001)
        seconds = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Run(proc.returncode, seconds, usage.ru_maxrss * 1024, peak_anon, _tail(log))


def _rss_anon(pid: int) -> int:
    """The process's anonymous resident bytes (heap, stacks: not mapped files such
    as LMDB's map, which the kernel also counts in RSS but can drop); 0 if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def check(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """`measure`, raising ToolFailed with the last line of output on a non-zero exit."""
    run = measure(cmd, log, env)
    if run.returncode != 0:
        raise ToolFailed(f"{Path(cmd[0]).name} exited {run.returncode}: {run.tail}")
    return run


def _tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip()[:200] if lines else "(no output)"


def drop_caches() -> bool:
    """Flush and drop the page cache so each tool reads the tree from disk. Needs
    root and a writable /proc/sys (not in most containers); False if refused."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def disk_usage(path: Path) -> int:
    """Bytes allocated under `path`, as `du -B1 -s` counts them (hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirs, files in os.walk(path):
        for name in [*dirs, *files, "."] if dirpath == str(path) else [*dirs, *files]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def tree_size(path: Path) -> tuple[int, int]:
    """(regular files, their bytes) under `path`, symlinks not followed."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size


def ferryfs_command() -> list[str]:
    exe = Path(sys.executable).with_name("ferryfs")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "ferryfs.tools.cli"]


def fresh(path: Path) -> Path:
    """`path`, removed first if it exists (never following a mount out of `--out`)."""
    if path.exists():
        subprocess.run(["/bin/rm", "-rf", "--one-file-system", str(path)], check=True)
    return path


# ---------------------------------------------------------------------------
# The trees


def sample_tree(out: Path, mb: float) -> Path:
    """A sample tree of at least `mb` MB in `out`, reused if built with the same
    parameters. Session text is measured first (it does not depend on the
    attachment size), then attachments fill the rest."""
    sessions = max(20, round(mb * SESSIONS_PER_MB))
    params = {"sessions": sessions, "seed": SEED, "mb": mb}
    root, marker = out / f"phase3-{mb:g}mb", out / f"phase3-{mb:g}mb.json"
    if root.is_dir() and marker.exists() and json.loads(marker.read_text()) == params:
        return root
    marker.unlink(missing_ok=True)
    probe = fresh(out / "phase3-probe")
    text = generate(probe, sessions, SEED, 0.0)
    fresh(probe)
    text_bytes = text.bytes - 64 * text.attachments  # attachments shrink to 64 B at 0 MB
    attachment_mb = max(1.0, (mb * 1e6 - text_bytes) / 1e6 * 1.01)
    generate(fresh(root), sessions, SEED, attachment_mb)
    marker.write_text(json.dumps(params))
    return root


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


# ---------------------------------------------------------------------------
# One function per measured tool: (tree, work dir) -> Result


def bench_ferryfs(tree: Path, work: Path) -> Result:
    store = fresh(work / "ferryfs.store")
    cmd = [*ferryfs_command(), "migrate", str(tree), "--store", str(store)]
    r = Result("ferryfs migrate", "ferryfs migrate SRC --store S")
    run = check(cmd, work / "ferryfs.log")
    return finish(r, run, store)


def borg_env(home: Path) -> dict[str, str]:
    """Borg's environment: its base directory (and so its cache) in `home`, not in ~."""
    return {
        "BORG_BASE_DIR": str(home),
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    }


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


def finish(r: Result, run: Run, written: Path) -> Result:
    """`r` with the measurements of `run` and the disk usage of what it wrote."""
    r.seconds, r.peak_rss, r.peak_anon = run.seconds, run.peak_rss, run.peak_anon
    r.stored = disk_usage(written)
    return r


Tool = Callable[[Path, Path], Result]

# The ingest table's rows: the name a failed row shows, and the function.
INGEST: list[tuple[str, Tool]] = [
    ("ferryfs migrate", bench_ferryfs),
    ("borg create", bench_borg),
    ("restic backup", bench_restic),
]


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


# ---------------------------------------------------------------------------
# Printing


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with padded columns; the first column left, the rest right."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    return "\n".join([line(headers), line(rule), *(line(r) for r in rows)])


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


def _verdict(ok: bool, ratio: float, what: str) -> str:
    return f"{'PASS' if ok else 'SHORT'} ({what} {ratio:.2f})"


def target_lines(ingest: Sequence[Result], tiny: Sequence[Result]) -> list[str]:
    """One line per target, PASS or SHORT with the ratio behind it."""
    by = {r.tool.split()[0]: r for r in ingest}
    ferry, borg, restic = by.get("ferryfs"), by.get("borg"), by.get("restic")
    lines = []

    def have(*rs: Result | None) -> bool:
        return all(r is not None and r.ok for r in rs)

    if ferry and restic and have(ferry, restic) and restic.mb_per_s:
        ratio = ferry.mb_per_s / restic.mb_per_s
        lines.append(f"- throughput >= restic's: {_verdict(ratio >= 1, ratio, 'ferryfs/restic')}")
    else:
        lines.append("- throughput >= restic's: n/a (a run failed)")
    if ferry and borg and have(ferry, borg) and borg.stored:
        ratio = ferry.stored / borg.stored
        lines.append(f"- stored <= borg's: {_verdict(ratio <= 1, ratio, 'ferryfs/borg')}")
    else:
        lines.append("- stored <= borg's: n/a (a run failed)")
    rss = [r.peak_rss for r in [ferry, *tiny] if r is not None and r.ok]
    if rss:
        worst = max(rss)
        lines.append(
            f"- peak RSS < {RSS_LIMIT // 2**20} MB: "
            + _verdict(worst < RSS_LIMIT, worst / RSS_LIMIT, f"{worst / 2**20:.0f} MB, of limit")
        )
    else:
        lines.append(f"- peak RSS < {RSS_LIMIT // 2**20} MB: n/a (a run failed)")
    if len(tiny) == 2 and have(*tiny):
        ratio = tiny[1].peak_rss / tiny[0].peak_rss
        anon = tiny[1].peak_anon / tiny[0].peak_anon if tiny[0].peak_anon else 0.0
        n = tiny[1].files / tiny[0].files
        lines.append(
            "- RSS flat in file count: "
            + _verdict(ratio <= RSS_FLAT, ratio, f"RSS growth for {n:.0f}x the files")
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


def command_line(args: argparse.Namespace) -> str:
    flags = " --quick" if args.quick else f" --mb {args.mb:g}"
    flags += f" --repeat {args.repeat}"
    if list(args.only) != list(SECTIONS):
        flags += f" --only {','.join(args.only)}"
    return f".venv/bin/python -m ferryfs.tools.bench --out {args.out}{flags}"


def machine_line() -> str:
    cpu = "?"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for tool in ("borg", "restic"):
        try:
            out = subprocess.run(
                [tool, "--version" if tool == "borg" else "version"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            versions.append(" ".join(out.split()[:2]))
        except OSError:
            versions.append(f"{tool} missing")
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()},"
        f" Python {platform.python_version()}, {', '.join(versions)}"
    )


# ---------------------------------------------------------------------------


SECTIONS = ("migrate", "read", "sweep", "search")


def migrate_section(
    out: Path, work: Path, tree: Path, quick: bool, repeat: int, cache_note: str
) -> list[str]:
    """The ingest table, memory against file count, plan against measured: lines."""
    files, logical = tree_size(tree)
    load = os.getloadavg()[0]
    ingest = run_jobs([Job(name, fn, tree) for name, fn in INGEST], work, repeat)
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


def parse_only(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        what = unknown[0] if unknown else "(none)"
        raise argparse.ArgumentTypeError(
            f"unknown section {what}; choose from {','.join(SECTIONS)}"
        )
    return [s for s in SECTIONS if s in chosen]


def _stop(signum: int, _frame: object) -> None:
    # SIGTERM unwinds like ^C, so every mount is unmounted on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ferryfs.tools.bench", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--out", type=Path, default=Path("bench-out"), help="work directory (default: %(default)s)"
    )
    ap.add_argument(
        "--mb", type=float, default=200, help="sample tree size in MB (default: %(default)g)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a ~20 MB tree, 2k/8k tiny files, a 64 MiB big file, 60 latency reads",
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs per row; the median is shown (default: 3)"
    )
    ap.add_argument(
        "--only",
        type=parse_only,
        default=list(SECTIONS),
        help=f"sections to run, comma-separated (default: {','.join(SECTIONS)})",
    )
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    signal.signal(signal.SIGTERM, _stop)
    mb = 20.0 if args.quick else args.mb
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)

    tree = sample_tree(out, mb)
    cache_note = "dropped before each run"
    if not drop_caches():
        cache_note = "NOT dropped (/proc/sys/vm/drop_caches refused): every run reads a warm cache"
    print(f"bench: tree {tree}, page cache {cache_note}", file=sys.stderr)

    print(f"Machine: {machine_line()}.")
    print(f"Command: `{command_line(args)}`, {time.strftime('%Y-%m-%d %H:%M %Z')}{_commit()}.")
    for section in args.only:
        # Imported here: they import this module (run as __main__ it is another copy).
        if section == "migrate":
            lines = migrate_section(out, work, tree, args.quick, args.repeat, cache_note)
        elif section == "read":
            from .bench_read import read_section

            lines = read_section(out, work, tree, args.quick, args.repeat)
        elif section == "search":
            from .bench_search import search_section

            lines = search_section(out, work, tree, mb, args.repeat)
        else:
            from .bench_sweep import sweep_section

            lines = sweep_section(work, tree, args.quick, args.repeat)
        print()
        print(f"### {section}")
        print()
        print("\n".join(lines), flush=True)
    return 0


def _commit() -> str:
    r = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f", commit {r.stdout.strip()}" if r.returncode == 0 else ""


if __name__ == "__main__":
    # Run the package's copy of this module, the one bench_read and bench_sweep
    # import, so that there is one ToolFailed class, not two.
    from ferryfs.tools import bench

    sys.exit(bench.main())

"""The benchmark: ferryfs against borg, restic and fuse-overlayfs on the same
sample tree, printed as markdown tables to paste into docs/benchmarks.md.

    .venv/bin/python tools/bench/run.py [--out DIR] [--mb 200] [--quick] [--repeat 3]
                                        [--only migrate,read,sweep,cli,search,live,stored,
                                                small,compact,recompress]
                                        [--live-seconds 150] [--small-scale 1.0]

(`make bench BENCH_ARGS="..."` runs it.) Ten sections, each printed as soon as
it is done: `migrate` (bench_migrate.py: migrate against borg create and restic
backup, memory against file count), `read` (bench_read.py: the read table of
issue 3), `sweep` (bench_sweep.py: sweep time and read latency, issue 4) and
`cli` (bench_cli.py: the command's start-up time), `search` (bench_search.py:
ferryfs search against ripgrep and grep, issue 13), `live` (bench_live.py: an
app's appends, renames and reads through the mount under load, and scattered
1-byte writes, against fuse-overlayfs, issue 15), `stored` (bench_stored.py:
stored bytes against borg after ingest and after cold recompression, issue 14),
`small` (bench_small.py: the small-file tree of bench_smalltree.py against
restic and borg, issue 15), `compact` (bench_compact.py: stored bytes after
deleting half the files through a live mount and letting it go idle, against a
fresh migrate of what is left, issue 14), `recompress` (bench_recompress_read.py:
cold reads through a mount before and after `ferryfs recompress`, issue 14). What
they share is in bench_common.py, their mounts in bench_mounts.py. This module
owns only the command line, the header lines and running the chosen sections in
order.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench_cli import cli_section
from bench_common import drop_caches, sample_tree
from bench_compact import compact_section
from bench_live import live_section
from bench_migrate import migrate_section
from bench_read import read_section
from bench_recompress_read import recompress_section
from bench_search import search_section
from bench_small import small_section
from bench_stored import stored_section
from bench_sweep import sweep_section


def command_line(args: argparse.Namespace) -> str:
    flags = " --quick" if args.quick else f" --mb {args.mb:g}"
    flags += f" --repeat {args.repeat}"
    if args.small_scale != 1.0 and "small" in args.only:
        flags += f" --small-scale {args.small_scale:g}"
    if list(args.only) != list(SECTIONS):
        flags += f" --only {','.join(args.only)}"
    if "live" in args.only:
        flags += f" --live-seconds {args.live_seconds:g}"
    return f".venv/bin/python tools/bench/run.py --out {args.out}{flags}"


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


SECTIONS = (
    "migrate",
    "read",
    "sweep",
    "cli",
    "search",
    "live",
    "stored",
    "small",
    "compact",
    "recompress",
)


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
    ap = argparse.ArgumentParser(prog="tools/bench/run.py", description=__doc__.splitlines()[0])
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
    ap.add_argument(
        "--live-seconds",
        type=float,
        default=150.0,
        help="how long the live-app load runs on each target (default: %(default)g)",
    )
    ap.add_argument(
        "--small-scale",
        type=float,
        default=1.0,
        help="share of the small-file tree's 20,000 sessions (default: 1; --quick: 0.1)",
    )
    args = ap.parse_args(argv)
    if args.live_seconds <= 0:
        ap.error("--live-seconds must be positive")
    if not 0 < args.small_scale <= 1:
        ap.error("--small-scale must be in (0, 1]")
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
        if section == "migrate":
            lines = migrate_section(out, work, tree, args.quick, args.repeat, cache_note)
        elif section == "read":
            lines = read_section(out, work, tree, args.quick, args.repeat)
        elif section == "sweep":
            lines = sweep_section(work, tree, args.quick, args.repeat)
        elif section == "search":
            lines = search_section(out, work, tree, mb, args.repeat)
        elif section == "live":
            lines = live_section(work, tree, args.live_seconds)
        elif section == "stored":
            lines = stored_section(out, work, tree, args.quick)
        elif section == "small":
            lines = small_section(out, work, args.quick, args.repeat, args.small_scale)
        elif section == "compact":
            lines = compact_section(out, work, tree, args.quick)
        elif section == "recompress":
            lines = recompress_section(out, work, tree, args.quick, args.repeat)
        else:
            lines = cli_section(work, tree, args.quick)
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
    sys.exit(main())

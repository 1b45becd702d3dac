"""The sweep tables (issue 4): how fast the idle sweep migrates the sample tree,
and what it costs a small foreground read that arrives while it runs.

**Sweep time.** From the moment `ferryfs mount SRC MNT --store FRESH` starts
(default sweep settings, page cache dropped first) until the sweep is `done`
with every file migrated, beside `ferryfs migrate` on the same tree, in rounds.
Progress is polled through the control channel's status (the call `ferryfs
status --json` makes, made in-process so that polling does not start a Python
every half second: on 2 CPUs that would be the "other load" the sweep waits
for). The end time is the daemon log's "sweep done" line, to the millisecond.
A second row mounts with `--max-load 99`: the sweep's own speed when it does
not wait for other processes (a shared machine is rarely under the default
`--max-load`, half the CPUs).

**Read latency.** A few hundred small reads of files already migrated, each
`open` + 4 KiB `pread` at a random 4 KiB-aligned offset + `close`, timed with
`perf_counter_ns`, on a mount whose sweep is running (default settings) and on
an idle mount (`--no-sweep`) of the same store. What makes ferryfs, not the
page cache, answer them (FUSE has no O_DIRECT here): every mount starts from a
copy of the same prepared store (only the probe files migrated) with the page
cache dropped, and reads each probe file at most once, so its first open (no
`keep_cache` yet) never finds cached pages and ferryfs reads the chunk from its
store. Any foreground request pre-empts the sweep, which resumes only after
`--idle-ms` of quiet, so the reads are spaced `idle_ms` + 20-250 ms apart and
each one is made only once `status` (a getxattr, which does not pre-empt) says
the sweep is `running`: each read meets a busy sweep. The idle mount gets the
same spacing and the same status call. When a mount's sweep is done, the next
mount starts from the prepared store again.
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench_common import (
    Result,
    ToolFailed,
    bench_ferryfs,
    drop_caches,
    fresh,
    markdown_table,
    tree_size,
    verdict,
)
from bench_mounts import ferryfs_mount
from ferryfs.fs.sweep_config import SweepConfig
from ferryfs.tools.mounts import status

SEED = 1
POLL = 0.5
SWEEP_TIMEOUT = 300.0
SWEEP_ROWS = (("sweep, default settings", ()), ("sweep, --max-load 99", ("--max-load=99",)))
READS = 300
QUICK_READS = 60
PROBE_SIZES = (8192, 65536)  # small files: session exports and short logs
READ_SIZE = 4096
JITTER = (0.02, 0.25)
RUNNING_WAIT = 20.0  # seconds a read waits for the sweep to be running
# Mounts per latency row at most. A 200 MB tree is swept in about 1.2 s, room for
# about three spaced reads, and a p99 needs its 300: 40 mounts gave 134.
MAX_MOUNTS = 120
STATE_XATTR = "user.ferryfs.state"


@dataclass
class SweepRun:
    # mount started -> every file migrated and indexed (what `migrate` does), polled
    seconds: float = 0.0
    done: float = 0.0  # mount started -> sweep done: the idle upkeep after it too
    mounted: float = 0.0  # mount started -> mount answered
    started: float = 0.0  # mount started -> status first said running (polled every 50 ms)
    states: dict[str, float] = field(default_factory=dict)  # seconds by sweep_state, polled
    max_other_load: float = 0.0


@dataclass
class SweepRow:
    name: str
    runs: list[SweepRun | Result] = field(default_factory=list)
    error: str = ""

    def seconds(self) -> list[float]:
        return sorted(r.seconds for r in self.runs)

    def median(self) -> float:
        s = self.seconds()
        return s[len(s) // 2] if s else 0.0


# ---------------------------------------------------------------------------
# Sweep time


_DONE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ ferryfs\.sweep: sweep done")


def log_done_time(log: Path) -> float | None:
    """The wall-clock time of the daemon log's "sweep done" line, if there is one."""
    try:
        for line in log.read_text(errors="replace").splitlines():
            m = _DONE.match(line)
            if m:
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except OSError:
        pass
    return None


def sweep_once(tree: Path, work: Path, flags: tuple[str, ...]) -> SweepRun:
    store, mnt = fresh(work / "sweep.store"), work / "mnt-sweep"
    run = SweepRun()
    drop_caches()
    wall0, t0 = time.time(), time.perf_counter()
    with ferryfs_mount(tree, mnt, store, flags):
        run.mounted = last = time.perf_counter() - t0
        while True:
            s = status(str(mnt))
            now = time.perf_counter() - t0
            state = s["sweep_state"]  # taken as the state of the whole span since the last poll
            run.states[state] = run.states.get(state, 0.0) + now - last
            last = now
            run.max_other_load = max(run.max_other_load, s.get("other_load", 0.0))
            if not run.started and s["sweep_state"] in ("running", "done"):
                run.started = time.perf_counter() - t0
            everything = s["files_migrated"] == s["files_total"]
            listed = s["files_total"] > 0  # (the sweep lists the whole tree before migrating)
            if not run.seconds and listed and everything and not s.get("index_pending", 0):
                # The sweep's upkeep (dictionary, recompression, compaction) comes
                # after: `migrate` does none of it, so it is timed apart.
                run.seconds = now
            if s["sweep_state"] == "done" and everything:
                polled = time.perf_counter() - t0
                break
            if run.seconds and time.perf_counter() - t0 > SWEEP_TIMEOUT + run.seconds:
                # Migrated; the idle upkeep (level-19 recompression of every cold
                # file) may take far longer than the migration: not waited for.
                polled = math.inf
                break
            if s["sweep_state"] == "cancelled" or time.perf_counter() - t0 > SWEEP_TIMEOUT:
                raise ToolFailed(
                    f"sweep {s['sweep_state']} after {time.perf_counter() - t0:.0f} s,"
                    f" {s['files_migrated']} of {s['files_total']} files migrated,"
                    f" other load up to {run.max_other_load:.1f}"
                )
            time.sleep(POLL if run.started else 0.05)  # cheap while the store is empty
    done = log_done_time(store / "daemon.log")
    run.done = done - wall0 if done is not None and done - wall0 <= polled else polled
    run.seconds = min(run.seconds or run.done, run.done)
    fresh(store)
    return run


def run_sweeps(tree: Path, work: Path, repeat: int) -> list[SweepRow]:
    rows = [SweepRow("ferryfs migrate"), *(SweepRow(name) for name, _ in SWEEP_ROWS)]
    for i in range(repeat):
        for row in rows:
            if row.error:
                continue
            print(f"bench: {row.name} ({i + 1}/{repeat})", file=sys.stderr)
            try:
                if row.name == "ferryfs migrate":
                    drop_caches()
                    row.runs.append(bench_ferryfs(tree, work))
                else:
                    flags = dict(SWEEP_ROWS)[row.name]
                    row.runs.append(sweep_once(tree, work, flags))
            except (ToolFailed, OSError, subprocess.SubprocessError) as e:
                row.error = str(e).splitlines()[0] if str(e) else type(e).__name__
    return rows


def sweep_table(rows: list[SweepRow], files: int, logical: int) -> str:
    headers = ["run", "wall s", "(min-max)", "MB/s", "files/s", "of migrate's", "mounted s"]
    headers += ["running at s", "MB/s once running", "s running / waiting", "max other load"]
    headers += ["done s (with upkeep)"]
    migrate = rows[0].median() if not rows[0].error else 0.0
    out: list[list[str]] = []
    for r in rows:
        if r.error or not r.runs:
            out.append([r.name, f"failed: {r.error}", *[""] * (len(headers) - 2)])
            continue
        s, m = r.seconds(), r.median()
        cells = [r.name, f"{m:.2f}", f"{s[0]:.2f}-{s[-1]:.2f}", f"{logical / 1e6 / m:.1f}"]
        cells += [f"{files / m:,.0f}", f"{migrate / m:.2f}" if migrate else "-"]
        sweeps = [x for x in r.runs if isinstance(x, SweepRun)]
        if sweeps:
            mid = sorted(sweeps, key=lambda x: x.seconds)[len(sweeps) // 2]
            cells += [f"{mid.mounted:.2f}", f"{mid.started:.2f}"]
            busy = mid.seconds - mid.started
            cells.append(f"{logical / 1e6 / busy:.1f}" if busy > 0 else "-")
            cells.append(f"{mid.states.get('running', 0):.1f} / {mid.states.get('waiting', 0):.1f}")
            cells.append(f"{max(x.max_other_load for x in sweeps):.2f}")
            cells.append(f"{mid.done:.2f}" if math.isfinite(mid.done) else "not done")
        else:
            cells += ["-"] * 6
        out.append(cells)
    return markdown_table(headers, out)


# ---------------------------------------------------------------------------
# Read latency


@dataclass
class Latency:
    name: str
    ns: list[int] = field(default_factory=list)
    mounts: int = 0
    error: str = ""

    def pct(self, p: float) -> float:
        """Nearest-rank percentile, in microseconds."""
        s = sorted(self.ns)
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)] / 1000 if s else 0.0


def probe_files(tree: Path, n: int) -> list[tuple[bytes, int]]:
    """Up to `n` small regular files of the tree, a seeded random choice."""
    base = os.fsencode(tree)
    found = []
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            lo, hi = PROBE_SIZES
            if st.st_mode & 0o170000 == 0o100000 and lo <= st.st_size <= hi:
                found.append((os.path.relpath(path, base), st.st_size))
    found.sort()
    return random.Random(SEED).sample(found, min(n, len(found)))


def prepare_store(tree: Path, work: Path, probes: list[tuple[bytes, int]]) -> Path:
    """A store where exactly the probe files are migrated (read once through a
    `--no-sweep` mount, then waited for) and every other file is still LEGACY."""
    store, mnt = fresh(work / "latency-prepared.store"), work / "mnt-latency"
    with ferryfs_mount(tree, mnt, store, ["--no-sweep"]):
        base = os.fsencode(mnt)
        for rel, _ in probes:
            with open(os.path.join(base, rel), "rb") as f:
                while f.read(1 << 20):
                    pass
        deadline = time.monotonic() + 600
        left = [rel for rel, _ in probes]
        while left and time.monotonic() < deadline:
            left = [r for r in left if os.getxattr(os.path.join(base, r), STATE_XATTR) == b"legacy"]
            time.sleep(0.2)
        if left:
            raise ToolFailed(f"{len(left)} probe files not migrated after 600 s")
    return store


def timed_read(path: bytes, off: int) -> int:
    t0 = time.perf_counter_ns()
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, READ_SIZE, off)
    finally:
        os.close(fd)
    ns = time.perf_counter_ns() - t0
    if len(data) != READ_SIZE:
        raise ToolFailed(f"short read of {path!r}: {len(data)} bytes at {off}")
    return ns


def _until_running(mnt: Path) -> str:
    """Wait for the sweep to be running: "running", "done", or "stuck"."""
    deadline = time.monotonic() + RUNNING_WAIT
    while time.monotonic() < deadline:
        state: str = status(str(mnt))["sweep_state"]
        if state in ("running", "done"):
            return state
        time.sleep(0.1)
    return "stuck"


def episode(
    tree: Path,
    prepared: Path,
    work: Path,
    probes: list[tuple[bytes, int]],
    rng: random.Random,
    want: int,
    flags: list[str] | None,
) -> tuple[list[int], str]:
    """One mount from a copy of the prepared store, with the sweep and `flags`
    (None: `--no-sweep`): reads until `want` are taken, every probe was read
    once, or the sweep is done or stuck."""
    sweep = flags is not None
    store, mnt = fresh(work / "latency.store"), work / "mnt-latency"
    subprocess.run(["cp", "-a", str(prepared), str(store)], check=True)
    idle = SweepConfig().idle_ms / 1000
    samples: list[int] = []
    why = "all probe files read"
    drop_caches()
    with ferryfs_mount(tree, mnt, store, flags if flags is not None else ["--no-sweep"]):
        base = os.fsencode(mnt)
        for rel, size in rng.sample(probes, len(probes)):
            if len(samples) >= want:
                why = "enough reads"
                break
            time.sleep(idle + rng.uniform(*JITTER))
            state = _until_running(mnt) if sweep else status(str(mnt))["sweep_state"]
            if state in ("done", "stuck"):
                why = f"sweep {state}"
                break
            off = rng.randrange(0, size - READ_SIZE + 1) & ~(READ_SIZE - 1)
            samples.append(timed_read(os.path.join(base, rel), off))
    fresh(store)
    return samples, why


def run_latency(tree: Path, work: Path, reads: int) -> tuple[list[Latency], list[str]]:
    """The same reads with the sweep running and on an idle mount; and notes."""
    probes = probe_files(tree, 400)
    notes = [
        f"- {len(probes)} probe files of {PROBE_SIZES[0] // 1024}-{PROBE_SIZES[1] // 1024} KiB;"
        f" each read is `open` + `pread` of {READ_SIZE} bytes + `close`."
    ]
    busy, idle = Latency("while the sweep runs (default settings)"), Latency("idle (--no-sweep)")
    try:
        prepared = prepare_store(tree, work, probes)
    except (ToolFailed, OSError, subprocess.SubprocessError) as e:
        busy.error = idle.error = f"preparing the store: {e}"
        return [idle, busy], notes
    rng = random.Random(SEED)
    reasons: Counter[str] = Counter()
    # Default settings; if other processes keep the sweep waiting, the later
    # mounts pass --max-load 99 (which only decides when the sweep may start).
    flags: list[str] = []
    for lat, sweep in ((busy, True), (idle, False)):
        print(f"bench: read latency {lat.name}", file=sys.stderr)
        per_mount = reads if sweep else max(10, math.ceil(len(busy.ns) / max(1, busy.mounts)))
        while len(lat.ns) < reads and lat.mounts < MAX_MOUNTS and not lat.error:
            want = min(per_mount, reads - len(lat.ns))
            try:
                got, why = episode(
                    tree, prepared, work, probes, rng, want, flags if sweep else None
                )
            except (ToolFailed, OSError, subprocess.SubprocessError) as e:
                lat.error = str(e).splitlines()[0]
                break
            lat.ns += got
            lat.mounts += 1
            if sweep:
                reasons[f"{why}{' (--max-load 99)' if flags else ''}"] += 1
                if why == "sweep stuck" and flags:
                    lat.error = f"the sweep did not run for {RUNNING_WAIT:.0f} s"
                elif why == "sweep stuck":
                    flags = ["--max-load=99"]
                    busy.name = "while the sweep runs (default settings, then --max-load 99)"
    fresh(prepared)
    notes.append(
        f"- with the sweep: {len(busy.ns)} reads over {busy.mounts} mounts, which ended:"
        f" {', '.join(f'{w} {n}x' for w, n in reasons.items())};"
        f" idle: {len(idle.ns)} reads over {idle.mounts} mounts."
    )
    if flags:
        notes.append(
            f"- the default sweep waited over {RUNNING_WAIT:.0f} s for other processes'"
            " load to fall under --max-load, so the mounts after it passed --max-load 99"
        )
    return [idle, busy], notes


def latency_table(rows: list[Latency]) -> str:
    headers = ["reads", "n", "p50 µs", "p90 µs", "p99 µs", "max µs"]
    out = []
    for r in rows:
        if r.error and not r.ns:
            out.append([r.name, f"failed: {r.error}", "", "", "", ""])
            continue
        out.append(
            [r.name, str(len(r.ns))]
            + [f"{r.pct(p):,.0f}" for p in (50, 90, 99)]
            + [f"{max(r.ns) / 1000:,.0f}"]
        )
    return markdown_table(headers, out)


def target_lines(sweeps: list[SweepRow], lat: list[Latency]) -> list[str]:
    lines = []
    migrate, default = sweeps[0], sweeps[1]
    if migrate.error or default.error or not migrate.runs or not default.runs:
        lines.append("- sweep throughput >= 0.8 x migrate's: n/a (a run failed)")
    else:
        ratio = migrate.median() / default.median()
        lines.append(
            "- sweep throughput >= 0.8 x migrate's: "
            + verdict(ratio >= 0.8, ratio, "sweep/migrate")
        )
    idle, busy = lat
    if idle.ns and busy.ns and not busy.error:
        ratio = busy.pct(99) / idle.pct(99)
        lines.append(
            "- read p99 while sweeping <= 1.5 x idle: "
            + verdict(ratio <= 1.5, ratio, "p99 sweeping/idle")
            + f"; p50 {busy.pct(50) / idle.pct(50):.2f}"
        )
    else:
        lines.append("- read p99 while sweeping <= 1.5 x idle: n/a (a run failed)")
    return lines


def sweep_section(work: Path, sample: Path, quick: bool, repeat: int) -> list[str]:
    swork = work / "sweep"
    swork.mkdir(parents=True, exist_ok=True)
    files, logical = tree_size(sample)
    load = os.getloadavg()[0]
    rows = run_sweeps(sample, swork, repeat)
    load_mid = os.getloadavg()[0]
    lat, notes = run_latency(sample, swork, QUICK_READS if quick else READS)
    d = SweepConfig()
    return [
        f"Sample tree: {files:,} files, {logical / 1e6:.1f} MB; each row the median of {repeat}"
        f" round(s); sweep defaults: idle {d.idle_ms} ms, max other load {d.max_load:g},"
        f" batch {d.batch}, batch delay {d.batch_delay_ms} ms, {d.jobs} jobs;"
        f" load average {load:.1f} before, {load_mid:.1f} after.",
        "",
        sweep_table(rows, files, logical),
        "",
        "- ferryfs migrate: `ferryfs migrate SRC --store FRESH` (page cache dropped first)",
        "- sweep: `ferryfs mount SRC MNT --store FRESH [--max-load=99]`, timed from the mount"
        " command until `status` says `files_migrated == files_total` and `index_pending` 0"
        " (polled every 0.5 s); `done s`: until `sweep_state` done, after the idle upkeep"
        " (packs, dictionary, cold recompression)",
        "",
        f"Small reads of migrated files (load average {load_mid:.1f} before,"
        f" {os.getloadavg()[0]:.1f} after):",
        "",
        latency_table(lat),
        "",
        *notes,
        "",
        "Sweep targets:",
        "",
        *target_lines(rows, lat),
    ]

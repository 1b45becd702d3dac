"""The live-app table (issue 15): the app's own I/O through the mount, under load.

A busy chat app works on its session directory while ferryfs migrates it:

- `WRITERS` writer processes, each in a loop with `think_ms` between operations:
  append one JSON line of 200 B to 20 KB to one of its sessions (`open` with
  `O_APPEND`, `write`, `fsync` one time in `FSYNC_EVERY`, `close`), and now and
  then create a session, rename one into `archive/`, delete an archived one, or
  rewrite `index.json` atomically (temporary file, fsync, rename);
- `READERS` reader processes reading whole random session files.

The same load runs, in the same run, on ferryfs mounted in place over a copy of
the sample tree (the sweep running) and on `fuse-overlayfs` over another copy.
Measured: appends per second, the latency of append+close and of
append+fsync+close (p50/p99), whole-file reads per second and their latency.
Then ferryfs is unmounted and mounted again, and every byte a writer closed is
checked (each writer keeps a blake3 of what each of its files must hold), then
`ferryfs fsck --deep` must exit 0.

Scattered small writes: a new file gets a 1-byte `pwrite` at every second offset,
`n` of them, then `close`; timed for 10,000 and 100,000 on both mounts (the
pattern of a database's pages; the cost must be linear in `n`).

Run alone: `.venv/bin/python tools/bench/run.py --only live [--live-seconds 150]`.
The load itself can run against any directory:
`.venv/bin/python tools/bench/bench_live.py DIR --seconds 30` prints its figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
from bench_common import ToolFailed, ferryfs_command, fresh, markdown_table, verdict
from bench_mounts import ferryfs_mount, fuse_child

WRITERS = 4
READERS = 2
FSYNC_EVERY = 8  # one append in this many is followed by fsync
THINK_MS = 5.0  # between two operations of one process
LINE_MIN, LINE_MAX = 200, 20_000
SCATTER_COUNTS = (10_000, 100_000)
# Whatever a process got from an operation that lost a race with another process
# (a reader opening a file a writer just renamed): counted, not fatal.
RACES = {errno.ENOENT}


# ---------------------------------------------------------------------------
# The load


@dataclass
class Expect:
    """What one file a writer owns must hold: a running blake3 and the length."""

    base: str | None  # relative path of its Phase 3 content, or None if created
    hasher: Any = field(default_factory=blake3.blake3)
    length: int = 0

    def add(self, data: bytes) -> None:
        self.hasher.update(data)
        self.length += len(data)


def _line(rng: random.Random, who: int, n: int) -> bytes:
    size = int(LINE_MIN * (LINE_MAX / LINE_MIN) ** rng.random())
    head = f'{{"writer":{who},"n":{n},"role":"assistant","text":"'
    words = ("the", "session", "model", "token", "reply", "tool", "call", "result")
    body = " ".join(rng.choice(words) for _ in range(size // 5))[: max(0, size - len(head) - 3)]
    return (head + body + '"}\n').encode()


def _sessions(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(root / "sessions"):
        for name in names:
            if name.endswith((".jsonl", ".json")):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def writer_proc(
    root: Path, pristine: Path, who: int, seconds: float, think: float, out: Path
) -> None:
    """One writer's loop; its figures and expectations go to `out` as JSON."""
    rng = random.Random(1000 + who)
    # Not sessions/imported/: fuse-overlayfs 1.10 aborts (an assertion in
    # get_node_up) copying up its 255-byte name, and an app appends to its own logs.
    mine = [p for p in _sessions(pristine) if not p.startswith("sessions/imported/")]
    owned = [p for i, p in enumerate(mine) if i % WRITERS == who]
    expect: dict[str, Expect] = {}
    archived: list[str] = []
    deleted: list[str] = []
    lat_close: list[float] = []
    lat_fsync: list[float] = []
    counts = {"append": 0, "create": 0, "rename": 0, "delete": 0, "index": 0, "races": 0}
    index_versions: list[str] = []
    n = 0
    deadline = time.monotonic() + seconds

    def touch(rel: str) -> Expect:
        e = expect.get(rel)
        if e is None:
            e = expect[rel] = Expect(rel)
            with open(pristine / rel, "rb") as f:
                e.add(f.read())
        return e

    while time.monotonic() < deadline:
        n += 1
        r = rng.random()
        if r < 0.86 and owned:
            rel = rng.choice(owned)
            e = touch(rel)
            data = _line(rng, who, n)
            sync = rng.randrange(FSYNC_EVERY) == 0
            t0 = time.perf_counter()
            fd = os.open(root / rel, os.O_WRONLY | os.O_APPEND)
            os.write(fd, data)
            if sync:
                os.fsync(fd)
            os.close(fd)
            (lat_fsync if sync else lat_close).append(time.perf_counter() - t0)
            e.add(data)
            counts["append"] += 1
        elif r < 0.91:
            rel = f"sessions/live/w{who}-{n}.jsonl"
            data = _line(rng, who, n)
            fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
            expect[rel] = Expect(None)
            expect[rel].add(data)
            owned.append(rel)
            counts["create"] += 1
        elif r < 0.94 and len(owned) > 1:
            rel = owned.pop(rng.randrange(len(owned)))
            touch(rel)
            new = f"archive/w{who}-{n}.jsonl"
            os.rename(root / rel, root / new)
            expect[new] = expect.pop(rel)
            deleted.append(rel)
            archived.append(new)
            counts["rename"] += 1
        elif r < 0.96 and archived:
            rel = archived.pop(rng.randrange(len(archived)))
            os.unlink(root / rel)
            del expect[rel]
            deleted.append(rel)
            counts["delete"] += 1
        else:
            body = json.dumps({"writer": who, "n": n, "sessions": owned[:50]}).encode()
            tmp = root / f".index.json.w{who}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, body)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, root / "index.json")
            index_versions.append(blake3.blake3(body).hexdigest())
            counts["index"] += 1
        if think:
            time.sleep(think)
    result = {
        "counts": counts,
        "lat_close": lat_close,
        "lat_fsync": lat_fsync,
        "expect": {k: [v.base, v.hasher.hexdigest(), v.length] for k, v in expect.items()},
        "gone": sorted(set(deleted) - set(expect)),
        "index": index_versions[-1:],
    }
    out.write_text(json.dumps(result))


def reader_proc(root: Path, who: int, seconds: float, think: float, out: Path) -> None:
    """One reader's loop: whole session files, picked at random, 1 MiB at a time."""
    rng = random.Random(2000 + who)
    files = _sessions(root)
    lat: list[float] = []
    races = 0
    deadline = time.monotonic() + seconds
    listed = time.monotonic()
    while time.monotonic() < deadline:
        if time.monotonic() - listed > 10:  # see the sessions created since
            files, listed = _sessions(root), time.monotonic()
        rel = rng.choice(files)
        t0 = time.perf_counter()
        try:
            with open(root / rel, "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass
        except OSError as e:
            if e.errno not in RACES:
                raise
            races += 1  # renamed or deleted by a writer since listed
            files.remove(rel)
            continue
        lat.append(time.perf_counter() - t0)
        if think:
            time.sleep(think)
    out.write_text(json.dumps({"lat": lat, "races": races}))


@dataclass
class LoadResult:
    seconds: float
    appends: int
    lat_close: list[float]
    lat_fsync: list[float]
    reads: list[float]
    counts: dict[str, int]
    expect: dict[str, list[Any]]
    gone: list[str]
    index: list[str]

    def figures(self) -> dict[str, float]:
        def pct(xs: list[float], q: float) -> float:
            if not xs:
                return 0.0
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3

        return {
            "appends_per_s": self.appends / self.seconds,
            "close_p50_ms": pct(self.lat_close, 0.5),
            "close_p99_ms": pct(self.lat_close, 0.99),
            "fsync_p50_ms": pct(self.lat_fsync, 0.5),
            "fsync_p99_ms": pct(self.lat_fsync, 0.99),
            "reads_per_s": len(self.reads) / self.seconds,
            "read_p50_ms": pct(self.reads, 0.5),
            "read_p99_ms": pct(self.reads, 0.99),
        }


def run_load(root: Path, pristine: Path, seconds: float, think_ms: float, tmp: Path) -> LoadResult:
    """The load on `root` (whose content at the start is `pristine`'s) for `seconds`."""
    (root / "archive").mkdir(exist_ok=True)
    (root / "sessions" / "live").mkdir(exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    think = think_ms / 1e3
    procs = []
    for w in range(WRITERS):
        args = (root, pristine, w, seconds, think, tmp / f"w{w}.json")
        procs.append(ctx.Process(target=writer_proc, args=args))
    for r in range(READERS):
        procs.append(
            ctx.Process(target=reader_proc, args=(root, r, seconds, think, tmp / f"r{r}.json"))
        )
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    elapsed = time.monotonic() - t0
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise ToolFailed(f"a load process exited {bad[0]} (its traceback is on stderr)")
    res = LoadResult(elapsed, 0, [], [], [], {}, {}, [], [])
    for w in range(WRITERS):
        d = json.loads((tmp / f"w{w}.json").read_text())
        res.appends += d["counts"]["append"]
        res.lat_close += d["lat_close"]
        res.lat_fsync += d["lat_fsync"]
        for k, v in d["counts"].items():
            res.counts[k] = res.counts.get(k, 0) + v
        res.expect.update(d["expect"])
        res.gone += d["gone"]
        res.index += d["index"]
    for r in range(READERS):
        d = json.loads((tmp / f"r{r}.json").read_text())
        res.reads += d["lat"]
        res.counts["races"] = res.counts.get("races", 0) + d["races"]
    return res


def verify(root: Path, res: LoadResult) -> list[str]:
    """What differs between `root` and what the writers closed (empty: nothing)."""
    bad = []
    for rel, (_base, digest, length) in sorted(res.expect.items()):
        try:
            with open(root / rel, "rb") as f:
                data = f.read()
        except OSError as e:
            bad.append(f"{rel}: {e.strerror}")
            continue
        if len(data) != length or blake3.blake3(data).hexdigest() != digest:
            bad.append(f"{rel}: {len(data)} bytes, expected {length} (or other bytes)")
    for rel in res.gone:
        if os.path.lexists(root / rel):
            bad.append(f"{rel}: still there after its rename or delete")
    if res.index:
        with open(root / "index.json", "rb") as f:
            if blake3.blake3(f.read()).hexdigest() not in res.index:
                bad.append("index.json: not the last version any writer renamed into place")
    return bad


# ---------------------------------------------------------------------------
# Scattered small writes


def scatter(path: Path, n: int) -> float:
    """Seconds to pwrite 1 byte at every second offset of a new file, n times, and close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    try:
        for i in range(n):
            os.pwrite(fd, b"x", 2 * i)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    size = os.stat(path).st_size
    if size != 2 * n - 1:
        raise ToolFailed(
            f"{path.name}: {size} bytes after the scattered writes, expected {2 * n - 1}"
        )
    return seconds


def check_scatter(path: Path, n: int) -> None:
    with open(path, "rb") as f:
        data = f.read()
    if data[0::2] != b"x" * n or data[1::2] != bytes(n - 1):
        raise ToolFailed(f"{path.name}: wrong bytes after the scattered writes")


# ---------------------------------------------------------------------------
# The section


@contextlib.contextmanager
def _ferryfs(copy: Path, store: Path, flags: list[str]) -> Iterator[Path]:
    with ferryfs_mount(copy, copy, store, flags):
        yield copy


@contextlib.contextmanager
def _overlay(copy: Path, work: Path) -> Iterator[Path]:
    d = fresh(work / "live-overlay")
    (d / "upper").mkdir(parents=True)
    (d / "work").mkdir()
    mnt = work / "mnt-live-overlay"
    opts = f"lowerdir={copy},upperdir={d / 'upper'},workdir={d / 'work'}"
    with fuse_child(["fuse-overlayfs", "-f", "-o", opts, str(mnt)], mnt, work / "live-overlay.log"):
        yield mnt


def _copy(tree: Path, dst: Path) -> Path:
    fresh(dst)
    subprocess.run(["cp", "-a", str(tree), str(dst)], check=True)
    return dst


def _ms(x: float) -> str:
    return f"{x:.2f}"


def live_section(
    work: Path,
    tree: Path,
    seconds: float,
    think_ms: float = THINK_MS,
    counts: tuple[int, ...] = SCATTER_COUNTS,
) -> list[str]:
    lines = [
        f"{WRITERS} writers (append 200 B-20 KB and close, fsync 1 in {FSYNC_EVERY}; create,"
        f" rename into archive/, delete, rewrite index.json), {READERS} readers of whole"
        f" session files, {think_ms:g} ms between operations, {seconds:g} s on each target;"
        " ferryfs mounted in place over a copy of the tree with the sweep on (default flags),"
        " fuse-overlayfs over another copy.",
        "",
    ]
    figs: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    scat: dict[str, dict[int, float]] = {}
    sweep_flags = ["--max-load", "64"]  # this machine's load is the other tools': sweep anyway
    # ferryfs
    copy = _copy(tree, work / "live-ferryfs")
    store = fresh(work / "live-ferryfs.store")
    try:
        with _ferryfs(copy, store, sweep_flags) as root:
            res = run_load(root, tree, seconds, think_ms, work / "live-ferryfs.load")
            figs["ferryfs"] = res.figures()
            scat["ferryfs"] = {n: scatter(root / f"scatter-{n}", n) for n in counts}
        with _ferryfs(copy, store, ["--no-sweep"]) as root:  # every closed byte, after a remount
            bad = verify(root, res)
            for n in counts:
                check_scatter(root / f"scatter-{n}", n)
        fsck = subprocess.run(
            [*ferryfs_command(), "fsck", str(store), "--deep"],
            capture_output=True,
            text=True,
            check=False,
        )
        notes.append(
            f"ferryfs after a remount: {len(res.expect)} files written checked,"
            f" {len(res.gone)} gone,"
            f" {'every closed byte there' if not bad else f'{len(bad)} WRONG: ' + bad[0]};"
            f" `ferryfs fsck --deep` exit {fsck.returncode}; operations {res.counts}."
        )
    except ToolFailed as e:
        notes.append(f"ferryfs: FAILED: {e}")
    finally:
        fresh(copy)
        fresh(store)
    # fuse-overlayfs
    copy = _copy(tree, work / "live-overlay-lower")
    try:
        with _overlay(copy, work) as root:
            res = run_load(root, tree, seconds, think_ms, work / "live-overlay.load")
            figs["fuse-overlayfs"] = res.figures()
            scat["fuse-overlayfs"] = {n: scatter(root / f"scatter-{n}", n) for n in counts}
            bad = verify(root, res)
            notes.append(f"fuse-overlayfs: {'every closed byte there' if not bad else bad[0]}.")
    except ToolFailed as e:
        notes.append(f"fuse-overlayfs: FAILED: {e}")
    finally:
        fresh(copy)
        fresh(work / "live-overlay")
    rows = []
    for name, f in figs.items():
        rows.append(
            [
                name,
                f"{f['appends_per_s']:.0f}",
                f"{_ms(f['close_p50_ms'])} / {_ms(f['close_p99_ms'])}",
                f"{_ms(f['fsync_p50_ms'])} / {_ms(f['fsync_p99_ms'])}",
                f"{f['reads_per_s']:.0f}",
                f"{_ms(f['read_p50_ms'])} / {_ms(f['read_p99_ms'])}",
            ]
        )
    heads = ["target", "appends/s", "append+close p50/p99 ms", "append+fsync+close p50/p99 ms",
             "reads/s", "read p50/p99 ms"]  # fmt: skip
    if rows:
        lines.append(markdown_table(heads, rows))
        lines.append("")
    srows = [[name, *(f"{s[n]:.2f} s" for n in counts)] for name, s in scat.items()]
    if srows:
        lines.append(
            markdown_table(["scattered 1-byte pwrite", *(f"{n:,}" for n in counts)], srows)
        )
        lines.append("")
    lines += [f"- {n}" for n in notes]
    lines += _targets(figs, scat, counts)
    return lines


def _targets(
    figs: dict[str, dict[str, float]], scat: dict[str, dict[int, float]], counts: tuple[int, ...]
) -> list[str]:
    f, o = figs.get("ferryfs"), figs.get("fuse-overlayfs")
    out = []
    if f and o:
        r = f["appends_per_s"] / o["appends_per_s"]
        out.append(f"- appends/s >= 0.8x fuse-overlayfs: {verdict(r >= 0.8, r, 'x')}")
        r = f["close_p99_ms"] / max(o["close_p99_ms"], 1e-9)
        out.append(f"- append+close p99 <= 3x fuse-overlayfs: {verdict(r <= 3, r, 'x')}")
        r = f["reads_per_s"] / max(o["reads_per_s"], 1e-9)
        out.append(f"- reads/s >= 0.8x fuse-overlayfs: {verdict(r >= 0.8, r, 'x')}")
    fs, os_ = scat.get("ferryfs"), scat.get("fuse-overlayfs")
    if fs and os_:
        lo, hi = counts[0], counts[-1]
        growth = fs[hi] / fs[lo] / (hi / lo)
        out.append(f"- scattered writes linear (time per write at {hi:,} / at {lo:,}): "
                   f"{verdict(growth <= 1.5, growth, 'x')}")  # fmt: skip
        r = fs[hi] / os_[hi]
        out.append(
            f"- scattered writes within 3x fuse-overlayfs ({hi:,}): {verdict(r <= 3, r, 'x')}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run the live-app load on a directory")
    ap.add_argument("root", type=Path, help="where the app's files are (a mount, say)")
    ap.add_argument("--pristine", type=Path, help="their content at the start (default: ROOT)")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--think-ms", type=float, default=THINK_MS)
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/live-load"))
    ap.add_argument("--verify", action="store_true", help="check every closed byte afterwards")
    a = ap.parse_args(argv)
    pristine = a.pristine or a.root
    if pristine == a.root:  # expectations need the content before: copy it now
        pristine = a.tmp / "pristine"
        shutil.rmtree(pristine, ignore_errors=True)
        shutil.copytree(a.root / "sessions", pristine / "sessions", symlinks=True)
    res = run_load(a.root, pristine, a.seconds, a.think_ms, a.tmp)
    out: dict[str, Any] = {"figures": res.figures(), "counts": res.counts}
    if a.verify:
        out["wrong"] = verify(a.root, res)[:5]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

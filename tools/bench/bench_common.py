"""What the benchmark's sections share: the `Result` of one measured run, running
a tool as a child process and measuring its wall time and peak memory
(`measure`, `check`), dropping the page cache, sizes on disk, the sample tree,
`ferryfs migrate` as a measured tool, and markdown tables.

The benchmark lives outside the installed package (run it as `make bench` or
`.venv/bin/python tools/bench/run.py`); its modules import each other by their
plain names, the folder being the script's first sys.path entry. Owns only
measuring and printing: the tools run as their users would run them, and a tool
that fails gives a row saying so (`ToolFailed`, one line); the bench goes on.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferryfs.tools.sampletree import generate

SEED = 1
SESSIONS_PER_MB = 2  # about 40% of the bytes are session text, the rest attachments
TIMEOUT = 3600.0


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


# ---------------------------------------------------------------------------
# Measured tools and printing shared by sections


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


def finish(r: Result, run: Run, written: Path) -> Result:
    """`r` with the measurements of `run` and the disk usage of what it wrote."""
    r.seconds, r.peak_rss, r.peak_anon = run.seconds, run.peak_rss, run.peak_anon
    r.stored = disk_usage(written)
    return r


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


def verdict(ok: bool, ratio: float, what: str) -> str:
    return f"{'PASS' if ok else 'SHORT'} ({what} {ratio:.2f})"

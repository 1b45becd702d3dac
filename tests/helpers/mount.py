"""Live-mount helpers for the tests that need a real FUSE mount (tier 3).

`mounted(src, mnt)` starts ferryfs the way an operator does, through the CLI in a
subprocess (`python -m ferryfs.tools.cli mount ...`), waits with a deadline for the
mount to answer while checking that its daemon is alive, and yields a `Mount`.
Whatever happens in the body, teardown runs `ferryfs umount`; if that fails it
lazily unmounts with `fusermount3 -u -z` and kills the daemon it started, by its
pid and no other. No mount is left behind, even by a failing test.

After each mount's teardown the part of STORE/daemon.log that mount wrote must hold
no WARNING, ERROR, CRITICAL or Traceback line, or the test fails; a test that
injects faults on purpose passes `log_ok=` (a regex of lines it expects, or True).

A watchdog kills the daemon of a mount that outlives `WATCHDOG_SECONDS`, so a
deadlocked filesystem fails the test (its system calls get ENOTCONN) instead of
hanging the run.

Without a usable /dev/fuse the tests skip with the reason, or fail when the
environment variable CI is set: CI must not pass by skipping.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ferryfs.tools import rollbacks
from ferryfs.tools.mounts import fs_type

from helpers.store import tree_rows

MOUNT_SECONDS = 60
UMOUNT_SECONDS = 60
WATCHDOG_SECONDS = 300
FS_TYPE = "fuse.ferryfs"
# What a daemon logs when its store's disk is full (a mount's `log_ok`).
FULL_LOG = r"[Nn]o space|ENOSPC|unwritable|cannot migrate|could not write"
BAD_LOG_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")

STAT_FIELDS = (
    "st_mode",
    "st_ino",
    "st_dev",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_mtime_ns",
    "st_ctime_ns",
)


def fuse_unavailable() -> str | None:
    """Why a FUSE mount cannot work here, or None if it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this machine or container)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return f"/dev/fuse is not readable and writable by uid {os.getuid()}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian: apt-get install fuse3)"
    return None


# The test running now (set by conftest), so that require_fuse can tell whether it
# carries the `mount` marker.
RUNNING: pytest.Item | None = None


def require_fuse() -> None:
    """Every path to a mount calls this first (`mounted` does). Fails a test not
    marked `mount` (conftest marks the tests whose code reaches this function; mark
    by hand one it cannot see, e.g. through a method); skips without FUSE, or under
    CI (env CI set) fails instead, with the same reason."""
    if RUNNING is not None and RUNNING.get_closest_marker("mount") is None:
        pytest.fail(
            f"{RUNNING.nodeid} mounts but is not marked: add @pytest.mark.mount",
            pytrace=False,
        )
    why = fuse_unavailable()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"FUSE needed by this test and CI is set: {why}", pytrace=False)
    pytest.skip(why)


def ferry(*args: str | os.PathLike[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `ferryfs ARGS...` in a subprocess, as an operator would; the whole result."""
    return subprocess.run(
        [sys.executable, "-m", "ferryfs.tools.cli", *map(os.fspath, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def cli(*args: str | os.PathLike[str], timeout: float = 120, check: bool = True) -> str:
    """Run `ferryfs ARGS...` in a subprocess; its stdout."""
    r = ferry(*args, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(
            f"ferryfs {' '.join(map(str, args))} exited {r.returncode}: {r.stderr.strip()}"
        )
    return r.stdout


def pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def is_daemon(pid: int, mnt: Path | None = None) -> bool:
    """`pid` is (still) a ferryfs daemon (serving `mnt`, if given): guards a kill
    against pid reuse."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"ferryfs.fs.daemon" in argv and (mnt is None or os.fsencode(mnt) in argv)


def is_mounted(mnt: Path) -> bool:
    return fs_type(str(mnt)) == FS_TYPE


def wait_for(cond: Any, seconds: float, what: str, interval: float = 0.02) -> None:
    """Poll `cond()` until true; AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Mount:
    """A live ferryfs mount started by this process. Iterates as (src, mnt, store, pid)."""

    src: Path
    mnt: Path
    store: Path
    args: tuple[str, ...] = ()
    log_ok: bool | str = False
    pid: int | None = None
    log_offset: int = 0
    _watchdog: threading.Timer | None = field(default=None, repr=False)
    _watchdog_fired: bool = False

    def __iter__(self) -> Iterator[Any]:
        return iter((self.src, self.mnt, self.store, self.pid))

    @property
    def log(self) -> Path:
        return self.store / "daemon.log"

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        if is_mounted(self.mnt):
            raise AssertionError(f"{self.mnt} is already a ferryfs mount before the test mounts it")
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        cmd = [
            sys.executable,
            "-m",
            "ferryfs.tools.cli",
            "mount",
            str(self.src),
            str(self.mnt),
            "--store",
            str(self.store),
            *self.args,
        ]
        try:
            r = subprocess.run(
                cmd, capture_output=True, text=True, timeout=MOUNT_SECONDS, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            # The CLI was killed; find the daemon it may have left through the mount itself.
            self._adopt_from_xattr()
            raise AssertionError(
                f"ferryfs mount did not return within {MOUNT_SECONDS} s; log:\n{self.new_log()}"
            ) from None
        if r.returncode != 0:
            self._adopt_from_xattr()
            raise AssertionError(
                f"ferryfs mount exited {r.returncode}: {r.stderr.strip()}\nlog:\n{self.new_log()}"
            )
        found = re.search(r"\bpid (\d+)\)", r.stdout)
        if found is None:
            self._adopt_from_xattr()
            raise AssertionError(f"ferryfs mount did not say its daemon's pid: {r.stdout!r}")
        self.pid = int(found.group(1))
        pid = self.pid

        def answering() -> bool:
            if not pid_alive(pid):
                raise AssertionError(f"daemon {pid} died while mounting; log:\n{self.new_log()}")
            return os.path.ismount(self.mnt) and is_mounted(self.mnt)

        wait_for(answering, MOUNT_SECONDS, f"{self.mnt} to be mounted")
        os.stat(self.mnt)  # the mount answers requests, not only appears in mountinfo
        served_by = int(os.getxattr(self.mnt, "user.ferryfs.pid"))
        assert served_by == pid, f"{self.mnt} is served by pid {served_by}, not ours ({pid})"
        self._watchdog = threading.Timer(WATCHDOG_SECONDS, self._fire_watchdog)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _adopt_from_xattr(self) -> None:
        """After a failed start: if our daemon mounted anyway, learn its pid to stop it."""
        if self.pid is None and is_mounted(self.mnt):
            with contextlib.suppress(OSError, ValueError):
                pid = int(os.getxattr(self.mnt, "user.ferryfs.pid"))
                if is_daemon(pid, self.mnt):
                    self.pid = pid

    def _fire_watchdog(self) -> None:
        self._watchdog_fired = True
        self._kill()

    def _kill(self) -> None:
        """Lazy-unmount and SIGKILL our daemon (only the pid we started)."""
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, timeout=30)
        if self.pid is not None and pid_alive(self.pid) and is_daemon(self.pid, self.mnt):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def stop(self) -> list[str]:
        """Unmount whatever happens; the problems found (empty if all was clean)."""
        problems: list[str] = []
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._watchdog_fired:
            problems.append(f"the watchdog killed daemon {self.pid} after {WATCHDOG_SECONDS} s")
        if self.pid is not None and not self._watchdog_fired and not pid_alive(self.pid):
            # `ferryfs umount` cleans up a dead mount and succeeds: say it died.
            problems.append(f"daemon {self.pid} had died before ferryfs umount at teardown")
        if is_mounted(self.mnt):
            try:
                r = subprocess.run(
                    [sys.executable, "-m", "ferryfs.tools.cli", "umount", str(self.mnt)],
                    capture_output=True,
                    text=True,
                    timeout=UMOUNT_SECONDS,
                    stdin=subprocess.DEVNULL,
                )
                if r.returncode != 0:
                    problems.append(f"ferryfs umount exited {r.returncode}: {r.stderr.strip()}")
            except subprocess.TimeoutExpired:
                problems.append(f"ferryfs umount did not return within {UMOUNT_SECONDS} s")
        elif self.pid is not None and not self._watchdog_fired:
            problems.append(f"{self.mnt} was no longer mounted at teardown")
        if self.pid is not None and (pid_alive(self.pid) or is_mounted(self.mnt)):
            if not problems:
                problems.append(f"daemon {self.pid} still runs after ferryfs umount returned")
            self._kill()
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not pid_alive(self.pid or 0), 30, "the daemon to die")
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not is_mounted(self.mnt), 30, "the mount to go")
        if is_mounted(self.mnt):
            problems.append(f"{self.mnt} is STILL mounted; run fusermount3 -u -z {self.mnt}")
        problems.extend(self.log_problems())
        self.pid = None
        return problems

    def remount(self) -> Mount:
        """Unmount cleanly (failing on any problem) and mount again with the same arguments."""
        problems = self.stop()
        if problems:
            raise AssertionError("unmount before remount: " + "; ".join(problems))
        self.start()
        return self

    # -- the daemon's log ------------------------------------------------------------

    def new_log(self) -> str:
        """What the daemon logged since this mount started."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_problems(self) -> list[str]:
        if self.log_ok is True:
            return []
        ok = re.compile(self.log_ok) if isinstance(self.log_ok, str) and self.log_ok else None
        text = self.new_log()
        bad = [
            line
            for line in text.splitlines()
            if BAD_LOG_LINE.search(line) and not (ok and ok.search(line))
        ]
        if not bad:
            return []
        return [
            f"daemon.log of this mount has {len(bad)} warning/error line(s), "
            f"first: {bad[0]!r}\n--- log ---\n{text}"
        ]

    # -- asking the mount ------------------------------------------------------------

    def state(self, path: str | os.PathLike[str]) -> str:
        """`user.ferryfs.state` of a file in the mount: legacy or migrated."""
        return os.getxattr(path, "user.ferryfs.state", follow_symlinks=False).decode()

    def status(self) -> dict[str, Any]:
        import json

        d: dict[str, Any] = json.loads(os.getxattr(self.mnt, "user.ferryfs.status"))
        return d

    def sync(self) -> None:
        os.setxattr(self.mnt, "user.ferryfs.control", b"sync")


@contextlib.contextmanager
def mounted(
    src: str | os.PathLike[str],
    mnt: str | os.PathLike[str] | None = None,
    store: str | os.PathLike[str] | None = None,
    args: tuple[str, ...] = ("--no-sweep",),
    log_ok: bool | str = False,
) -> Iterator[Mount]:
    """Mount `src` on `mnt` (in place when `mnt` is None or `src`) for the body.

    `args` go to `ferryfs mount` (default: no sweep, so migration happens only where
    a test reads). `log_ok`: a regex of daemon.log warning/error lines this test
    expects, or True to skip the log check.
    """
    require_fuse()
    s = Path(src).absolute()
    m = Path(mnt).absolute() if mnt is not None else s
    st = Path(store).absolute() if store is not None else s.with_name(s.name + ".ferry")
    live = Mount(s, m, st, tuple(args), log_ok)
    try:
        live.start()
    except BaseException as e:
        for p in live.stop():
            e.add_note(f"teardown: {p}")
        raise
    try:
        yield live
    except BaseException as e:
        for p in live.stop():
            e.add_note(f"teardown: {p}")
        raise
    problems = live.stop()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def one_file_phase3(tmp_path: Path, name: str, body: bytes) -> tuple[Path, Path]:
    """A Phase 3 tree `tmp_path/src` holding one file, and an empty mountpoint
    `tmp_path/mnt`: (src, mnt)."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    (src / name).write_bytes(body)
    mnt.mkdir()
    return src, mnt


@contextlib.contextmanager
def small_tmpfs(where: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of `size_mb` MiB mounted on `where` for the body; always unmounted."""
    require_fuse()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        r = subprocess.run(["umount", str(where)], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
            raise AssertionError(f"tmpfs {where} was busy at the end: {r.stderr.strip()}")


def undo_rollback_mount(src: str | os.PathLike[str]) -> None:
    """Remove the read-only mount a rollback left on `src`, if there is one and a
    rollback record says it is ours (a ferryfs mount is `Mount.stop`'s business)."""
    if fs_type(os.fspath(src)) not in (None, FS_TYPE) and rollbacks.lookup(os.fspath(src)):
        subprocess.run(["umount", os.fspath(src)], check=False)
        rollbacks.forget(os.fspath(src))


def remount(m: Mount) -> Mount:
    """Unmount `m` cleanly and mount it again the same way (same store)."""
    return m.remount()


# -- comparing trees --------------------------------------------------------------------


def sha256_noatime(path: str | bytes) -> str:
    """sha256 of a file, read without touching its atime where the kernel allows."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(
    root: str | os.PathLike[str],
    fields: tuple[str, ...] = STAT_FIELDS,
    content: bool = True,
) -> dict[bytes, tuple[Any, ...]]:
    """Every entry under `root` (relative bytes paths, the root itself as b''): its
    lstat `fields`, then (if `content`) sha256 for a regular file, the target for a
    symlink, else None. Never follows a symlink; never opens a FIFO or device."""

    def row(path: bytes, st: os.stat_result) -> tuple[Any, ...]:
        got = tuple(getattr(st, f) for f in fields)
        if content:
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                extra = sha256_noatime(path)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            got = (*got, extra)
        return got

    return tree_rows(root, row)


def snapshot_diff(
    before: dict[bytes, tuple[Any, ...]], after: dict[bytes, tuple[Any, ...]]
) -> list[str]:
    """Human-readable differences between two snapshots (first 20)."""
    out = []
    for k in sorted(before.keys() | after.keys()):
        if before.get(k) != after.get(k):
            out.append(f"{k!r}: {before.get(k)} -> {after.get(k)}")
    return out[:20]


def diff_r(a: str | os.PathLike[str], b: str | os.PathLike[str], *excludes: str) -> None:
    """`diff -r --no-dereference A B` must be clean (symlinks compared as links)."""
    cmd = ["diff", "-r", "--no-dereference"]
    for x in excludes:
        cmd += ["-x", x]
    r = subprocess.run([*cmd, os.fspath(a), os.fspath(b)], capture_output=True, timeout=120)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, f"diff -r {a} {b} (exit {r.returncode}):\n{out[:4000]}"

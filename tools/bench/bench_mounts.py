"""Mounts for the benchmark's read and sweep tables, each one a context manager
that leaves no mount and no daemon behind, whatever happens inside it.

- `ferryfs_mount`: `ferryfs mount` (a daemon that detaches), stopped with
  `ferryfs umount`; if that fails, `fusermount3 -u` (then `-u -z`) and the
  daemon's pid gets SIGTERM, then SIGKILL.
- `fuse_child`: a FUSE daemon run in the foreground as our child (`borg mount
  -f`, `fuse-overlayfs -f`), unmounted with `fusermount3 -u` and waited for by
  its pid, with the same fallbacks.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench_common import ToolFailed, ferryfs_command
from ferryfs.tools.mounts import control_get, fs_type

MOUNT_SECONDS = 300.0  # borg mount reads the archive's metadata before it answers
STOP_SECONDS = 120.0


def is_mounted(mnt: Path) -> bool:
    return fs_type(str(mnt)) is not None and os.path.ismount(mnt)


def force_unmount(mnt: Path) -> None:
    """`fusermount3 -u`, then a lazy `-u -z` if the mount is still there."""
    for flags in (["-u"], ["-u", "-z"]):
        if not is_mounted(mnt):
            return
        subprocess.run(["fusermount3", *flags, str(mnt)], capture_output=True, check=False)
        _wait_for(lambda: not is_mounted(mnt), 5.0)


def stop_pid(pid: int, seconds: float = STOP_SECONDS) -> None:
    """Wait up to `seconds` for `pid` to exit; then SIGTERM it, then SIGKILL it."""
    if _wait_for(lambda: not _alive(pid), seconds):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_for(lambda: not _alive(pid), 10.0):
            return


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie child of ours is reaped and counts as gone)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_for(cond: Callable[[], bool], seconds: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def _prepare_mountpoint(mnt: Path) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    force_unmount(mnt)  # a mount an interrupted earlier run left behind
    if is_mounted(mnt):
        raise ToolFailed(f"{mnt} is still mounted and will not unmount")


@contextlib.contextmanager
def ferryfs_mount(src: Path, mnt: Path, store: Path, flags: Sequence[str] = ()) -> Iterator[int]:
    """`ferryfs mount SRC MNT --store STORE FLAGS`; yields the daemon's pid."""
    _prepare_mountpoint(mnt)
    cmd = [*ferryfs_command(), "mount", str(src), str(mnt), "--store", str(store), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=MOUNT_SECONDS, check=False)
    pid = None
    m = re.search(r"pid (\d+)", r.stdout)
    if m:
        pid = int(m.group(1))
    elif fs_type(str(mnt)) == "fuse.ferryfs":
        pid = int(control_get(str(mnt), "pid"))
    try:
        if r.returncode != 0 or pid is None:
            err = (r.stderr.strip() or r.stdout.strip()).splitlines()
            raise ToolFailed(f"ferryfs mount exited {r.returncode}: {err[-1] if err else ''}")
        yield pid
    finally:
        if is_mounted(mnt):
            subprocess.run(
                [*ferryfs_command(), "umount", str(mnt)],
                capture_output=True,
                timeout=STOP_SECONDS + 30,
                check=False,
            )
        force_unmount(mnt)
        if pid is not None:
            stop_pid(pid)


@contextlib.contextmanager
def fuse_child(
    cmd: Sequence[str], mnt: Path, log: Path, env: dict[str, str] | None = None
) -> Iterator[int]:
    """Run a FUSE daemon in the foreground as our child; yields its pid once
    `mnt` is mounted."""
    _prepare_mountpoint(mnt)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        up = _wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, MOUNT_SECONDS, 0.02)
        if not up or not is_mounted(mnt):
            tail = log.read_text(errors="replace").strip().splitlines()
            raise ToolFailed(
                f"{Path(cmd[0]).name} did not mount {mnt}: {tail[-1] if tail else 'no output'}"
            )
        yield proc.pid
    finally:
        force_unmount(mnt)
        stop_pid(proc.pid, 30.0)
        with contextlib.suppress(ChildProcessError):
            proc.wait(timeout=1)

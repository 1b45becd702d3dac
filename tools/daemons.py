"""A ferryfs daemon seen from the commands that start and stop one (`mount`,
`umount`, `rollback`) or reach through it (`fsck`, `points`): spawning it and
waiting for its "ready" line, what still uses its mount, stopping it, and the
Phase 3 tree behind an in-place mount.

Kept apart from `_common.py` so that `ferryfs status`, which needs none of it,
does not load it (the command's start-up time is measured).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ferryfs.store.errors import FerryError
from ferryfs.store.phase3 import Phase3Tree
from ferryfs.store.storedir import open_log

from . import procscan
from .mounts import control_get, fs_type, is_ferryfs

if TYPE_CHECKING:  # the store (lmdb) is loaded by the commands that open one
    from ferryfs.store.store import Store

READY_SECONDS = 60
STOP_SECONDS = 120
# The kernel sends RELEASE after close() returns: a file an app has just closed
# may still count as open in the daemon for a moment.
RELEASE_SECONDS = 3.0


class MountFailed(FerryError):
    exit_code = 1


class Busy(FerryError):
    exit_code = 1


def spawn_daemon(cmd: list[str], log_path: str) -> int:
    """Start a daemon that reports "ready" or one error line on `--ready-fd`;
    return its pid once ready, or raise MountFailed with its error line."""
    r, w = os.pipe()
    with open_log(log_path) as log:
        proc = subprocess.Popen(
            [*cmd, "--ready-fd", str(w)],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd="/",  # a daemon's cwd must not keep any mount (or SRC) busy
        )
    os.close(w)
    try:
        line = _read_line(r, proc)
    finally:
        os.close(r)
    if line == "ready":
        return proc.pid
    try:  # the daemon says why, then exits with the code that goes with it
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        code = 1
    err = MountFailed(line.removeprefix("error: ") or f"the daemon exited; see {log_path}")
    if code in (2, 8):
        err.exit_code = code
    raise err


def _read_line(fd: int, proc: subprocess.Popen[bytes]) -> str:
    buf = b""
    deadline = time.monotonic() + READY_SECONDS
    while b"\n" not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        elif proc.poll() is not None:
            break
    return buf.decode(errors="replace").strip()


@dataclass
class InUse:
    """What uses a mount: processes (from /proc) and the daemon's open files."""

    mnt: str
    holders: list[procscan.Holder] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def unsaved(self) -> list[dict[str, Any]]:
        return [f for f in self.report.get("files", []) if f["unsaved"]]

    @property
    def busy(self) -> bool:
        return bool(self.holders or self.report.get("handles") or self.unsaved)

    def _name(self, ino: int) -> str:
        for h in self.holders:
            if h.ino == ino:
                return h.path
        return f"inode {ino}"

    def lost(self) -> str:
        return ", ".join(
            f"{f['unsaved']} bytes written to {self._name(f['ino'])}"
            + (f" ({f['error']})" if f["error"] else "")
            for f in self.unsaved
        )

    def describe(self) -> str:
        parts = []
        if self.unsaved:
            parts.append(f"written bytes the store cannot take: {self.lost()}")
        if self.holders:
            parts.append(f"in use by {procscan.describe(self.holders)}")
        elif self.report.get("handles"):
            n = len(self.report.get("files", [])) + self.report.get("more", 0)
            parts.append(f"{n} files open by processes this user cannot see")
        return "; ".join(parts)


def in_use(mnt: str) -> InUse:
    """Ask the daemon (which first writes out what it can) and scan /proc. The scan
    names the processes; the daemon's count also sees what the scan cannot (another
    user's processes, an fd passed over a socket, another mount namespace). Only a
    count of handles with no process found gets a moment to drop: that is a RELEASE
    still on its way from a close() that already returned."""
    deadline = time.monotonic() + RELEASE_SECONDS
    while True:
        use = InUse(mnt, procscan.on_mount(mnt), json.loads(control_get(mnt, "open")))
        settling = not use.holders and not use.unsaved and use.report.get("handles")
        if not settling or time.monotonic() > deadline:
            return use
        time.sleep(0.05)


def stop_daemon(mnt: str, pid: int) -> None:
    """SIGTERM the daemon serving `mnt` and wait until it has unmounted and exited."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline:
        if not _alive(pid) and fs_type(mnt) != "fuse.ferryfs":
            return
        time.sleep(0.05)
    raise FerryError(f"daemon {pid} did not stop within {STOP_SECONDS} s; see its daemon.log")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def phase3_of(store: Store) -> Phase3Tree | None:
    """The store's Phase 3 tree, even when an in-place mount shadows it (through the
    daemon's directory fd); None if it cannot be reached."""
    src = store.source_path()
    if src is None:
        return None
    try:
        if is_ferryfs(src):
            fd = int(control_get(src, "srcfd"))
            return Phase3Tree.open(f"/proc/{int(control_get(src, 'pid'))}/fd/{fd}")
        return Phase3Tree.open(src)
    except (FerryError, OSError, ValueError):
        return None

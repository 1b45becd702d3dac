"""Flush, stop background work and unmount a ferryfs mount; wait for its daemon to exit.

Refuses, as umount(8) does with EBUSY, while processes use files on the mount
or the daemon holds written bytes it cannot save (a full store, say): exit 1,
naming them, and the mount stays. `--lazy` detaches the mount now and lets the
daemon finish when the last file closes (the apps' writes and closes still
work, and a close that cannot save its bytes fails in the app); `--force`
unmounts now, cutting those apps off and saying what is lost. A dead mount
(its daemon killed) is cleaned up. Also removes the read-only Phase 3 mount
that `ferryfs rollback` left.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ferryfs.store.errors import FerryError

from . import procscan, rollbacks
from .mounts import NotMounted, clean_dead, control_get, fs_type, is_dead

STOP_SECONDS = 120
# The kernel sends RELEASE after close() returns: a file an app has just closed
# may still count as open in the daemon for a moment.
RELEASE_SECONDS = 3.0


class Busy(FerryError):
    exit_code = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mnt", help="the mountpoint")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--lazy",
        action="store_true",
        help="if files are open: detach now, and stop the daemon when the last one closes",
    )
    how.add_argument(
        "--force",
        action="store_true",
        help="unmount even with files open or unsaved (their apps get errors, unsaved bytes lost)",
    )


def run(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mnt)
    if fs_type(mnt) != "fuse.ferryfs" and rollbacks.lookup(mnt) is not None:
        if fs_type(mnt) is None:  # a rollback killed before its read-only mount
            rollbacks.forget(mnt)
            print(f"nothing was mounted at {args.mnt}; its rollback record is removed")
            return 0
        fuse = fs_type(mnt) == "fuse.ferryfs-ro"
        r = subprocess.run(
            ["fusermount3", "-u", mnt] if fuse else ["umount", mnt], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise FerryError(f"umount {mnt} failed: {r.stderr.strip()}")
        rollbacks.forget(mnt)
        print(f"unmounted the read-only Phase 3 tree at {args.mnt}")
        return 0
    if is_dead(mnt):
        clean_dead(mnt)
        print(
            f"cleaned up the dead ferryfs mount at {args.mnt}: its daemon was gone "
            "(writes it had not saved are lost; what it had committed is in the store)"
        )
        return 0
    if fs_type(mnt) != "fuse.ferryfs":
        raise NotMounted(f"{args.mnt} is not a ferryfs mount")
    pid = int(control_get(mnt, "pid"))
    use = in_use(mnt)
    if use.busy and not (args.lazy or args.force):
        raise Busy(
            f"{args.mnt} is busy: {use.describe()}; close them and retry, or --lazy "
            "(detach now, finish when they close) or --force (unmount now, losing unsaved bytes)"
        )
    if use.busy and args.lazy:
        detach(mnt)
        print(
            f"detached {args.mnt}; daemon {pid} serves the files still open ({use.describe()}) "
            "and exits when the last one closes"
        )
        return 0
    if use.busy:
        print(f"ferryfs: forcing: {use.describe()}", file=sys.stderr)
    stop_daemon(mnt, pid)
    lost = use.lost()
    print(f"unmounted {args.mnt}" + (f" (forced; LOST: {lost})" if lost else ""))
    return 0


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


def detach(mnt: str) -> None:
    r = subprocess.run(
        ["fusermount3", "-u", "-z", mnt], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if r.returncode != 0:
        raise FerryError(f"could not detach {mnt}: {r.stderr.strip() or r.returncode}")


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

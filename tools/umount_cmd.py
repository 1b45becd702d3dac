"""Flush, stop background work and unmount a ferryfs mount; wait for its daemon to exit.

Also removes the read-only Phase 3 mount that `ferryfs rollback` left.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time

from ferryfs.store.errors import FerryError

from . import rollbacks
from .mounts import NotMounted, control_get, fs_type

STOP_SECONDS = 120


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mnt", help="the mountpoint")


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
    if fs_type(mnt) != "fuse.ferryfs":
        raise NotMounted(f"{args.mnt} is not a ferryfs mount")
    stop_daemon(mnt, int(control_get(mnt, "pid")))
    print(f"unmounted {args.mnt}")
    return 0


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

"""Flush, stop background work and unmount a ferryfs mount; wait for its daemon to exit."""

from __future__ import annotations

import argparse
import os
import signal
import time

from ferryfs.store.errors import FerryError

from .mounts import control_get, fs_type

STOP_SECONDS = 120


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mnt", help="the mountpoint")


def run(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mnt)
    pid = int(control_get(mnt, "pid"))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline:
        if not _alive(pid) and fs_type(mnt) != "fuse.ferryfs":
            print(f"unmounted {args.mnt}")
            return 0
        time.sleep(0.05)
    raise FerryError(f"daemon {pid} did not stop within {STOP_SECONDS} s; see its daemon.log")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours is not alive; we never start the daemon as our child here.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False

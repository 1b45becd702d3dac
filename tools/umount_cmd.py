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
import os
import subprocess
import sys

from ferryfs.store.errors import FerryError

from . import rollbacks
from .daemons import Busy, in_use, stop_daemon
from .mounts import NotMounted, clean_dead, control_get, fs_type, is_dead


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


def detach(mnt: str) -> None:
    r = subprocess.run(
        ["fusermount3", "-u", "-z", mnt], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if r.returncode != 0:
        raise FerryError(f"could not detach {mnt}: {r.stderr.strip() or r.returncode}")

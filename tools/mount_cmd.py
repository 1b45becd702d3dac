"""Mount a Phase 3 tree (in place if MNT is SRC) and migrate it as it is used.

Without `--foreground` this starts the daemon and returns once the mount
answers; its log goes to STORE/daemon.log.
"""

from __future__ import annotations

import argparse
import os
import sys

from ferryfs.fs.sweep_config import add_sweep_arguments, sweep_argv
from ferryfs.store.errors import FerryError, UsageError
from ferryfs.store.storedir import StoreDir

from . import layout, procscan, rollbacks
from .daemons import MountFailed, spawn_daemon
from .mounts import clean_dead, fs_type, is_dead
from .paths import default_store


class SourceBusy(FerryError):
    exit_code = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the Phase 3 tree")
    p.add_argument("mnt", help="where to mount (may be SRC itself)")
    p.add_argument("--store", help="the store directory (default: SRC.ferry beside SRC)")
    p.add_argument("--foreground", action="store_true", help="serve in this process")
    p.add_argument("-o", dest="options", action="append", default=[], help="allow_other")
    p.add_argument("--debug", action="store_true", help="log every request")
    p.add_argument(
        "--force",
        action="store_true",
        help="mount in place even while processes use files under SRC (they keep the hidden copy)",
    )
    add_sweep_arguments(p)


def run(args: argparse.Namespace) -> int:
    src, mnt = os.path.abspath(args.src), os.path.abspath(args.mnt)
    for path in dict.fromkeys((src, mnt)):
        if is_dead(path):  # killed daemon: every request there fails until unmounted
            clean_dead(path)
            print(f"cleaned up a dead ferryfs mount at {path} (its daemon was gone)")
    if not os.path.isdir(src):
        raise UsageError(f"source {args.src} is not a directory")
    if not os.path.isdir(mnt):
        raise UsageError(f"mountpoint {args.mnt} is not a directory")
    if fs_type(mnt) == "fuse.ferryfs":
        raise UsageError(f"{args.mnt} is already a ferryfs mount")
    if rollbacks.lookup(mnt) is not None and fs_type(mnt) is not None:
        raise UsageError(f"{args.mnt} shows a rolled-back Phase 3 tree; `ferryfs umount` it first")
    if not os.path.exists("/dev/fuse"):
        raise MountFailed("/dev/fuse is missing: load the fuse module or run where FUSE works")
    opts = [o for group in args.options for o in group.split(",") if o]
    unknown = [o for o in opts if o != "allow_other"]
    if unknown:
        raise UsageError(f"unknown mount option {unknown[0]} (known: allow_other)")
    store = os.path.abspath(args.store or default_store(src))
    layout.check(args.src, args.store or store, args.mnt)
    if layout.in_place(src, mnt) and not args.force:
        refuse_busy_source(args.src)
    cmd = [sys.executable, "-m", "ferryfs.fs.daemon", src, mnt, "--store", store]
    if "allow_other" in opts:
        cmd.append("--allow-other")
    cmd.extend(sweep_argv(args))
    if args.debug:
        cmd.append("--debug")
    if args.foreground:
        from ferryfs.fs import daemon  # trio and pyfuse3: only when serving here

        return daemon.main(cmd[3:])
    StoreDir.open(store, create=True).close()  # makes the store, or refuses it (exit 8)
    pid = spawn_daemon([*cmd], os.path.join(store, "daemon.log"))
    print(f"mounted {args.src} on {args.mnt} (store {store}, pid {pid})")
    return 0


def refuse_busy_source(src: str) -> None:
    """An app that has a file (or its cwd) under SRC when the mount goes over it keeps
    using the Phase 3 copy underneath: its writes never show in the mount and are
    lost for Phase 4. Mmapped files and cwds count as fuser -m counts them."""
    holders = procscan.under(src)
    if holders:
        raise SourceBusy(
            f"processes use files under {src}, which an in-place mount would hide from them: "
            f"{procscan.describe(holders)}; stop them first, or --force"
        )

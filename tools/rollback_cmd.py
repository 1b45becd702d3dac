"""Back out: stop the mount and show the untouched Phase 3 tree read-only in its place.

As root that is a read-only bind mount; otherwise a read-only passthrough FUSE
mount (fs/passthrough.py), with the mount's `allow_other` kept.

Refuses when files were changed, created or deleted through the mount since
the rollback point, unless told `--export-changes DIR` (each changed or new
file written to a new DIR under its path, and the deletions listed in
DIR/.ferryfs-deleted; see store/export.py for what root does there) or
`--discard-changes` (nothing exported: the changes stay in the store, hidden
while rolled back, and come back at the next `ferryfs mount`). The store is
kept: `ferryfs mount` again returns to Phase 4; `ferryfs umount` removes the
read-only mount.

Every refusal (bad DIR, changes pending, an unsafe place for the rollback
record) comes before anything is unmounted. The record is written before the
read-only mount and dropped if that mount fails, so `umount` and `mount`
always find a state they understand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ferryfs.store import points
from ferryfs.store.changes import Changes, find_changes
from ferryfs.store.errors import FerryError, UsageError
from ferryfs.store.export import Exported, ExportFailed, check_dest, export_changes, open_dest
from ferryfs.store.phase3 import Phase3Tree
from ferryfs.store.store import Store

from . import rollbacks
from ._common import confirm
from .daemons import Busy, in_use, spawn_daemon, stop_daemon
from .mounts import control_get, control_set, mount_options, status


class ChangesPending(FerryError):
    exit_code = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mnt", help="the ferryfs mountpoint")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "--force",
        action="store_true",
        help="roll back even while processes use files on the mount (they lose them)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--export-changes",
        metavar="DIR",
        help="write changed and new files to DIR (new, or empty and yours; outside the mount, "
        "Phase 3 and the store)",
    )
    g.add_argument(
        "--discard-changes",
        action="store_true",
        help="roll back without exporting the changes: they stay in the store, hidden while "
        "rolled back, and come back at the next `ferryfs mount`",
    )


def run(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mnt)
    st = status(mnt)
    store_dir, pid = st["store"], int(control_get(mnt, "pid"))
    allow_other = "allow_other" in mount_options(mnt)
    rollbacks.check()  # a private place for the record, before anything changes
    use = in_use(mnt)  # an app still using the mount would lose its files: as umount does
    if use.busy and not args.force:
        raise Busy(
            f"{args.mnt} is busy: {use.describe()}; close them and retry, or --force "
            "(roll back now; they lose their open files)"
        )
    with Store.open(store_dir, readonly=True) as store:
        src = store.source_path()
        if src is None:
            raise FerryError(f"store {store_dir} records no Phase 3 source")
        forbidden = [("the mount", mnt), ("the Phase 3 tree", src), ("the store", store_dir)]
        if args.export_changes:
            check_dest(args.export_changes, forbidden)
        control_set(mnt, "sync")
        if points.released(store):
            raise FerryError(
                "the Phase 3 data was deleted by `points expire`: nothing to roll back to"
            )
        # In place, SRC is shadowed by the mount: reach it through the daemon's fd.
        tree = Phase3Tree.open(f"/proc/{pid}/fd/{int(control_get(mnt, 'srcfd'))}")
        try:
            changes = find_changes(store, tree)
            n = _count(changes)
            if changes and not (args.export_changes or args.discard_changes):
                raise ChangesPending(
                    f"{len(changes.changed) + len(changes.moved_dirs)} changed or new and "
                    f"{len(changes.deleted)} deleted since the rollback point; rerun with "
                    "--export-changes DIR or --discard-changes"
                )
            if not args.yes and not _ask_rollback(mnt, src, n, bool(args.discard_changes)):
                print("ferryfs: rollback cancelled", file=sys.stderr)
                return 1
            if changes and args.export_changes:
                done = _export(store, tree, changes, args.export_changes, forbidden)
                print(_exported_line(n, args.export_changes, done))
        finally:
            tree.close()
    if st.get("sweep_state") not in (None, "off", "done", "cancelled"):
        control_set(mnt, "cancel")
    stop_daemon(mnt, pid)
    rollbacks.record(mnt, src, store_dir)
    try:
        show_readonly(src, mnt, store_dir, allow_other)
    except BaseException:
        rollbacks.forget(mnt)  # nothing shown: `ferryfs mount` may go straight back
        raise
    kept = (
        f"; {n} changes not exported stay in the store and come back at the next `ferryfs mount`"
        if changes and args.discard_changes
        else ""
    )
    print(
        f"rolled back: {mnt} shows the Phase 3 tree {src} read-only; "
        f"store kept at {store_dir}{kept}"
    )
    return 0


def _count(changes: Changes) -> int:
    return len(changes.changed) + len(changes.moved_dirs) + len(changes.deleted)


def _ask_rollback(mnt: str, src: str, n: int, discard: bool) -> bool:
    if not sys.stdin.isatty():
        raise UsageError("rollback asks for confirmation: pass --yes when not on a terminal")
    kept = f", leaving {n} changes in the store (not exported)" if discard and n else ""
    return confirm(f"unmount {mnt}{kept}, and show {src} read-only there? [y/N] ")


def _export(
    store: Store, tree: Phase3Tree, changes: Changes, dest: str, forbidden: list[tuple[str, str]]
) -> Exported:
    fd = open_dest(dest, forbidden)
    try:
        return export_changes(store, tree, changes, fd)
    except OSError as e:
        where = f" at {os.fsdecode(e.filename)}" if e.filename else ""
        raise ExportFailed(
            f"export to {dest} failed{where}: {e.strerror or e}; nothing was unmounted"
        ) from None
    finally:
        os.close(fd)


def _exported_line(n: int, dest: str, done: Exported) -> str:
    line = f"exported {n} changes to {dest}"
    if done.stripped:
        line += (
            f"; setuid/setgid removed from {len(done.stripped)} files "
            f"(listed in {os.path.join(dest, '.ferryfs-modes')})"
        )
    return line


def show_readonly(src: str, mnt: str, store_dir: str, allow_other: bool) -> None:
    if os.geteuid() == 0:
        bind_readonly(src, mnt)
        return
    cmd = [sys.executable, "-m", "ferryfs.fs.passthrough", src, mnt]
    if allow_other:
        cmd.append("--allow-other")
    spawn_daemon(cmd, os.path.join(store_dir, "readonly.log"))


def bind_readonly(src: str, mnt: str) -> None:
    for cmd in (["mount", "--bind", src, mnt], ["mount", "-o", "remount,bind,ro", mnt]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            if cmd[1] != "--bind":
                subprocess.run(["umount", mnt], capture_output=True)  # never leave it writable
            raise FerryError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")

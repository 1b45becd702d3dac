"""Back out: stop the mount and show the untouched Phase 3 tree read-only in its place.

As root that is a read-only bind mount; otherwise a read-only passthrough FUSE
mount (fs/passthrough.py).

Refuses when files were changed, created or deleted through the mount since
the rollback point, unless told `--export-changes DIR` (each changed or new
file written to DIR under its path, and the deletions listed in
DIR/.ferryfs-deleted) or `--discard-changes`. The store is kept: `ferryfs
mount` again returns to Phase 4; `ferryfs umount` removes the read-only mount.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ferryfs.store import points
from ferryfs.store.changes import Changes, find_changes
from ferryfs.store.errors import FerryError, UsageError
from ferryfs.store.phase3 import Phase3Tree
from ferryfs.store.store import Store

from . import rollbacks
from .mount_cmd import spawn_daemon
from .mounts import control_get, control_set, status
from .umount_cmd import stop_daemon


class ChangesPending(FerryError):
    exit_code = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mnt", help="the ferryfs mountpoint")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--export-changes", metavar="DIR", help="write changed and new files here")
    g.add_argument("--discard-changes", action="store_true", help="lose changes made since")


def run(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mnt)
    st = status(mnt)
    store_dir, pid = st["store"], int(control_get(mnt, "pid"))
    export = os.path.abspath(args.export_changes) if args.export_changes else None
    if export and (export == mnt or export.startswith(mnt.rstrip("/") + "/")):
        raise UsageError("--export-changes must be outside the mount")
    control_set(mnt, "sync")
    with Store.open(store_dir, readonly=True) as store:
        src = store.source_path()
        if points.released(store):
            raise FerryError(
                "the Phase 3 data was deleted by `points expire`: nothing to roll back to"
            )
        if src is None:
            raise FerryError(f"store {store_dir} records no Phase 3 source")
        # In place, SRC is shadowed by the mount: reach it through the daemon's fd.
        tree = Phase3Tree.open(f"/proc/{pid}/fd/{int(control_get(mnt, 'srcfd'))}")
        try:
            changes = find_changes(store, tree)
            n = len(changes.changed) + len(changes.moved_dirs) + len(changes.deleted)
            if changes and not (export or args.discard_changes):
                raise ChangesPending(
                    f"{len(changes.changed) + len(changes.moved_dirs)} changed or new and "
                    f"{len(changes.deleted)} deleted since the rollback point; rerun with "
                    "--export-changes DIR or --discard-changes"
                )
            if not args.yes and not _confirm(mnt, src, n, bool(args.discard_changes)):
                print("ferryfs: rollback cancelled", file=sys.stderr)
                return 1
            if changes and export:
                write_export(store, tree, changes, export)
                print(f"exported {n} changes to {export}")
        finally:
            tree.close()
    if st.get("sweep_state") not in (None, "off", "done", "cancelled"):
        control_set(mnt, "cancel")
    stop_daemon(mnt, pid)
    if os.geteuid() == 0:
        bind_readonly(src, mnt)
    else:
        cmd = [sys.executable, "-m", "ferryfs.fs.passthrough", src, mnt]
        spawn_daemon(cmd, os.path.join(store_dir, "readonly.log"))
    rollbacks.record(mnt, src, store_dir)
    print(f"rolled back: {mnt} shows the Phase 3 tree {src} read-only; store kept at {store_dir}")
    return 0


def _confirm(mnt: str, src: str, n: int, discard: bool) -> bool:
    if not sys.stdin.isatty():
        raise UsageError("rollback asks for confirmation: pass --yes when not on a terminal")
    lost = f" and discard {n} changes" if discard and n else ""
    answer = input(f"unmount {mnt}{lost}, and show {src} read-only there? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def write_export(store: Store, tree: Phase3Tree, changes: Changes, dest: str) -> None:
    """Write each changed or new file under `dest` with its path, and the deletions list."""
    from ferryfs.store.export import export_changes

    export_changes(store, tree, changes, dest)


def bind_readonly(src: str, mnt: str) -> None:
    for cmd in (["mount", "--bind", src, mnt], ["mount", "-o", "remount,bind,ro", mnt]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise FerryError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")

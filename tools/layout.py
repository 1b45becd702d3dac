"""Refusals of unsafe layouts of source, mountpoint and store, shared by `mount`
and `migrate`. Paths are compared as real paths (symlinks and `..` resolved), so
that no spelling of a path slips past; each refusal is one line and exit 2.

- A mountpoint inside SRC: the daemon would read its own mount through the tree
  it serves (a listing hangs in D state, unkillable). MNT == SRC is the in-place
  mount and fine; a mountpoint above SRC would hide SRC under the mount.
- A store inside SRC: it shows up in the app's tree, and the sweep would try to
  migrate the store into itself. Inside the mountpoint: the mount hides it.
  Beside SRC (the default `SRC.ferry`) is fine.
- A SRC that is, or lies inside, a ferryfs mount: that is a migrated tree
  already, served by another daemon; its Phase 3 tree is what to give.
"""

from __future__ import annotations

import os

from ferryfs.store.errors import UsageError

from .mounts import FS_TYPE, containing_mount, within


def check(src: str, store: str, mnt: str | None = None) -> None:
    rsrc, rstore = os.path.realpath(src), os.path.realpath(store)
    m = containing_mount(rsrc)
    if m is not None and m.fstype == FS_TYPE:
        at = os.fsdecode(m.point)
        where = "is a ferryfs mount" if at == rsrc else f"is inside the ferryfs mount at {at}"
        raise UsageError(f"source {src} {where}: give the Phase 3 tree, not a mount of it")
    if within(rstore, rsrc):
        raise UsageError(
            f"store {store} is inside the source {src}: it would show up in the app's tree; "
            "put it beside the source (the default is SRC.ferry)"
        )
    if mnt is None:
        return
    rmnt = os.path.realpath(mnt)
    if rmnt != rsrc and within(rmnt, rsrc):
        raise UsageError(
            f"mountpoint {mnt} is inside the source {src}: the daemon would read its own mount; "
            "mount on the source itself (in place) or outside it"
        )
    if rmnt != rsrc and within(rsrc, rmnt):
        raise UsageError(f"mountpoint {mnt} contains the source {src}: the mount would hide it")
    if within(rstore, rmnt):
        raise UsageError(f"store {store} is inside the mountpoint {mnt}: the mount would hide it")


def in_place(src: str, mnt: str) -> bool:
    return os.path.realpath(src) == os.path.realpath(mnt)

"""Finding and talking to a live ferryfs mount from the CLI (the control xattrs),
recognising a dead one (its daemon gone) and cleaning it up, and the path
comparisons that keep a mount, its source and its store apart."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from typing import Any

from ferryfs.fs.mountinfo import MountEntry, mount_entries
from ferryfs.store.errors import FerryError

PREFIX = "user.ferryfs."
FS_TYPE = "fuse.ferryfs"
# What a FUSE mount whose daemon died answers every request with.
DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


class NotMounted(FerryError):
    exit_code = 1


class DeadMount(FerryError):
    exit_code = 1


def mount_at(path: str) -> MountEntry | None:
    """The mount exactly at `path` (the last one mounted there: the visible one)."""
    real = os.fsencode(os.path.realpath(path))
    found = None
    for m in mount_entries():
        if m.point == real:
            found = m
    return found


def mount_options(path: str) -> set[str]:
    """The options of the mount exactly at `path` (per-mount and superblock)."""
    m = mount_at(path)
    return set(m.options) if m is not None else set()


def fs_type(path: str) -> str | None:
    """The filesystem type mounted exactly at `path`, from the mount table."""
    m = mount_at(path)
    return m.fstype if m is not None else None


def containing_mount(path: str) -> MountEntry | None:
    """The mount that `path` (a real path or not) lies on: the nearest mount point
    at or above it."""
    real = os.fsencode(os.path.realpath(path))
    best: MountEntry | None = None
    for m in mount_entries():
        if within(real, m.point) and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def within(child: bytes | str, parent: bytes | str) -> bool:
    """`child` is `parent` or lies under it (both real paths, same type)."""
    c, p = os.fsencode(child), os.fsencode(parent)
    return c == p or c.startswith(p.rstrip(b"/") + b"/")


def is_ferryfs(path: str) -> bool:
    return fs_type(path) == FS_TYPE


def is_dead(path: str) -> bool:
    """`path` is a ferryfs mount whose daemon is gone: every request on it fails
    with ENOTCONN, and only an unmount gets rid of it."""
    if fs_type(path) != FS_TYPE:
        return False
    try:
        # statfs always asks the daemon; stat may be answered from cached attributes.
        os.statvfs(path)
    except OSError as e:
        return e.errno in DEAD_ERRNOS
    return False


def clean_dead(path: str) -> None:
    """Unmount the dead ferryfs mount at `path`. Lazily: nothing can be saved from a
    dead daemon, and a process still holding a file there must not keep it."""
    r = subprocess.run(
        ["fusermount3", "-u", "-z", os.path.abspath(path)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if r.returncode != 0:
        why = r.stderr.strip().splitlines()[-1:] or [f"fusermount3 exited {r.returncode}"]
        raise FerryError(f"could not clean up the dead ferryfs mount at {path}: {why[0]}")


def _dead(mnt: str) -> DeadMount:
    return DeadMount(
        f"{mnt} is a dead ferryfs mount (its daemon is gone); `ferryfs umount {mnt}` cleans it up"
    )


def control_get(mnt: str, name: str) -> bytes:
    if not is_ferryfs(mnt):
        raise NotMounted(f"{mnt} is not a ferryfs mount")
    try:
        return os.getxattr(mnt, PREFIX + name)
    except PermissionError:
        raise FerryError(f"only the owner of the mount at {mnt} (or root) may do that") from None
    except OSError as e:
        if e.errno in DEAD_ERRNOS:
            raise _dead(mnt) from None
        raise


def control_set(mnt: str, command: str) -> None:
    if not is_ferryfs(mnt):
        raise NotMounted(f"{mnt} is not a ferryfs mount")
    try:
        os.setxattr(mnt, PREFIX + "control", command.encode())
    except PermissionError:
        raise FerryError(f"only the owner of the mount at {mnt} (or root) may do that") from None
    except OSError as e:
        if e.errno in DEAD_ERRNOS:
            raise _dead(mnt) from None
        raise


def status(mnt: str) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(control_get(mnt, "status"))
    return d

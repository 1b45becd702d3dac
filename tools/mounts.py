"""Finding and talking to a live ferryfs mount from the CLI (the control xattrs)."""

from __future__ import annotations

import json
import os
from typing import Any

from ferryfs.store.errors import FerryError

PREFIX = "user.ferryfs."


class NotMounted(FerryError):
    exit_code = 1


def fs_type(path: str) -> str | None:
    """The filesystem type mounted exactly at `path`, from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            mp = parts[4].encode().decode("unicode_escape")
            if mp == real:
                sep = parts.index("-")
                found = parts[sep + 1]  # the last mount on a path is the visible one
    return found


def is_ferryfs(path: str) -> bool:
    return fs_type(path) == "fuse.ferryfs"


def control_get(mnt: str, name: str) -> bytes:
    if not is_ferryfs(mnt):
        raise NotMounted(f"{mnt} is not a ferryfs mount")
    try:
        return os.getxattr(mnt, PREFIX + name)
    except PermissionError:
        raise FerryError(f"only the owner of the mount at {mnt} (or root) may do that") from None


def control_set(mnt: str, command: str) -> None:
    if not is_ferryfs(mnt):
        raise NotMounted(f"{mnt} is not a ferryfs mount")
    try:
        os.setxattr(mnt, PREFIX + "control", command.encode())
    except PermissionError:
        raise FerryError(f"only the owner of the mount at {mnt} (or root) may do that") from None


def status(mnt: str) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(control_get(mnt, "status"))
    return d

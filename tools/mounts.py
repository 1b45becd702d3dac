"""Finding and talking to a live ferryfs mount from the CLI (the control xattrs)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from ferryfs.store.errors import FerryError

PREFIX = "user.ferryfs."


class NotMounted(FerryError):
    exit_code = 1


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def fs_type(path: str) -> str | None:
    """The filesystem type mounted exactly at `path`, from /proc/self/mountinfo."""
    real = os.fsencode(os.path.realpath(path))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            parts = line.split()
            if _unescape(parts[4]) == real:
                sep = parts.index(b"-")
                found = parts[sep + 1].decode()  # the last mount on a path is the visible one
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

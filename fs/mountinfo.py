"""Reading /proc/self/mountinfo: the one parser of the kernel's mount table.

The daemon uses it to find its own mount's device (`daemon.raise_readahead`),
the CLI to recognise mounts and read their options (`tools/mounts.py`). It
imports neither pyfuse3 nor trio: `ferryfs status` loads it, and that command's
start-up time is measured (the benchmark's `cli` section).

A line (proc(5)): `ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE
SOURCE SUPER-OPTIONS`. Paths escape space, tab, newline and backslash as `\\ooo`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"

_OCTAL = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    dev: tuple[int, int]  # major, minor: what st_dev and /proc/PID/maps show
    point: bytes  # unescaped
    fstype: str
    options: frozenset[str]  # the per-mount options and the superblock's, together

    @property
    def dev_name(self) -> str:
        """`MAJOR:MINOR`, as /sys/class/bdi names the mount's backing device."""
        return f"{self.dev[0]}:{self.dev[1]}"


def unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def parse_line(line: bytes) -> MountEntry:
    """One mountinfo line; ValueError (or IndexError) if it is not one."""
    parts = line.split()
    sep = parts.index(b"-", 6)  # optional fields come between OPTIONS and "-"
    major, minor = parts[2].split(b":")
    return MountEntry(
        mount_id=int(parts[0]),
        dev=(int(major), int(minor)),
        point=unescape(parts[4]),
        fstype=parts[sep + 1].decode(),
        options=frozenset(parts[5].decode().split(",") + parts[sep + 3].decode().split(",")),
    )


def parse(lines: Iterable[bytes]) -> list[MountEntry]:
    """Every entry of a mount table, in its order (the last mounted last)."""
    return [parse_line(line) for line in lines if line.strip()]


def mount_entries() -> list[MountEntry]:
    """This process's mount table, oldest mount first."""
    with open(MOUNTINFO, "rb") as f:
        return parse(f)

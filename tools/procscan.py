"""Which processes use files under a directory or on a mount, found the way
`fuser -m` finds them: each process's open fds, its cwd and root, and the files
it has mapped (/proc/PID/fd, cwd, root, maps).

Two questions, two ways of matching:
- `under(root)`, before an in-place mount: a process whose fd, cwd, root or
  mapping lies under ROOT keeps using the Phase 3 copy once the mount shadows
  it (its writes land there, never in the mount). Matched by path (readlink),
  as the tree has no mount of its own to match by.
- `on_mount(point)`, before an unmount: matched by mount (an fd's `mnt_id` in
  its fdinfo, a mapping's device), which needs no request to the mount's
  daemon and never mistakes the daemon's own fd on the shadowed tree of an
  in-place mount (same path, other mount) for a user of the mount.

A process this user may not inspect (another user's, when not root) is skipped:
its fds cannot be read. Our own process is skipped too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ferryfs.fs.mountinfo import mount_entries

from .mounts import mount_at


@dataclass(frozen=True)
class Holder:
    """One use of a file by a process."""

    pid: int
    command: str
    how: str  # "fd 3", "cwd", "root" or "mmap"
    path: str
    ino: int | None = None  # of an fd's file, from its fdinfo


def describe(holders: list[Holder], limit: int = 5) -> str:
    """`app (pid 12: fd 3 /x/a, cwd /x)`, one entry per process, the first `limit`."""
    by_pid: dict[int, list[Holder]] = {}
    for h in holders:
        by_pid.setdefault(h.pid, []).append(h)
    parts = []
    for pid, hs in list(by_pid.items())[:limit]:
        uses = ", ".join(f"{h.how} {h.path}" for h in hs[:3]) + (" ..." if len(hs) > 3 else "")
        parts.append(f"{hs[0].command} (pid {pid}: {uses})")
    more = len(by_pid) - limit
    return "; ".join(parts) + (f"; and {more} more processes" if more > 0 else "")


def _pids() -> Iterator[int]:
    me = os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            yield int(name)


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # gone, or not ours to read
        return None


def _fdinfo(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
    except OSError:
        return {}


def _mnt_id_of_link(link: str) -> int | None:
    """The mount a /proc magic link (cwd, root) points into. An O_PATH open follows
    the link without asking the filesystem anything (a dead or busy FUSE daemon
    cannot block it); our fdinfo of it names the mount."""
    try:
        fd = os.open(link, os.O_PATH)
    except OSError:
        return None
    try:
        v = _fdinfo(f"/proc/self/fdinfo/{fd}").get("mnt_id")
        return int(v) if v is not None else None
    finally:
        os.close(fd)


def _maps(pid: int) -> Iterator[tuple[tuple[int, int], str]]:
    """(device, path) of each file `pid` has mapped, once per file."""
    seen = set()
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith(b"/") or fields[4] == b"0":
            continue
        major, minor = (int(x, 16) for x in fields[3].split(b":"))
        path = os.fsdecode(fields[5])
        if (major, minor, path) not in seen:
            seen.add((major, minor, path))
            yield (major, minor), path


def _scan(
    fd_matches: Callable[[str, dict[str, str]], bool],
    link_matches: Callable[[str, str], bool],
    map_matches: Callable[[tuple[int, int], str], bool],
) -> list[Holder]:
    out: list[Holder] = []
    for pid in _pids():
        base = f"/proc/{pid}"
        found: list[Holder] = []
        for how in ("cwd", "root"):
            target = _readlink(f"{base}/{how}")
            if target is not None and link_matches(f"{base}/{how}", target):
                found.append(Holder(pid, "", how, target))
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            fds = []
        for n in sorted(fds, key=int):
            target = _readlink(f"{base}/fd/{n}")
            if target is None or not target.startswith("/"):
                continue  # pipes, sockets, anonymous inodes
            info = _fdinfo(f"{base}/fdinfo/{n}")
            if fd_matches(target, info):
                ino = info.get("ino")
                found.append(Holder(pid, "", f"fd {n}", target, int(ino) if ino else None))
        for dev, path in _maps(pid):
            if map_matches(dev, path):
                found.append(Holder(pid, "", "mmap", path))
        if found:
            cmd = _command(pid)
            out.extend(Holder(h.pid, cmd, h.how, h.path, h.ino) for h in found)
    return out


def _strip_deleted(path: str) -> str:
    return path.removesuffix(" (deleted)")


def under(root: str) -> list[Holder]:
    """Processes using anything at or under the directory `root` (by path)."""
    real = os.path.realpath(root).rstrip("/") or "/"

    def inside(path: str) -> bool:
        p = _strip_deleted(path)
        return p == real or p.startswith(real.rstrip("/") + "/")

    return _scan(
        lambda target, _info: inside(target),
        lambda _link, target: inside(target),
        lambda _dev, path: inside(path),
    )


def on_mount(point: str) -> list[Holder]:
    """Processes using anything on the filesystem mounted at `point` (by mount:
    every mount of the same device counts, so a bind mount of it does too)."""
    m = mount_at(point)
    if m is None:
        return []
    ids = {e.mount_id for e in mount_entries() if e.dev == m.dev}
    return _scan(
        lambda _target, info: info.get("mnt_id", "").isdigit() and int(info["mnt_id"]) in ids,
        lambda link, _target: _mnt_id_of_link(link) in ids,
        lambda dev, _path: dev == m.dev,
    )

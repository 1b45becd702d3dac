"""The read-only Phase 3 mounts that `ferryfs rollback` left, so `ferryfs umount` knows them.

Kept as one line per mount (mountpoint, source, store; tab-separated) in
/run/ferryfs/rollbacks, or $XDG_RUNTIME_DIR/ferryfs/rollbacks when not root.
"""

from __future__ import annotations

import os


def _file() -> str:
    base = "/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return os.path.join(base, "ferryfs", "rollbacks")


def _read() -> list[list[str]]:
    try:
        with open(_file(), encoding="utf-8") as f:
            return [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _write(rows: list[list[str]]) -> None:
    path = _file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines("\t".join(r) + "\n" for r in rows)
    os.replace(tmp, path)


def record(mnt: str, src: str, store: str) -> None:
    _write([r for r in _read() if r[0] != mnt] + [[mnt, src, store]])


def lookup(mnt: str) -> list[str] | None:
    return next((r for r in _read() if r[0] == mnt), None)


def forget(mnt: str) -> None:
    _write([r for r in _read() if r[0] != mnt])

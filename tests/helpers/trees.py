"""Reading a plain directory tree back, for comparing it with what a store serves."""

from __future__ import annotations

import os
from pathlib import Path


def files_of(root: Path | str) -> dict[str, bytes]:
    """Relative path (str, no leading slash) -> content of every regular file under
    `root`; symlinks are neither followed nor listed."""
    out: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out

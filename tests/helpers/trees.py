"""Plain directory trees for the tests: reading one back, for comparing it with
what a store serves, and the prose that session-like text is made of."""

from __future__ import annotations

import os
import random
from pathlib import Path

# Few words, often repeated: text that compresses (and trains a dictionary) as
# session logs do.
WORDS = (
    "session",
    "agent",
    "token",
    "chunk",
    "store",
    "migrate",
    "commit",
    "branch",
    "error",
    "retry",
    "cache",
    "the",
    "of",
)


def prose(rng: random.Random, nwords: int) -> str:
    """`nwords` words of WORDS, picked by `rng`, separated by spaces."""
    return " ".join(rng.choice(WORDS) for _ in range(nwords))


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

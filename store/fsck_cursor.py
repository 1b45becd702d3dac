"""Where a `--max-duration` run of fsck stopped: `fsck.cursor` in the store
directory holds the phase, the next item, and the items that had problems (the
next run checks those again first, so nothing found is forgotten)."""

from __future__ import annotations

import json
import time
from typing import Any

from .errors import FerryError
from .storedir import StoreDir

CURSOR = "fsck.cursor"
PHASES = ("points", "files", "chunks")


def load(sd: StoreDir | None, deep: bool) -> dict[str, Any] | None:
    """The cursor a run with the same `deep` left; None if none or unreadable."""
    try:
        raw = sd.read_file(CURSOR) if sd is not None else None
        if raw is None:
            return None
        c: dict[str, Any] = json.loads(raw)
        if c["deep"] != deep or c["phase"] not in PHASES:
            return None
        bytes.fromhex(c["next"])
        return c
    except (OSError, FerryError, ValueError, KeyError, TypeError):
        return None  # unreadable: start again from the beginning


def save(
    sd: StoreDir | None,
    deep: bool,
    point: int | None,
    phase: str,
    nxt: bytes,
    carried: list[tuple[str, bytes]],
) -> str | None:
    """Write the cursor; a note for the report if it cannot be written."""
    if sd is None:
        return None
    doc = {
        "deep": deep,
        "point": point,
        "phase": phase,
        "next": nxt.hex(),
        "carried": [[ph, k.hex()] for ph, k in carried],
        "saved_ns": time.time_ns(),
    }
    try:
        sd.write_file(CURSOR, json.dumps(doc).encode())
    except (OSError, FerryError) as e:
        return f"cannot save where it stopped ({e}): the next run starts over"
    return None


def clear(sd: StoreDir | None, deep: bool) -> None:
    """The run finished: the next one starts from the beginning."""
    if sd is not None and load(sd, deep) is not None:
        sd.unlink(CURSOR)

"""What several commands share that is only text for a terminal: asking for a
yes, sizes in MB, paths that may not be UTF-8, and the "on disk" and "saved"
rows that `status` and `stats` both print.

Standard library only: `ferryfs status` imports it, and that command's
start-up time is measured (the benchmark's `cli` section). What commands share
about a running daemon is in `daemons.py`.
"""

from __future__ import annotations


def confirm(question: str) -> bool:
    """Ask `question` (ending in "? [y/N] ") on the terminal; True only for y/yes."""
    return input(question).strip().lower() in ("y", "yes")


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def shown(text: str) -> str:
    """Text for a terminal, on one line: bytes that are not UTF-8 (kept by
    os.fsdecode as surrogates) and characters that are not printable (a newline,
    an escape sequence in a damaged or hostile name) become backslash escapes, so
    the output is valid UTF-8, one line per item, and cannot drive the terminal."""
    s = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in s)


def saved_text(on_disk: float, chunks: float, migrated: float) -> str:
    """What `status` and `stats` say in their "saved" row. Saved is always
    1 - bytes on disk / bytes migrated: the disk the operator gets back, after
    the store's own records (plan estimates the same figure before a migration)."""
    if not migrated:
        return "nothing migrated yet"
    saved = 1 - on_disk / migrated
    if saved <= 0:
        return (
            f"not yet ({mb(migrated)} migrated so far; "
            f"the store's records take {mb(max(0, on_disk - chunks))})"
        )
    return f"{saved:.0%} of the migrated bytes"


def on_disk_text(on_disk: float, chunks: float) -> str:
    """The store's size on disk, split into chunk bytes and everything else: names,
    inodes and extents, the rollback point's manifest, free LMDB pages."""
    return (
        f"{mb(on_disk)}: {mb(chunks)} of chunks, "
        f"{mb(max(0, on_disk - chunks))} of records (names, inodes, rollback point)"
    )

"""Idle-time work on chunk records: moving small records stored alone (schema 1)
into packs, compacting mostly dead packs, and (recompress.py) cold recompression.

Each piece is one short write transaction (a few milliseconds: at most one pack,
about 512 KiB, copied), so the writer is never held long; `stop` is polled
between pieces, so a foreground request pre-empts the work as it does the sweep.
A crash between pieces loses nothing: each piece moves its chunks whole, and
the next run finds what is left from the store itself (the upgrade's cursor is
in meta; compaction looks for victims afresh).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol, TypeVar

from . import packs
from .kv import Backend, Txn

T = TypeVar("T")


class Host(Protocol):
    backend: Backend

    def transact(self, fn: Callable[[Txn], T]) -> T: ...


def upgrade(s: Host, stop: Callable[[], bool] | None = None) -> bool:
    """Move schema 1's small records into packs until done (True) or `stop` says so."""
    while True:
        with s.backend.read() as txn:
            if packs.upgraded(txn):
                return True
        if s.transact(packs.upgrade_batch):
            return True
        if stop is not None and stop():
            return False


def compact(s: Host, stop: Callable[[], bool] | None = None) -> int:
    """Compact the mostly dead packs, one per transaction; the packs compacted.
    Stops early when `stop` says so (what is left is found again next time)."""
    done = 0
    while True:
        with s.backend.read() as txn:
            victims = packs.victims(txn)
            if not victims:
                return done
            members = packs.members(txn, set(victims))
        for pack in victims:
            if stop is not None and stop():
                return done
            chunks = members[pack]
            s.transact(partial(packs.move_out, pack=pack, chunks=chunks))
            done += 1


def step(s: Host, stop: Callable[[], bool] | None = None) -> bool:
    """Do what chunk upkeep there is (upgrade, then compaction), as long as `stop`
    allows; True if there was anything to do."""
    with s.backend.read() as txn:
        todo = not packs.upgraded(txn) or bool(packs.victims(txn, limit=1))
    if not todo:
        return False
    if upgrade(s, stop):
        compact(s, stop)
    return True

"""Idle-time work on chunk records: moving small records stored alone (schema 1)
into packs, compacting mostly dead packs, training the store's zstd dictionary
(dictionaries.py), and (recompress.py) cold recompression.

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

from . import dictionaries, packs
from .dictionaries import Dictionary
from .kv import Backend, Txn
from .records import U64

T = TypeVar("T")

# A store without enough text to train a dictionary is looked at again once this
# many packs (512 KiB each) were made since.
RETRY_PACKS = 8
TRIED = b"dict.tried"  # packs.next when training was last tried and found too little


class Host(Protocol):
    backend: Backend
    dictionary: Dictionary | None

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


def train(s: Host) -> bool:
    """Train the store's dictionary if it has none and enough text (dictionaries.py);
    tried again only once the store has grown by `RETRY_PACKS` packs since."""
    if s.dictionary is not None:
        return False
    with s.backend.read() as txn:
        nv = txn.get("meta", packs.NEXT_KEY)
        made = U64.unpack(nv)[0] if nv is not None else 0
        tv = txn.get("meta", TRIED)
        if tv is not None and made < U64.unpack(tv)[0] + RETRY_PACKS:
            return False
    d = dictionaries.train(s)
    if d is None:
        s.transact(lambda txn: txn.put("meta", TRIED, U64.pack(made)))
        return False
    s.dictionary = d
    return True


def step(s: Host, stop: Callable[[], bool] | None = None) -> bool:
    """Do what chunk upkeep there is (upgrade, compaction, training a dictionary),
    as long as `stop` allows; True if there was anything to do."""
    with s.backend.read() as txn:
        todo = not packs.upgraded(txn) or bool(packs.victims(txn, limit=1))
    if todo and upgrade(s, stop):
        compact(s, stop)
    if stop is not None and stop():
        return todo
    return train(s) or todo

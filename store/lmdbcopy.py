"""The store's LMDB database rewritten into a new environment with every B-tree
page full and no page free (the offline rewrite `migrate` and `recompress` end
with, upkeep.shrink_file): what LmdbBackend.copy_compact does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import lmdb

from .errors import StoreDamaged


def copy(
    env: lmdb.Environment,
    dest: str,
    map_size: int,
    max_dbs: int,
    lead: Mapping[str, Iterable[bytes]] | None = None,
) -> None:
    """Write `env`'s database as `dest`/data.mdb (a new environment), without its
    free pages and with its B-tree pages full.

    LMDB's own compacting copy keeps each page as it is, and LMDB splits a full
    page in the middle unless the key goes at the very end of the database: keys
    inserted at random (digests, hashed names) or in ascending runs that end
    before other keys (a rollback point's rows, sorted 4096 at a time, before
    its header) leave pages 50-70% full: after a migration of 24,000 small files
    the tables other than packs took 26.0 MB of pages, and 4.3 MB more were
    free; this copy of them takes 20.0 MB. So
    every named database is copied in key order, appended (MDB_APPEND), which
    fills each page; in transactions of at most COPY_TXN_BYTES, so that a copy
    of a large store never holds it all as dirty pages.

    `lead`: for a database named there, those of its keys first, in that order,
    then the others: a large value's pages are laid out in the order it is put,
    and a file's chunks stored alone read fastest one after the other on disk
    (in key order, the order of their digests, a cold read of a large file would
    seek at every chunk). That database's pages are then not all full."""
    out = lmdb.open(
        dest,
        map_size=map_size,
        max_dbs=max_dbs,
        lock=False,
        sync=False,
        metasync=False,
        mode=0o600,
    )
    try:
        with env.begin(buffers=True) as src:
            names = [bytes(k) for k, _ in src.cursor()]  # the main db: db names
            for name in names:
                db = env.open_db(name, txn=src, create=False)
                first = (lead or {}).get(name.decode())
                if first is None:
                    _copy_db(src, db, out, name)
                else:
                    _copy_db_led(src, db, out, name, first)
        out.sync(True)
    finally:
        out.close()


COPY_TXN_BYTES = 64 << 20


def _copy_db(src: lmdb.Transaction, db: lmdb._Database, out: lmdb.Environment, name: bytes) -> None:
    """Append every item of `db` to a new database `name` of `out` (see copy_compact)."""
    dest = out.open_db(name)
    with src.cursor(db=db) as cur:
        more = cur.first()
        while more:
            with out.begin(write=True) as txn, txn.cursor(db=dest) as w:
                size = 0
                while more and size < COPY_TXN_BYTES:
                    k, v = cur.item()
                    if not w.put(k, v, append=True):
                        raise StoreDamaged(f"keys out of order in database {name!r}")
                    size += len(k) + len(v)
                    more = cur.next()


def _copy_db_led(
    src: lmdb.Transaction, db: lmdb._Database, out: lmdb.Environment, name: bytes,
    first: Iterable[bytes],
) -> None:  # fmt: skip
    """Put the items of `db` whose keys `first` names, in its order, then the
    others in key order, into a new database `name` of `out` (see copy_compact)."""
    dest = out.open_db(name)

    def items() -> Iterator[tuple[bytes | memoryview, bytes | memoryview]]:
        for k in first:
            v = src.get(k, db=db)
            if v is not None:
                yield k, v
        yield from src.cursor(db=db)

    it = items()
    more = True
    while more:
        more = False
        with out.begin(write=True) as txn:
            size = 0
            for k, v in it:
                txn.put(k, v, db=dest, overwrite=False)  # (a key led and met again: kept)
                size += len(k) + len(v)
                if size >= COPY_TXN_BYTES:
                    more = True
                    break

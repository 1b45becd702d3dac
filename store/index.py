"""The search index: a tantivy index of the files' words in `STORE/index/`, and
its bookkeeping in the store's `index` database, which says what the tantivy
index can be trusted for.

The tantivy index is a cache. The store's `index` database, written in the
same transactions as the files themselves, holds:

- `D` + ino: *dirty*. Every write of a regular file's inode record and of an
  UNLISTED directory's marks it (namespace.put calls `touched`), and so does
  a purge (namespace.purge): any
  change to a file's content (its `version` goes up), to its names (a rename
  or link writes its ctime) or a file imported from Phase 3 leaves a mark in
  the very transaction that made it. Marks are over-approximate; only a
  missing mark would be wrong.
- `V` + ino: the content version and text kind (text.kind) the tantivy
  index holds a document for. Written only after tantivy committed that
  document, in a transaction that drops the `D` mark only if the version and
  every current name's kind still match.
- `N` + ino + parent + name: the names of an inode (namespace.add_entry and
  remove_entry call `entry`), so a hit's paths come from the namespace as it is now and a
  rename re-indexes nothing.
- `I`: the identity of the tantivy index these rows describe (also written in
  `STORE/index/ident`). Set once every file was marked and every name
  recorded; without it, or if the tantivy index is gone or another one,
  nothing is trusted and search reads every file.

This module is the bookkeeping (read by search.py and fsck, written by the
namespace's hooks) and invariant 7's check; index_writer.py brings the tantivy
index and these rows up to date.

So a file is *trusted* when `V` equals its (version, kind): its tantivy
document is its text. Every other file is marked, and a query reads the marked
ones. A crash anywhere leaves `V` behind tantivy, never ahead of it: the index
may lag, never lie.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import text
from .kv import Txn
from .records import U64, Inode, dirent_key, ino_key
from .storedir import INDEX

DB = "index"
DIRTY = b"D"
VER = b"V"
NAME = b"N"
IDENT = b"I"
INDEX_DIR = INDEX

_VER = struct.Struct(">QB")


def dirty_key(ino: int) -> bytes:
    return DIRTY + ino_key(ino)


def ver_key(ino: int) -> bytes:
    return VER + ino_key(ino)


def name_key(ino: int, parent: int, name: bytes) -> bytes:
    return NAME + ino_key(ino) + ino_key(parent) + name


# -- hooks (called inside the namespace's and store's write transactions) ---------------


def mark(txn: Txn, ino: int) -> None:
    txn.put(DB, dirty_key(ino), b"")


def named(txn: Txn, ino: int, parent: int, name: bytes) -> None:
    txn.put(DB, name_key(ino, parent, name), b"")


def unnamed(txn: Txn, ino: int, parent: int, name: bytes) -> None:
    txn.delete(DB, name_key(ino, parent, name))


def touched(txn: Txn, node: Inode) -> None:
    """namespace.put: a file's or an UNLISTED directory's record was written."""
    if node.is_reg or node.is_unlisted:
        mark(txn, node.ino)


def entry(txn: Txn, parent: int, name: bytes, ino: int | None) -> None:
    """namespace.add_entry (`ino`) and remove_entry (None), before the dirent is
    written: the name rows follow the entry (its old inode loses the name)."""
    old = txn.get("dirents", dirent_key(parent, name))
    if old is not None:
        unnamed(txn, U64.unpack(old)[0], parent, name)
    if ino is not None:
        named(txn, ino, parent, name)


def set_indexed(txn: Txn, ino: int, ver: int, kind: int) -> None:
    """The tantivy index holds (committed) the document of `ino` at `ver`, `kind`."""
    txn.put(DB, ver_key(ino), _VER.pack(ver, kind))


# -- reading the bookkeeping -----------------------------------------------------------------


def names(txn: Txn, ino: int) -> list[tuple[int, bytes]]:
    """(parent, name) of each directory entry naming `ino` now (rows that no
    dirent confirms are skipped)."""
    out = []
    p = NAME + ino_key(ino)
    for k, _ in txn.range(DB, p, NAME + ino_key(ino + 1)):
        parent = U64.unpack_from(k, 9)[0]
        name = k[17:]
        v = txn.get("dirents", dirent_key(parent, name))
        if v is not None and U64.unpack(v)[0] == ino:
            out.append((parent, name))
    return out


def indexed(txn: Txn, ino: int) -> tuple[int, int] | None:
    v = txn.get(DB, ver_key(ino))
    if v is None:
        return None
    ver, kind = _VER.unpack(v)
    return int(ver), int(kind)


def dirty(txn: Txn, after: int = 0) -> Iterator[int]:
    for k, _ in txn.range(DB, dirty_key(after), DIRTY + b"\xff" * 8 + b"\x00"):
        yield U64.unpack_from(k, 1)[0]


def counts(txn: Txn) -> tuple[int, int]:
    """(files indexed at some version, marks pending) for stats and status."""
    if ident(txn) is None:
        return 0, sum(1 for _ in txn.range("inodes", b""))  # nothing is trusted yet
    held = sum(1 for _ in txn.range(DB, VER, bytes([VER[0] + 1])))
    pending = sum(1 for _ in txn.range(DB, DIRTY, bytes([DIRTY[0] + 1])))
    return held, pending


def ident(txn: Txn) -> str | None:
    v = txn.get(DB, IDENT)
    return None if v is None else bytes(v).decode()


def index_dir(store_path: str) -> str:
    return os.path.join(store_path, INDEX_DIR)


def disk_ident(store_path: str) -> str | None:
    try:
        with open(os.path.join(index_dir(store_path), "ident"), "rb") as f:
            return f.read().decode().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def bytes_on_disk(store_path: str | None) -> int:
    if store_path is None:
        return 0
    total = 0
    with contextlib.suppress(OSError), os.scandir(index_dir(store_path)) as it:
        for e in it:
            with contextlib.suppress(OSError):
                total += e.stat(follow_symlinks=False).st_blocks * 512
    return total


# -- tantivy ---------------------------------------------------------------------------------


def schema() -> Any:
    import tantivy

    b = tantivy.SchemaBuilder()
    b.add_unsigned_field("ino", stored=False, indexed=True, fast=True)
    b.add_unsigned_field("ver", stored=False, indexed=False, fast=True)
    b.add_unsigned_field("kind", stored=False, indexed=False, fast=True)
    # No positions: phrases are checked on the candidate files (a positions
    # index is several times bigger). The words come already cut (text.words).
    b.add_text_field("text", stored=False, tokenizer_name="whitespace", index_option="freq")
    return b.build()


def open_index(store_path: str) -> Any:
    """The tantivy index of a store, or None if there is none."""
    import tantivy

    d = index_dir(store_path)
    if not os.path.exists(os.path.join(d, "meta.json")):
        return None
    return tantivy.Index(schema(), path=d, reuse=True)


# -- invariant 7 (fsck) ------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str  # index-gone, index-orphan, index-stale, index-missing, index-unmarked
    ino: int | None
    detail: str


def check(txn: Txn, store_path: str) -> tuple[list[Finding], list[str]]:
    """Invariant 7 on one snapshot: every document the rows vouch for matches the
    current content version of a live file, and every file whose document does
    not is marked. Returns (findings, notes). The tantivy reader is opened after
    the snapshot, so beside a live indexer it can only be ahead, and what it is
    ahead on is marked in the snapshot (or newer than it: skipped)."""
    want = ident(txn)
    if want is None:
        return [], ["no search index yet (migrate or the sweep builds it): invariant 7 not checked"]
    if disk_ident(store_path) != want:
        return [
            Finding("index-gone", None, "the search index directory is missing or another one")
        ], []
    try:
        ix = open_index(store_path)
    except (OSError, ValueError) as e:
        return [Finding("index-gone", None, f"the search index cannot be opened: {e}")], []
    if ix is None:
        return [Finding("index-gone", None, "the search index has no meta.json")], []
    import tantivy

    nv = txn.get("meta", b"next_ino")
    newest = U64.unpack(nv)[0] if nv is not None else 1 << 63
    s = ix.searcher()
    docs: dict[int, tuple[int, int]] = {}
    out: list[Finding] = []
    n = s.num_docs
    if n:
        hits = s.search(tantivy.Query.all_query(), limit=n, count=False).hits
        addrs = [a for _, a in hits]
        for i, v, k in zip(
            s.fast_field_values("ino", addrs),
            s.fast_field_values("ver", addrs),
            s.fast_field_values("kind", addrs),
            strict=True,
        ):
            if i in docs:
                out.append(Finding("index-stale", i, "two documents for one file"))
            docs[i] = (v, k)
    marked = set(dirty(txn))
    for ino, (v, k) in docs.items():
        if ino >= newest:
            continue  # a file made after this snapshot
        rec = txn.get("inodes", ino_key(ino))
        if rec is None:
            if ino not in marked:
                out.append(Finding("index-orphan", ino, "a document for a file that is gone"))
        elif not _vouched(indexed(txn, ino), (v, k)) and ino not in marked:
            out.append(
                Finding("index-stale", ino, f"document of version {v}, not marked for re-indexing")
            )
    for key, _ in txn.range(DB, VER, bytes([VER[0] + 1])):
        ino = U64.unpack_from(key, 1)[0]
        doc = docs.get(ino)
        if doc is None or not _vouched(indexed(txn, ino), doc):
            out.append(
                Finding(
                    "index-missing", ino, "the rows say indexed, the index has no such document"
                )
            )
    for key, val in txn.range("inodes", b""):
        node = Inode.unpack(U64.unpack(key)[0], val)
        if node.ino in marked:
            continue
        if node.is_dir and not node.stored:
            out.append(Finding("index-unmarked", node.ino, "an unlisted directory not marked"))
        elif node.is_reg:
            have = indexed(txn, node.ino)
            for _, name in names(txn, node.ino):
                if have != (node.version, text.kind(name)):
                    out.append(
                        Finding(
                            "index-stale",
                            node.ino,
                            f"content version {node.version} not indexed and not marked",
                        )
                    )
                    break
    return out, []


def _vouched(row: tuple[int, int] | None, doc: tuple[int, int]) -> bool:
    """Whether a `V` row and a document agree (a document ahead of its row is a
    commit whose rows are still to come: the file is marked until then)."""
    return row is not None and (doc == row or doc[0] > row[0])

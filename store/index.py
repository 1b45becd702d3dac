"""The search index: a tantivy index of the files' words in `STORE/index/`, and
its bookkeeping in the store's `index` database, which says what the tantivy
index can be trusted for.

The tantivy index is a cache. The store's `index` database, written in the
same transactions as the files themselves, holds:

- `D` + ino: *dirty*. Every write of a regular file's inode record and of an
  UNLISTED directory's marks it (namespace.put), and so does a purge: any
  change to a file's content (its `version` goes up), to its names (a rename
  or link writes its ctime) or a file imported from Phase 3 leaves a mark in
  the very transaction that made it. Marks are over-approximate; only a
  missing mark would be wrong.
- `V` + ino: the content version and text kind (text.kind) the tantivy
  index holds a document for. Written only after tantivy committed that
  document, in a transaction that drops the `D` mark only if the version and
  every current name's kind still match.
- `N` + ino + parent + name: the names of an inode (namespace.add_entry and
  remove_entry), so a hit's paths come from the namespace as it is now and a
  rename re-indexes nothing.
- `I`: the identity of the tantivy index these rows describe (also written in
  `STORE/index/ident`). Set once every file was marked and every name
  recorded; without it, or if the tantivy index is gone or another one,
  nothing is trusted and search reads every file.

So a file is *trusted* when `V` equals its (version, kind): its tantivy
document is its text. Every other file is marked, and a query reads the marked
ones. A crash anywhere leaves `V` behind tantivy, never ahead of it: the index
may lag, never lie.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from . import text
from .kv import Txn
from .records import U64, Inode, dirent_key, ino_key

if TYPE_CHECKING:
    from .store import Store

DB = "index"
DIRTY = b"D"
VER = b"V"
NAME = b"N"
IDENT = b"I"
INDEX_DIR = "index"

_VER = struct.Struct(">QB")

# A batch of the indexer: one tantivy commit and one store transaction.
BATCH_FILES = 512
BATCH_BYTES = 32 << 20
WRITER_HEAP = 48 << 20
SNIFF = 8192


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


# -- the writer side: one process at a time (the daemon, or migrate/fsck offline) -------------


@dataclass
class Batch:
    # (ino, version or -1 for a non-file, kind, text.index_text or None: "only the mark")
    docs: list[tuple[int, int, int, str | None]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)  # purged inodes


@dataclass
class Progress:
    files: int = 0
    bytes: int = 0
    cleared: int = 0  # marks dropped with no re-indexing (the document still matched)
    errors: int = 0


class Indexer:
    """Brings the tantivy index and the `index` rows up to date with the store.

    Owned by the store's writer (it holds the store's lock, and tantivy's
    writer lock on `STORE/index/`)."""

    def __init__(self, store: Store) -> None:
        if store.path is None:
            raise ValueError("an index needs a store directory")
        self.store = store
        self.path = store.path
        self.index: Any = None
        self.writer: Any = None
        self.progress = Progress()

    def open(self) -> None:
        """Open the tantivy index, or start a new one (marking every file) if the
        store has none or its rows describe another."""
        with self.store.backend.read() as txn:
            want = ident(txn)
        have = disk_ident(self.path)
        idx = open_index(self.path) if want is not None and want == have else None
        if idx is None:
            self._start_over()
            idx = open_index(self.path)
        self.index = idx
        self.writer = idx.writer(heap_size=WRITER_HEAP, num_threads=1)

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.wait_merging_threads()
        self.writer = None
        self.index = None

    def _start_over(self) -> None:
        import secrets
        import shutil

        import tantivy

        # Forget the old identity first: a crash below leaves a store whose
        # index nothing trusts, never rows that describe a half-made index.
        self.store._write(lambda txn: txn.delete(DB, IDENT))
        d = index_dir(self.path)
        if os.path.lexists(d):
            if os.path.isdir(d) and not os.path.islink(d):
                shutil.rmtree(d)
            else:
                os.unlink(d)
        os.mkdir(d, 0o700)
        tantivy.Index(schema(), path=d, reuse=False)
        new = secrets.token_hex(16)
        tmp = os.path.join(d, "ident.tmp")
        with open(tmp, "w") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(d, "ident"))
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._mark_everything()
        self.store._write(lambda txn: txn.put(DB, IDENT, new.encode()))

    def _mark_everything(self) -> None:
        """Drop every `V` row, mark every file and UNLISTED directory, and record
        every name, a few thousand rows per transaction (new writes meanwhile
        mark and name themselves)."""
        for prefix in (VER, NAME):
            while True:

                def drop(txn: Txn, prefix: bytes = prefix) -> int:
                    keys = [
                        k
                        for k, _ in _take(
                            txn.range(DB, prefix, prefix[:-1] + bytes([prefix[-1] + 1])), 4096
                        )
                    ]
                    for k in keys:
                        txn.delete(DB, k)
                    return len(keys)

                if not self.store._write(drop):
                    break
        self._scan("inodes", self._mark_inode)
        self._scan("dirents", self._name_dirent)

    def _scan(self, db: str, fn: Callable[[Txn, bytes, bytes], None]) -> None:
        after: bytes | None = b""
        while after is not None:
            after = self.store._write(partial(_scan_step, db=db, after=after, fn=fn))

    @staticmethod
    def _mark_inode(txn: Txn, k: bytes, v: bytes) -> None:
        node = Inode.unpack(U64.unpack(k)[0], v)
        if node.is_reg or (node.is_dir and not node.stored):
            mark(txn, node.ino)

    @staticmethod
    def _name_dirent(txn: Txn, k: bytes, v: bytes) -> None:
        named(txn, U64.unpack(v)[0], U64.unpack_from(k, 0)[0], k[16:])

    # -- catching up ------------------------------------------------------------------------

    def step(self, stop: Callable[[], bool] | None = None) -> bool:
        """Index one batch of marked inodes. True if there may be more."""
        batch = self.prepare(stop)
        if batch is None:
            return False
        self.commit(batch)
        return True

    def prepare(self, stop: Callable[[], bool] | None = None) -> Batch | None:
        """Read and cut into words a batch of marked files (no lock held; `stop`
        is polled between files). None if nothing is marked."""
        todo: list[int] = []
        with self.store.backend.read() as txn:
            for ino in dirty(txn):
                todo.append(ino)
                if len(todo) >= BATCH_FILES:
                    break
        if not todo:
            return None
        batch = Batch()
        nbytes = 0
        for ino in todo:
            if stop is not None and stop():
                break
            with self.store.backend.read() as txn:
                v = txn.get("inodes", ino_key(ino))
                node = None if v is None else Inode.unpack(ino, v)
                ns = names(txn, ino) if node is not None else []
                have = indexed(txn, ino)
            if node is None:
                batch.gone.append(ino)
            elif not node.is_reg:
                # A directory: its mark goes once it is listed (the sweep lists).
                batch.docs.append((ino, -1, 0, None))
            else:
                kind = text.kind(ns[0][1]) if ns else text.PLAIN
                if have == (node.version, kind):
                    batch.docs.append((ino, node.version, kind, None))  # only the mark to drop
                    continue
                data = self._content(node)
                ps = None if data is None else text.pieces(data, kind)
                batch.docs.append(
                    (ino, node.version, kind, "" if ps is None else text.index_text(ps))
                )
                nbytes += node.size
                if nbytes >= BATCH_BYTES:
                    break
        return batch

    def _content(self, node: Inode) -> bytes | None:
        """A file's bytes, or None if they are not text (a cheap look at the start
        settles most binary files)."""
        try:
            if node.stored:
                head = self.store.read_stored(node.ino, 0, min(node.size, SNIFF))
                if head is None or not _may_be_text(bytes(head), node.size <= SNIFF):
                    return None
                data = self.store.read_stored(node.ino, 0, node.size)
                return None if data is None else bytes(data)
            fd = self.store.open_legacy(node.ino)
            try:
                head = os.pread(fd, SNIFF, 0)
                if not _may_be_text(head, len(head) < SNIFF):
                    return None  # an attachment is not read whole to find that out
                return _read_fd(fd, node.size)
            finally:
                os.close(fd)
        except Exception:
            self.progress.errors += 1
            return None

    def commit(self, batch: Batch) -> None:
        """Commit a prepared batch: tantivy first (durably), then the rows that
        say what it holds, each only if the file did not move on meanwhile."""
        import tantivy

        docs, gone = batch.docs, batch.gone

        w = self.writer
        sch = self.index.schema

        def drop(ino: int) -> None:
            # By query: delete_documents_by_term makes a signed term, which never
            # matches an unsigned field (tantivy 0.27's Python binding).
            w.delete_documents_by_query(tantivy.Query.term_query(sch, "ino", ino))

        changed = False
        for ino in gone:
            drop(ino)
            changed = True
        for ino, ver, kind, ws in docs:
            if ws is None:
                continue
            drop(ino)
            doc = tantivy.Document()
            doc.add_unsigned("ino", ino)
            doc.add_unsigned("ver", ver)
            doc.add_unsigned("kind", kind)
            doc.add_text("text", ws)
            w.add_document(doc)
            changed = True
            self.progress.files += 1
        if changed:
            w.commit()  # durable before any row below says so

        def rows(txn: Txn) -> None:
            for ino in gone:
                if txn.get("inodes", ino_key(ino)) is None:
                    txn.delete(DB, ver_key(ino))
                    txn.delete(DB, dirty_key(ino))
            for ino, ver, kind, ws in docs:
                v = txn.get("inodes", ino_key(ino))
                if v is None:
                    continue  # purged meanwhile: its purge marked it again
                node = Inode.unpack(ino, v)
                if ver < 0:  # a directory or special file
                    if not (node.is_dir and not node.stored) and not node.is_reg:
                        txn.delete(DB, dirty_key(ino))
                    continue
                if node.version != ver:
                    continue
                if ws is not None:
                    txn.put(DB, ver_key(ino), _VER.pack(ver, kind))
                elif indexed(txn, ino) != (ver, kind):
                    continue
                if all(text.kind(n) == kind for _, n in names(txn, ino)):
                    txn.delete(DB, dirty_key(ino))
                    if ws is None:
                        self.progress.cleared += 1

        self.store._write(rows)

    def catch_up(self, stop: Callable[[], bool] | None = None) -> Progress:
        """Index until nothing is marked (or `stop` says so)."""
        while self.step(stop):
            if stop is not None and stop():
                break
        return self.progress

    def pending(self) -> int:
        with self.store.backend.read() as txn:
            return sum(1 for _ in dirty(txn))


def _drop_rows(txn: Txn, prefix: bytes) -> int:
    stop = bytes([prefix[0] + 1])
    keys = [k for k, _ in _take(txn.range(DB, prefix, stop), 4096)]
    for k in keys:
        txn.delete(DB, k)
    return len(keys)


def _scan_step(
    txn: Txn, db: str, after: bytes, fn: Callable[[Txn, bytes, bytes], None]
) -> bytes | None:
    """`fn` on up to 4096 items of `db` past `after`; the last key done, or None at the end."""
    last = None
    for k, v in [(k, bytes(v)) for k, v in _take(txn.range(db, after), 4097)]:
        if k == after:
            continue
        fn(txn, k, v)
        last = k
    return last


def _take(it: Iterator[tuple[bytes, Any]], n: int) -> list[tuple[bytes, Any]]:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out


def _may_be_text(head: bytes, whole: bool) -> bool:
    if b"\0" in head:
        return False
    if whole:
        return True
    import codecs

    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _read_fd(fd: int, size: int) -> bytes:
    """The whole file from offset 0 (it may have grown or shrunk since `size`)."""
    parts = []
    got = 0
    while True:
        b = os.pread(fd, max(1 << 20, size - got), got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def build(store: Store, stop: Callable[[], bool] | None = None) -> Progress:
    """Open (or start) a store's index and bring it up to date: for migrate and fsck."""
    ix = Indexer(store)
    ix.open()
    try:
        return ix.catch_up(stop)
    finally:
        ix.close()


def rebuild(store: Store) -> Progress:
    """Start the index over and build it whole (fsck --repair)."""
    store._write(lambda txn: txn.delete(DB, IDENT))
    return build(store)


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

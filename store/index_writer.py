"""Bringing the search index up to date: reading the marked files, cutting them
into words (text.py), committing their documents to tantivy and then the rows
(index.py) that say what tantivy holds.

One writer at a time: the store's (the daemon's IndexTask, or migrate and fsck
offline), which holds the store's lock and tantivy's writer lock on
`STORE/index/`. Offline, text may be cut into words by worker processes
(`Indexer.open`'s `workers`), which see only bytes and return words. Tantivy
commits durably before any row says so, so a crash leaves the rows behind the
index, never ahead of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any

from . import index, text
from .errors import SourceError
from .index import DB, IDENT, NAME, VER, dirty, disk_ident, ident, index_dir, indexed, names
from .kv import Txn, delete_first
from .phase3 import Phase3File
from .records import U64, Inode, ino_key
from .store import Store
from .storedir import fsync_dir

log = logging.getLogger("ferryfs.index")

# A batch of the indexer: one tantivy commit and one store transaction.
BATCH_FILES = 512
BATCH_BYTES = 32 << 20
# Offline (`catch_up`), batches are grouped into one tantivy commit of up to
# this many files or bytes: each commit closes a segment, and merging the
# small segments of 512-file commits in the background doubled tantivy's CPU
# time (measured on 24,000 small files).
GROUP_FILES = 8192
GROUP_BYTES = 256 << 20
WRITER_HEAP = 48 << 20
SNIFF = 8192
# Files per task of the worker processes (Indexer.open's `workers`).
CUT_CHUNK = 32


@dataclass
class Batch:
    # (ino, version or -1 for a non-file, kind, text.index_text or None: "only the mark")
    docs: list[tuple[int, int, int, str | None]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)  # purged inodes
    last: int = 0  # the last marked inode looked at
    bytes: int = 0  # of the files read


# Seconds before a parked file (see Indexer.parked) is tried again though it did
# not change: a read that failed for want of file descriptors or memory, or an
# I/O error that went away, gets another chance in a long-lived daemon.
RETRY_PARKED = 60.0


@dataclass
class Progress:
    files: int = 0
    bytes: int = 0
    cleared: int = 0  # marks dropped with no re-indexing (the document still matched)
    errors: int = 0  # reads that failed (each leaves its file marked: read at query time)
    parked: int = 0  # files left marked for now (see Indexer.parked)


class Unreadable(Exception):
    """The indexer could not read a file's bytes (EMFILE, EIO, a chunk failing its
    hash, a Phase 3 copy that changed): its text is unknown, not empty."""


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
        # Inodes left marked on purpose, with the (version, ctime, flags) they were
        # left at and when: a file whose bytes could not be read (its text is
        # unknown, so every query reads it), a file whose names call for two kinds
        # of text (a hard link `a.json` beside `a.txt`: one document cannot be
        # both, so the other name is read at query time), an UNLISTED directory.
        # Skipped until the inode changes (its ctime moves with any write, rename
        # or link; its flags when it is migrated or listed) or RETRY_PARKED has
        # passed, so that `catch_up` ends. In memory only: the next process tries
        # them again.
        self.parked: dict[int, tuple[tuple[int, int, int], float]] = {}
        self.pool: Executor | None = None
        # Read migrated files unchanged since Phase 3 from there (see _content):
        # for `migrate`, whose files are all such. Elsewhere the store's copy is
        # read, so that the index sees what a reader of the mount would.
        self.phase3_first = False
        # Bytes of files a batch reads (and holds, with their words, until they
        # are handed to tantivy): `migrate` takes less, beside its own memory.
        self.batch_bytes = BATCH_BYTES

    def open(self, workers: int = 0) -> None:
        """Open the tantivy index, or start a new one (marking every file) if the
        store has none or its rows describe another. `workers`: processes that
        cut text into words (0: this thread does), for offline use: they
        take that work off this process's interpreter lock, and onto another
        CPU."""
        with self.store.backend.read() as txn:
            want = ident(txn)
        have = disk_ident(self.path)
        idx = index.open_index(self.path) if want is not None and want == have else None
        if idx is None:
            self._start_over()
            idx = index.open_index(self.path)
        self.index = idx
        self.writer = idx.writer(heap_size=WRITER_HEAP, num_threads=1)
        if workers > 0 and self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: this process has threads and LMDB maps open.
            ctx = multiprocessing.get_context("spawn")
            try:
                self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_start)
            except OSError as e:  # no POSIX semaphores (/dev/shm not writable): cut here
                log.info("indexing without a worker process: %s", e)
        # A writer killed mid-batch leaves files no commit names (a segment's
        # `.del` at the next opstamp): the next writer would try to create the same
        # name and fail its batch (FileAlreadyExists). tantivy lists every file it
        # makes before making it, so its collector finds them all.
        self.writer.garbage_collect_files()
        private(index_dir(self.path))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.wait_merging_threads()
            private(index_dir(self.path))
        self.writer = None
        self.index = None

    def _start_over(self) -> None:
        import secrets
        import shutil

        import tantivy

        # Forget the old identity first: a crash below leaves a store whose
        # index nothing trusts, never rows that describe a half-made index.
        self.store.transact(lambda txn: txn.delete(DB, IDENT))
        d = index_dir(self.path)
        if os.path.lexists(d):
            if os.path.isdir(d) and not os.path.islink(d):
                shutil.rmtree(d)
            else:
                os.unlink(d)
        os.mkdir(d, 0o700)
        tantivy.Index(index.schema(), path=d, reuse=False)
        new = secrets.token_hex(16)
        tmp = os.path.join(d, "ident.tmp")
        with open(tmp, "w") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(d, "ident"))
        fsync_dir(d)
        self._mark_everything()
        self.store.transact(lambda txn: txn.put(DB, IDENT, new.encode()))

    def _mark_everything(self) -> None:
        """Drop every `V` row, mark every file and UNLISTED directory, and record
        every name, a few thousand rows per transaction (new writes meanwhile
        mark and name themselves)."""
        for prefix in (VER, NAME):
            while self.store.transact(partial(_drop_rows, prefix=prefix)):
                pass
        self._scan("inodes", self._mark_inode)
        self._scan("dirents", self._name_dirent)

    def _scan(self, db: str, fn: Callable[[Txn, bytes, bytes], None]) -> None:
        after: bytes | None = b""
        while after is not None:
            after = self.store.transact(partial(_scan_step, db=db, after=after, fn=fn))

    @staticmethod
    def _mark_inode(txn: Txn, k: bytes, v: bytes) -> None:
        node = Inode.unpack(U64.unpack(k)[0], v)
        if node.is_reg or (node.is_dir and not node.stored):
            index.mark(txn, node.ino)

    @staticmethod
    def _name_dirent(txn: Txn, k: bytes, v: bytes) -> None:
        index.named(txn, U64.unpack(v)[0], U64.unpack_from(k, 0)[0], k[16:])

    # -- catching up ------------------------------------------------------------------------

    def step(self, stop: Callable[[], bool] | None = None) -> bool:
        """Index one batch of marked inodes. True if there may be more."""
        batch = self.prepare(stop)
        if batch is None:
            return False
        self.commit(batch)
        return True

    def prepare(self, stop: Callable[[], bool] | None = None, after: int = 0) -> Batch | None:
        """Read and cut into words a batch of marked files from inode `after` on
        (no lock held; `stop` is polled between files). None if nothing is
        marked there but parked files."""
        todo: list[int] = []
        now = time.monotonic()
        with self.store.backend.read() as txn:
            for ino in dirty(txn, after):
                if ino in self.parked and self._still_parked(txn, ino, now):
                    continue
                todo.append(ino)
                if len(todo) >= BATCH_FILES:
                    break
        if not todo:
            return None
        batch = Batch()
        nbytes = 0
        cut = _Cutter(self.pool)
        for ino in todo:
            if stop is not None and stop():
                break
            batch.last = ino
            with self.store.backend.read() as txn:
                v = txn.get("inodes", ino_key(ino))
                node = None if v is None else Inode.unpack(ino, v)
                ns = names(txn, ino) if node is not None else []
                have = indexed(txn, ino)
            self.parked.pop(ino, None)
            if node is None:
                batch.gone.append(ino)
            elif node.is_unlisted:
                # Its mark goes once it is listed (the sweep lists), which writes
                # its record: parked until then, so that it neither holds up the
                # files marked after it nor keeps `catch_up` going.
                self._park(node)
            elif not node.is_reg:
                batch.docs.append((ino, -1, 0, None))
            else:
                kind = text.kind(ns[0][1]) if ns else text.PLAIN
                if have == (node.version, kind):
                    if any(text.kind(n) != kind for _, n in ns):
                        self._park(node)  # the document serves one kind of name only
                    else:
                        batch.docs.append((ino, node.version, kind, None))  # drop the mark
                    continue
                try:
                    data = self._content(node)
                except Unreadable as e:
                    # Its text is unknown: no document, no `V` row, the mark stays,
                    # and every query reads the file until it is indexed.
                    self.progress.errors += 1
                    log.info("search index: cannot read inode %d now: %s", ino, e)
                    self._park(node)
                    continue
                cut.add(len(batch.docs), data, kind)
                batch.docs.append((ino, node.version, kind, ""))
                nbytes += node.size
                if nbytes >= self.batch_bytes:
                    break
        cut.finish(batch.docs)
        self.progress.parked = len(self.parked)
        batch.bytes = nbytes
        return batch

    def _park(self, node: Inode) -> None:
        self.parked[node.ino] = (_stamp(node), time.monotonic())
        self.progress.parked = len(self.parked)

    def _still_parked(self, txn: Txn, ino: int, now: float) -> bool:
        """Whether a parked inode stays parked: unchanged, and parked recently."""
        stamp, when = self.parked[ino]
        v = txn.get("inodes", ino_key(ino))
        if v is None or now - when >= RETRY_PARKED:
            return False
        return _stamp(Inode.unpack(ino, v)) == stamp

    def _content(self, node: Inode) -> bytes | None:
        """A file's bytes, or None if they are not text (a cheap look at the start
        settles most binary files). Unreadable if they cannot be read."""
        try:
            if node.stored and not node.changed and self.phase3_first:
                # Unchanged since Phase 3: its Phase 3 copy holds the same bytes
                # (open_legacy checks its stat against the record), read with
                # no decompression, no hashing and no pages of the store's map
                # in this process's memory (which, for every file, doubled
                # `migrate`'s peak RSS). The store's copy if that fails.
                with contextlib.suppress(SourceError, OSError):
                    return self._phase3_content(node)
            if node.stored:
                head = self.store.read_stored(node.ino, 0, min(node.size, SNIFF))
                if head is None:
                    raise Unreadable("the file is not in the store any more")
                if not _may_be_text(bytes(head), node.size <= SNIFF):
                    return None
                data = self.store.read_stored(node.ino, 0, node.size)
                if data is None:
                    raise Unreadable("the file is not in the store any more")
                return bytes(data)
            return self._phase3_content(node)
        except Unreadable:
            raise
        except Exception as e:  # whatever it was, the text is unknown, never empty
            raise Unreadable(str(e) or type(e).__name__) from e

    def _phase3_content(self, node: Inode) -> bytes | None:
        """`_content` from the file's Phase 3 copy."""
        f = self.store.open_legacy(node.ino, record=False)  # a reader: writes nothing
        try:
            head = f.pread(SNIFF, 0)
            if not _may_be_text(head, len(head) < SNIFF):
                return None  # an attachment is not read whole to find that out
            return _read_whole(f, node.size)
        finally:
            f.close()

    def commit(self, batch: Batch) -> None:
        """Commit a prepared batch: tantivy first (durably), then the rows that
        say what it holds, each only if the file did not move on meanwhile."""
        self.commit_index(batch)
        self.commit_rows(batch)

    def commit_index(self, batch: Batch) -> None:
        """The tantivy half of `commit`: no store transaction (a mount runs it on a
        worker thread, and `commit_rows` on its writer)."""
        if self.add(batch):
            self.writer.commit()  # durable before any row says so
            private(index_dir(self.path))

    def add(self, batch: Batch) -> bool:
        """Hand a batch's documents to tantivy's writer, uncommitted (tantivy
        cuts and writes them on its own threads). Whether anything changed."""
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
        return changed

    def commit_rows(self, batch: Batch) -> None:
        """The store half of `commit`, after `commit_index`: one transaction."""
        docs, gone = batch.docs, batch.gone
        if not docs and not gone:
            return  # every file of the batch was parked

        def rows(txn: Txn) -> None:
            for ino in gone:
                if txn.get("inodes", ino_key(ino)) is None:
                    txn.delete(DB, index.ver_key(ino))
                    txn.delete(DB, index.dirty_key(ino))
            for ino, ver, kind, ws in docs:
                v = txn.get("inodes", ino_key(ino))
                if v is None:
                    continue  # purged meanwhile: its purge marked it again
                node = Inode.unpack(ino, v)
                if ver < 0:  # a directory or special file
                    if not (node.is_dir and not node.stored) and not node.is_reg:
                        txn.delete(DB, index.dirty_key(ino))
                    continue
                if node.version != ver:
                    continue
                if ws is not None:
                    index.set_indexed(txn, ino, ver, kind)
                elif indexed(txn, ino) != (ver, kind):
                    continue
                if all(text.kind(n) == kind for _, n in names(txn, ino)):
                    txn.delete(DB, index.dirty_key(ino))
                    if ws is None:
                        self.progress.cleared += 1

        self.store.transact(rows)

    def catch_up(self, stop: Callable[[], bool] | None = None) -> Progress:
        """Index until nothing is marked (or `stop` says so), offline: batches
        in groups of one tantivy commit (GROUP_FILES), each group's rows one
        transaction after it. A pass goes once over the marked inodes in
        order; the next pass takes what was marked again meanwhile."""
        while True:
            group = Batch()
            after = files = nbytes = 0
            changed = False
            while files < GROUP_FILES and nbytes < GROUP_BYTES:
                batch = self.prepare(stop, after)
                if batch is None:
                    break
                changed |= self.add(batch)
                # The texts are tantivy's now: the rows need only whether there was one.
                group.docs.extend((i, v, k, None if t is None else "") for i, v, k, t in batch.docs)
                group.gone.extend(batch.gone)
                files += len(batch.docs) + len(batch.gone)
                nbytes += batch.bytes
                after = batch.last + 1
                if stop is not None and stop():
                    break
            if after == 0:
                return self.progress  # nothing marked but parked files
            if changed:
                self.writer.commit()  # durable before any row says so
                private(index_dir(self.path))
            self.commit_rows(group)
            if stop is not None and stop():
                return self.progress

    def pending(self) -> int:
        with self.store.backend.read() as txn:
            return sum(1 for _ in dirty(txn))


def private(d: str) -> None:
    """Make the index's files 0600 (and its directory 0700), as everything else in
    the store (storedir.py): tantivy creates them by the umask, 0644 or even 0666.
    Run after each commit and at close; a file a background merge makes meanwhile
    is still inside the 0700 directory, which lets nobody else in."""
    with contextlib.suppress(OSError):
        st = os.lstat(d)
        if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(d, 0o700)
    with contextlib.suppress(OSError), os.scandir(d) as it:
        for e in it:
            with contextlib.suppress(OSError):
                st = e.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                    os.chmod(e.path, stat.S_IMODE(st.st_mode) & 0o600)


def _drop_rows(txn: Txn, prefix: bytes) -> int:
    return delete_first(txn, DB, prefix, bytes([prefix[0] + 1]), 4096)


def _scan_step(
    txn: Txn, db: str, after: bytes, fn: Callable[[Txn, bytes, bytes], None]
) -> bytes | None:
    """`fn` on up to 4096 items of `db` past `after`; the last key done, or None at the end."""
    last = None
    for k, v in [(k, bytes(v)) for k, v in islice(txn.range(db, after), 4097)]:
        if k == after:
            continue
        fn(txn, k, v)
        last = k
    return last


Job = tuple[bytes | None, int]  # a file's bytes (None: no text) and kind


class _Cutter:
    """Cuts the text of a batch's files into words (text.index_text), on the
    worker processes in chunks as the files are read, or here without them."""

    def __init__(self, pool: Executor | None) -> None:
        self.pool = pool
        self.jobs: list[tuple[int, bytes | None, int]] = []
        # (places in the batch, the work, its words or their future)
        self.done: list[tuple[list[int], list[Job], Future[list[str]] | list[str]]] = []

    def add(self, at: int, data: bytes | None, kind: int) -> None:
        if self.pool is None:
            self.done.append(([at], [], [cut_words(data, kind)]))
            return
        self.jobs.append((at, data, kind))
        if len(self.jobs) >= CUT_CHUNK:
            self._send()

    def _send(self) -> None:
        assert self.pool is not None
        where = [at for at, _, _ in self.jobs]
        work = [(data, kind) for _, data, kind in self.jobs]
        try:
            self.done.append((where, work, self.pool.submit(cut_many, work)))
        except RuntimeError:  # the pool is broken or shut down: cut them here
            self.done.append((where, work, cut_many(work)))
        self.jobs = []

    def finish(self, docs: list[tuple[int, int, int, str | None]]) -> None:
        """Put each file's words in its place in `docs`."""
        if self.jobs:
            self._send()
        for where, work, got in self.done:
            if isinstance(got, Future):
                try:
                    texts = got.result()
                except BrokenExecutor:  # a worker died (killed, out of memory)
                    texts = cut_many(work)
            else:
                texts = got
            for at, words in zip(where, texts, strict=True):
                ino, ver, kind, _ = docs[at]
                docs[at] = (ino, ver, kind, words)


def _worker_start() -> None:
    # ^C reaches the whole process group: the parent stops the workers itself,
    # and a worker's own KeyboardInterrupt would print a traceback.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def cut_words(data: bytes | None, kind: int) -> str:
    """What the index holds of a file's bytes: text.index_text of its pieces."""
    ps = None if data is None else text.pieces(data, kind)
    return "" if ps is None else text.index_text(ps)


def cut_many(work: list[Job]) -> list[str]:
    return [cut_words(data, kind) for data, kind in work]


def _stamp(node: Inode) -> tuple[int, int, int]:
    return node.version, node.ctime_ns, node.flags


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


def _read_whole(f: Phase3File, size: int) -> bytes:
    """The whole file from offset 0 (it may have grown or shrunk since `size`; a
    change since its entry was imported is a SourceError, as for any read)."""
    parts = []
    got = 0
    while True:
        b = f.pread(max(1 << 20, size - got), got)
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
    store.transact(lambda txn: txn.delete(DB, IDENT))
    return build(store)

"""Checking a store against DESIGN's invariants, and repairing what can be.

`Checker.run()` reads ONE consistent snapshot: every check runs inside a single
read transaction, so it works beside a live mount, like a scrub, and changes
nothing. The worker threads of `--deep` never touch that transaction: the main
thread looks the records up and hands the workers views of them (LMDB keeps a
read snapshot's pages in place until it ends), so zstd and blake3 run in
parallel with the GIL released.

Each invariant is a few small `check_*` methods that add `Problem`s:

1. dirents name existing inodes (in directories), every inode is reachable from
   the root or recorded as an orphan (`meta orphan:<ino>`), link counts and
   directories' parent pointers are right;
2. a MIGRATED file's extents tile [0, size); nothing else has extents;
3. refs[d] equals the extents naming d; no orphan chunk, no dangling ref;
4. (--deep) every chunk decodes to bytes that hash to its key;
5. (--deep) an unmodified MIGRATED file hashes to its Phase 3 hash;
6. the Phase 3 tree still matches the rollback point: every manifest row by
   lstat, and (--deep) every file whose hash is known by content (points.py);
7. the search index: every document the index rows vouch for matches a live
   file's current version, and every file the index does not hold is marked
   (index.check); `--repair` builds the index again.

Paths come from a map ino -> (parent, name) built once per run. It and the
other per-run maps (inodes, link counts, reference counts, the chunk key set)
are memory in proportion to the store: about 1 KB per inode and 150 bytes per
chunk, so some 1 GB for a store of a million files. Fine for the stores we
test and the bench tree; a bigger store would want these checks done in key
order against sorted runs on disk.

The deep phases and the manifest check are resumable: `--max-duration` stops
between items (a file, a chunk, a manifest row), waits for the work in flight,
and writes `fsck.cursor` in the store directory: the phase, the next item, and
the items that had problems, which the next run checks again first so nothing
found is forgotten. The structure checks always run whole (they need the whole
snapshot and take a second per few hundred thousand inodes).

`repair()` needs the store open for writing (not mounted). See its docstring.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import blake3

from . import codec, content, index, points
from . import namespace as ns
from .errors import CorruptChunk, NotFound, OpError, SourceError, StoreLocked
from .kv import Buf, LmdbBackend, Txn
from .phase3 import Phase3Tree
from .records import (
    CHANGED,
    HOLE,
    ROOT_INO,
    SCHEMA_VERSION,
    STORED,
    U64,
    Inode,
    dirent_key,
    extent_key,
    name_cookie,
    unpack_extent,
)
from .store import Store

CURSOR = "fsck.cursor"
PHASES = ("points", "files", "chunks")
# Kinds a re-import from Phase 3 fixes (for an unmodified file).
REIMPORT = ("extent-gap", "extent-overlap", "extents-past-end", "content-differs")
STRAY_EXTENTS = ("extents-of-missing-inode", "extents-of-non-file", "extents-of-legacy-file")
REFS = ("bad-refcount", "dangling-ref", "orphan-chunk")


@dataclass
class Problem:
    kind: str
    path: str  # "/a/b" of the file or directory it affects; "" for a chunk no file names
    detail: str
    repairable: bool
    ino: int | None = None
    digest: bytes | None = None
    key: bytes | None = field(default=None, repr=False)  # what a repair acts on
    origin: tuple[str, bytes] | None = field(default=None, repr=False)  # resumable item

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "kind": self.kind,
            "path": self.path,
            "detail": self.detail,
            "repairable": self.repairable,
        }
        if self.ino is not None:
            d["ino"] = self.ino
        if self.digest is not None:
            d["chunk"] = self.digest.hex()
        return d

    def ident(self) -> tuple[str, int | None, bytes | None, str]:
        return self.kind, self.ino, self.digest, self.path


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    partial: bool = False
    point: int | None = None
    chunks_checked: int = 0
    files_checked: int = 0
    rows_checked: int = 0
    file_bytes: int = 0  # logical bytes of files whose stored content was verified
    store_bytes: int = 0  # plain bytes decoded from the store and hashed
    phase3_bytes: int = 0  # bytes read from Phase 3 and hashed
    seconds: float = 0.0


_Result = Any
_Handler = Callable[[_Result], None]


class Checker:
    """One check of one store snapshot. `run()` once per instance."""

    def __init__(
        self,
        store: Store,
        deep: bool = False,
        max_seconds: float | None = None,
        progress: Callable[[int], None] | None = None,
        jobs: int | None = None,
        resume: bool = True,
    ) -> None:
        self.store = store
        self.tree: Phase3Tree | None = store.tree
        self.deep = deep
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self.progress = progress or (lambda n: None)
        self.jobs = jobs or os.cpu_count() or 2
        self.resume = resume
        self.report = Report()
        self.inodes: dict[int, Inode] = {}
        self.names: dict[int, tuple[int, bytes]] = {}  # ino -> one (parent, name)
        self.links: Counter[int] = Counter()
        self.subdirs: Counter[int] = Counter()
        self.orphans: set[int] = set()
        self.refs_counted: Counter[bytes] = Counter()
        self.damaged: set[int] = set()  # files with structural extent problems
        self.missing: set[bytes] = set()  # chunks extents name that are not stored
        self.bad: dict[bytes, tuple[str, bytes]] = {}  # chunk failing its hash -> origin
        self.verified: set[bytes] = set()  # chunks decoded and hashed right this run
        self.point: points.Point | None = None
        self.released = False
        self.progressed = False
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: deque[tuple[Future[_Result], _Handler]] = deque()
        self._fds: points.DirFds | None = None

    # -- helpers --------------------------------------------------------------------------

    def add(
        self,
        kind: str,
        detail: str,
        ino: int | None = None,
        repairable: bool = False,
        digest: bytes | None = None,
        key: bytes | None = None,
        origin: tuple[str, bytes] | None = None,
        path: str | None = None,
    ) -> None:
        shown = path if path is not None else self.path(ino)
        self.report.problems.append(
            Problem(kind, shown, detail, repairable, ino, digest, key, origin)
        )

    def path(self, ino: int | None) -> str:
        if ino is None:
            return ""
        parts: list[bytes] = []
        seen = set()
        at = ino
        while at != ROOT_INO and at in self.names and at not in seen:
            seen.add(at)
            parent, name = self.names[at]
            parts.append(name)
            at = parent
        tail = os.fsdecode(b"/".join(reversed(parts)))
        if at != ROOT_INO:
            return f"<inode {at}>" + ("/" + tail if parts else "")
        return "/" + tail

    def healable(self, node: Inode | None) -> bool:
        """Whether Phase 3 can give this file's bytes back (unmodified, migrated)."""
        return (
            node is not None
            and node.is_reg
            and node.stored
            and not node.changed
            and self.tree is not None
            and not self.released
        )

    def _late(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    # -- the run --------------------------------------------------------------------------

    def run(self, structure_only: bool = False) -> Report:
        t0 = time.monotonic()
        cursor = self._load_cursor() if self.resume and not structure_only else None
        with self.store.backend.read() as txn, ThreadPoolExecutor(self.jobs) as pool:
            self._pool = pool
            self.check_inodes(txn)
            self.check_dirents(txn)
            self.check_reachable(txn)
            self.check_nlink()
            self.check_orphan_marks(txn)
            self.check_extents(txn)
            self.check_refs_and_chunks(txn)
            self.check_index(txn)
            if not structure_only:
                self.check_point(txn)
                self._resumable(txn, cursor)
            self._drain()
            self.name_damaged_chunks(txn)
        if self._fds is not None:
            self._fds.close()
        self.report.seconds = time.monotonic() - t0
        return self.report

    def _resumable(self, txn: Txn, cursor: dict[str, Any] | None) -> None:
        """Invariants 4-6, item by item, stopping at the deadline with a cursor."""
        first, start = PHASES[0], None
        if cursor is not None and cursor.get("point") != self.report.point:
            cursor = None  # made against another rollback point: start over
        if cursor is not None:
            first, start = cursor["phase"], bytes.fromhex(cursor["next"])
            for phase, key in cursor["carried"]:  # found before: still there?
                self._item(txn, phase, bytes.fromhex(key), carried=True)
            self.report.notes.append(f"carried on from an earlier run's {first} phase")
        for phase in PHASES[PHASES.index(first) :]:
            stop = self._phase(txn, phase, start if phase == first else None)
            if stop is not None:
                self.report.partial = True
                self._drain()
                self._save_cursor(phase, stop)
                return
        self._clear_cursor()

    def _phase(self, txn: Txn, phase: str, start: bytes | None) -> bytes | None:
        """Run one phase from `start`; the key it stopped at, or None when done."""
        for key in self._keys(txn, phase, start):
            if self.progressed and self._late():
                return key
            self._item(txn, phase, key)
            self.progressed = True
        self._drain()
        return None

    def _keys(self, txn: Txn, phase: str, start: bytes | None) -> Iterator[bytes]:
        if phase == "points":
            if self.point is not None and self.tree is not None:
                for k, _path, _row in points.rows(txn, self.point.id, start):
                    yield k
        elif phase == "files" and self.deep:
            lo = U64.unpack(start)[0] if start else 0
            for ino in sorted(i for i, n in self.inodes.items() if n.is_reg and i >= lo):
                yield U64.pack(ino)
        elif phase == "chunks" and self.deep:
            for k, _ in txn.range("chunks", start or b""):
                yield k

    def _item(self, txn: Txn, phase: str, key: bytes, carried: bool = False) -> None:
        if phase == "points":
            self.check_manifest_row(txn, key)
        elif phase == "files":
            self.check_file_content(txn, U64.unpack(key)[0])
        elif phase == "chunks" and (carried or key not in self.verified):
            self.check_chunk(txn, key)

    # -- the thread pool ------------------------------------------------------------------

    def _submit(self, handler: _Handler, fn: Callable[..., _Result], *args: Any) -> None:
        assert self._pool is not None
        self._inflight.append((self._pool.submit(fn, *args), handler))
        while len(self._inflight) > 4 * self.jobs:
            self._settle()

    def _settle(self) -> None:
        fut, handler = self._inflight.popleft()
        handler(fut.result())

    def _drain(self) -> None:
        while self._inflight:
            self._settle()

    # -- invariant 1: namespace -------------------------------------------------------------

    def check_inodes(self, txn: Txn) -> None:
        for k, v in txn.range("inodes", b""):
            ino = U64.unpack(k)[0]
            self.inodes[ino] = Inode.unpack(ino, v)
        if ROOT_INO not in self.inodes:
            self.add("missing-root", "the root directory's inode is missing", path="/")

    def check_dirents(self, txn: Txn) -> None:
        """Every dirent is in a directory and names an existing inode, under its key."""
        for k, v in txn.range("dirents", b""):
            parent, cookie = U64.unpack_from(k, 0)[0], U64.unpack_from(k, 8)[0]
            name, child = bytes(k[16:]), U64.unpack(v)[0]
            self.names.setdefault(child, (parent, name))
            where = self.inodes.get(parent)
            if child not in self.inodes:
                self.add(
                    "dangling-dirent",
                    f"entry {name!r} names inode {child}, which does not exist",
                    child,
                    repairable=True,
                    key=k,
                )
                continue
            if where is None or not where.is_dir:
                self.add(
                    "dirent-in-non-directory",
                    f"entry {name!r} is under inode {parent}, not a directory",
                    child,
                    repairable=True,
                    key=k,
                )
                continue
            if cookie != name_cookie(name):
                self.add(
                    "bad-dirent-key",
                    f"entry {name!r} is stored under the wrong key",
                    child,
                    repairable=True,
                    key=k,
                )
            self.links[child] += 1
            node = self.inodes[child]
            if node.is_dir:
                self.subdirs[parent] += 1
                if node.parent != parent:
                    self.add(
                        "bad-parent",
                        f"its parent pointer is inode {node.parent}; its entry is in {parent}",
                        child,
                        repairable=self.links[child] == 1,
                        key=U64.pack(parent),
                    )
                if self.links[child] > 1:
                    self.add("directory-linked-twice", f"a second entry in {parent}", child)

    def check_reachable(self, txn: Txn) -> None:
        """Every inode is reachable from the root by entries, or a recorded orphan (an
        UNLISTED directory has no entries yet: nothing under it exists to be missed)."""
        self.orphans = {
            U64.unpack_from(k, 7)[0] for k, _ in txn.range("meta", b"orphan:", b"orphan;")
        }
        seen = {ROOT_INO}
        todo = [ROOT_INO] if ROOT_INO in self.inodes else []
        while todo:
            for _cookie, _name, child in ns.entries(txn, todo.pop()):
                node = self.inodes.get(child)
                if node is not None and child not in seen:
                    seen.add(child)
                    if node.is_dir:
                        todo.append(child)
        for ino in self.inodes:
            if ino not in seen and ino not in self.orphans:
                self.add("unreachable-inode", "no path from the root leads to it", ino)

    def check_nlink(self) -> None:
        """Files: one link per entry. LISTED directories: 2 + their subdirectories."""
        for ino, node in self.inodes.items():
            if node.is_dir:
                if not node.stored:
                    continue
                want = 2 + self.subdirs[ino]
            else:
                want = self.links[ino]
            if ino in self.orphans and node.nlink == 0:
                continue  # unlinked, kept while open: purged on the next writer's open
            if node.nlink != want:
                self.add(
                    "bad-nlink",
                    f"nlink is {node.nlink}, should be {want}",
                    ino,
                    repairable=True,
                    key=U64.pack(want),
                )

    def check_orphan_marks(self, txn: Txn) -> None:
        """An orphan mark is purged with its inode when the store is next opened for
        writing: a mark on a named inode would delete a live file."""
        for k, _ in txn.range("meta", b"orphan:", b"orphan;"):
            ino = U64.unpack_from(k, 7)[0]
            if ino not in self.inodes:
                self.add(
                    "stale-orphan-mark",
                    "marks an inode that does not exist",
                    ino,
                    repairable=True,
                    key=k,
                )
            elif self.links[ino]:
                self.add(
                    "stale-orphan-mark",
                    "marks as unlinked an inode that has entries",
                    ino,
                    repairable=True,
                    key=k,
                )

    # -- invariant 2: extents ---------------------------------------------------------------

    def check_extents(self, txn: Txn) -> None:
        """A MIGRATED file's extents tile [0, size) with no gap or overlap; nothing else
        has extents. Counts references for invariant 3 on the way."""
        cur, pos, flagged = -1, 0, False

        def close(ino: int) -> None:
            node = self.inodes.get(ino)
            if node is None or not (node.is_reg and node.stored) or flagged:
                return
            if pos < node.size:
                self._tiling(ino, "extent-gap", f"extents end at {pos}, size is {node.size}")
            elif pos > node.size:
                self._tiling(ino, "extents-past-end", f"extents reach {pos}, size is {node.size}")

        for k, v in txn.range("extents", b""):
            ino = U64.unpack_from(k, 0)[0]
            off, d, n = unpack_extent(k, v)
            if ino != cur:
                if cur >= 0:
                    close(cur)
                cur, pos, flagged = ino, 0, False
                node = self.inodes.get(ino)
                if node is None:
                    self.add(
                        "extents-of-missing-inode", "extents of no inode", ino, repairable=True
                    )
                elif not node.is_reg:
                    self.add("extents-of-non-file", "extents of a non-file", ino, repairable=True)
                elif not node.stored:
                    self.add(
                        "extents-of-legacy-file",
                        "a LEGACY file (content in Phase 3) has extents",
                        ino,
                        repairable=not node.changed,
                    )
            if off != pos and not flagged:
                kind = "extent-gap" if off > pos else "extent-overlap"
                self._tiling(ino, kind, f"an extent starts at {off}, the one before ends at {pos}")
                flagged = True
            pos = off + n
            if d != HOLE:
                self.refs_counted[d] += 1
        if cur >= 0:
            close(cur)
        with_extents = {U64.unpack_from(k, 0)[0] for k, _ in _first_of_each_ino(txn)}
        for ino, node in self.inodes.items():
            if node.is_reg and node.stored and node.size > 0 and ino not in with_extents:
                self._tiling(ino, "extent-gap", f"no extents for its {node.size} bytes")

    def _tiling(self, ino: int, kind: str, detail: str) -> None:
        node = self.inodes.get(ino)
        if node is None or not (node.is_reg and node.stored):
            return
        self.damaged.add(ino)
        self.add(kind, detail, ino, repairable=self.healable(node))

    # -- invariant 3: references ----------------------------------------------------------

    def check_refs_and_chunks(self, txn: Txn) -> None:
        """refs[d] equals the extents naming d; no orphan chunk, no dangling ref. A chunk
        staged by a migration in flight (`pending`) may have no reference yet."""
        stored: dict[bytes, int] = {k: U64.unpack(v)[0] for k, v in txn.range("refs", b"")}
        chunks = {k for k, _ in txn.range("chunks", b"")}
        pending = {k for k, _ in txn.range("pending", b"")}
        for d, n in self.refs_counted.items():
            if stored.get(d) != n:
                self.add(
                    "bad-refcount",
                    f"refs {stored.get(d)}, {n} extents name it",
                    repairable=True,
                    digest=d,
                )
            if d not in chunks:
                self.missing.add(d)
        for d in stored.keys() - self.refs_counted.keys():
            self.add(
                "dangling-ref",
                "a reference count for a chunk no extent names",
                repairable=True,
                digest=d,
            )
        for d in chunks - self.refs_counted.keys() - pending:
            self.add("orphan-chunk", "a chunk no extent names", repairable=True, digest=d)

    # -- invariant 4: chunk hashes (--deep) --------------------------------------------------

    def check_chunk(self, txn: Txn, d: bytes) -> None:
        rec = txn.get("chunks", d)
        if rec is None:
            return

        def done(r: tuple[bool, int]) -> None:
            ok, n = r
            self.report.chunks_checked += 1
            self.report.store_bytes += n
            self.progress(n)
            if ok:
                self.verified.add(d)
            else:
                self.bad.setdefault(d, ("chunks", d))

        self._submit(done, _decode_ok, d, rec)

    def name_damaged_chunks(self, txn: Txn) -> None:
        """One problem per file holding a missing or damaged chunk (one scan of the
        extents for all of them); a damaged chunk no file holds is reported alone."""
        wanted = self.missing | self.bad.keys()
        if not wanted:
            return
        holders: dict[bytes, set[int]] = defaultdict(set)
        for k, v in txn.range("extents", b""):
            d = bytes(v[:32])
            if d in wanted:
                holders[d].add(U64.unpack_from(k, 0)[0])
        for d in sorted(wanted):
            kind = "missing-chunk" if d in self.missing else "corrupt-chunk"
            detail = (
                f"chunk {d.hex()} is not stored"
                if d in self.missing
                else f"chunk {d.hex()} does not decode to bytes with its hash"
            )
            origin = self.bad.get(d)
            inos = sorted(holders.get(d, ()))
            # Saved if any unmodified holder's Phase 3 copy can rewrite the chunk.
            fixable = any(self.healable(self.inodes.get(i)) for i in inos)
            for ino in inos:
                self.add(kind, detail, ino, fixable, d, origin=origin)
            if not inos:
                self.add(kind, detail + " (no file holds it)", None, True, d, origin=origin)

    # -- invariant 5 (and 6 by content): files (--deep) ---------------------------------------

    def check_file_content(self, txn: Txn, ino: int) -> None:
        """An unmodified MIGRATED file's stored bytes hash to the blake3 its migration
        read from Phase 3; and that Phase 3 file, if unchanged since the rollback point
        by stat, still hashes to it too."""
        node = self.inodes.get(ino)
        leg = ns.get_legacy(txn, ino)
        if node is None or leg is None or not leg.hashed:
            return
        key = U64.pack(ino)
        if node.is_reg and node.stored and not node.changed and ino not in self.damaged:
            items: list[tuple[bytes, Buf | None, int]] = [
                (d, None if d == HOLE else txn.get("chunks", d), n)
                for _off, d, n in content.all_extents(txn, ino)
            ]

            def stored(r: tuple[str, bytes | None, list[bytes], int]) -> None:
                status, bad, ok, n = r
                self.verified.update(ok)
                self.report.store_bytes += n
                self.progress(n)
                if status == "ok":
                    self.report.files_checked += 1
                    self.report.file_bytes += node.size
                elif status == "differs":
                    self.add(
                        "content-differs",
                        "its stored content does not hash to its Phase 3 hash",
                        ino,
                        repairable=self.healable(node),
                        origin=("files", key),
                    )
                elif status == "damaged" and bad is not None:
                    self.bad.setdefault(bad, ("files", key))

            self._submit(stored, _hash_stored, items, leg.blake3)
        if self.point is None or self.tree is None or self.released:
            return
        row = points.expected_hash(txn, self.point.id, leg)
        if row is None:
            return
        tree = self.tree

        def phase3(r: tuple[str, int]) -> None:
            how, n = r
            self.report.phase3_bytes += n
            self.progress(n)
            if how:
                self.add(
                    "phase3-drift",
                    how,
                    ino,
                    path="/" + os.fsdecode(leg.path),
                    origin=("files", key),
                )

        self._submit(phase3, points.content_drift, tree, leg.path, row, leg.blake3)

    # -- invariant 6: the Phase 3 tree against the rollback point -------------------------------

    def check_point(self, txn: Txn) -> None:
        """Choose the point to compare with, or say why there is none."""
        self.released = points.is_released(txn)
        self.point = points.current(txn)
        self.report.point = self.point.id if self.point else None
        if self.released:
            self.report.notes.append(
                "the Phase 3 data was released by points expire: invariant 6 not checked, "
                "nothing can be healed from Phase 3"
            )
            self.point = None
        elif self.point is None:
            self.report.notes.append("no complete rollback point: invariant 6 not checked")
        elif self.tree is None:
            src = txn.get("meta", b"source")
            where = os.fsdecode(bytes(src)) if src is not None else None
            if where is not None and not os.path.lexists(where):
                self.add(
                    "phase3-missing",
                    f"the Phase 3 tree {where} is gone: rollback is impossible",
                    path="/",
                )
            else:
                self.report.notes.append(
                    "the Phase 3 tree cannot be reached: invariant 6 not checked"
                )

    def check_manifest_row(self, txn: Txn, key: bytes) -> None:
        """One Phase 3 entry by lstat against its row (new entries of a changed
        directory are reported with it)."""
        v = txn.get("points", key)
        if v is None or self.point is None or self.tree is None:
            return
        if self._fds is None:
            self._fds = points.DirFds(self.tree)
        path, row = points._unpack_row(key, v)
        self.report.rows_checked += 1
        for d in points.stat_drift(txn, self.tree, self._fds, self.point.id, path, row):
            self.add("phase3-drift", d.how, path=d.shown, origin=("points", key))

    # -- invariant 7: the index -------------------------------------------------------------------

    def check_index(self, txn: Txn) -> None:
        if self.store.path is None:
            return
        found, notes = index.check(txn, self.store.path)
        self.report.notes.extend(notes)
        for f in found:
            self.add(f.kind, f.detail, ino=f.ino, repairable=True)

    # -- --max-duration ---------------------------------------------------------------------------

    def _cursor_path(self) -> str | None:
        return os.path.join(self.store.path, CURSOR) if self.store.path else None

    def _load_cursor(self) -> dict[str, Any] | None:
        p = self._cursor_path()
        if p is None or not os.path.exists(p):
            return None
        try:
            with open(p, "rb") as f:
                c: dict[str, Any] = json.load(f)
            if c["deep"] != self.deep or c["phase"] not in PHASES:
                return None
            bytes.fromhex(c["next"])
            return c
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: start again from the beginning

    def _save_cursor(self, phase: str, nxt: bytes) -> None:
        p = self._cursor_path()
        if p is None:
            return
        found = {p.origin for p in self.report.problems if p.origin is not None}
        carried = sorted(found | set(self.bad.values()))  # damaged chunks: named later
        doc = {
            "deep": self.deep,
            "point": self.report.point,
            "phase": phase,
            "next": nxt.hex(),
            "carried": [[ph, k.hex()] for ph, k in carried],
            "saved_ns": time.time_ns(),
        }
        try:
            with open(p + ".tmp", "w") as f:
                json.dump(doc, f)
            os.replace(p + ".tmp", p)
        except OSError as e:
            self.report.notes.append(
                f"cannot save where it stopped ({e}): the next run starts over"
            )

    def _clear_cursor(self) -> None:
        p = self._cursor_path()
        if p is not None and self._load_cursor() is not None:
            os.unlink(p)


def _first_of_each_ino(txn: Txn) -> Iterator[tuple[bytes, Buf]]:
    """The first extent of each inode (a seek per inode, not a scan of all extents)."""
    start = b""
    while True:
        item = next(iter(txn.range("extents", start)), None)
        if item is None:
            return
        yield item
        start = U64.pack(U64.unpack_from(item[0], 0)[0] + 1)


# -- worker functions (run on the pool; they touch no transaction) ----------------------------


def _decode_ok(d: bytes, rec: Buf) -> tuple[bool, int]:
    try:
        return True, len(codec.decode(rec, d))
    except CorruptChunk:
        return False, 0


def _hash_stored(
    items: list[tuple[bytes, Buf | None, int]], want: bytes
) -> tuple[str, bytes | None, list[bytes], int]:
    """(status, bad chunk, chunks verified, bytes decoded) of one file's content."""
    h = blake3.blake3()
    ok: list[bytes] = []
    n = 0
    for d, rec, length in items:
        if d == HOLE:
            h.update(bytes(length))
            continue
        if rec is None:
            return "missing", d, ok, n
        try:
            plain = codec.decode(rec, d, length)
        except CorruptChunk:
            return "damaged", d, ok, n
        ok.append(d)
        n += len(plain)
        if len(plain) != length:
            return "differs", None, ok, n
        h.update(plain)
    return ("ok" if h.digest() == want else "differs"), None, ok, n


# -- repair ---------------------------------------------------------------------------------------


def repair(store: Store, report: Report) -> list[str]:
    """Fix what `report` found; return the paths of the files it could not save.

    The store must be open for writing (so not mounted), `store.tree` its Phase 3
    tree. In order, each step its own short transactions:
    1. entries and marks: drop dirents naming missing inodes or under non-directories,
       rewrite misplaced dirent keys, drop stale orphan marks, fix parent pointers,
       drop extents of missing inodes, non-files and unmodified LEGACY files;
    2. link counts, from a fresh structure check (step 1 changes them);
    3. reference counts rebuilt from the extents; orphan chunks freed;
    4. each damaged or missing chunk rewritten from the Phase 3 copy of an
       unmodified file holding it (the heal a mount does at read time), which
       saves every file holding it; if none can, its holders are lost;
    5. an unmodified file whose extents or content are wrong is re-imported:
       reset to LEGACY with its extents dropped, then migrated again, when its
       Phase 3 copy still hashes to what was migrated;
    6. the search index, if it is wrong (or files were re-imported), is built
       again from the files (index.rebuild).
    Files changed through the mount cannot be rebuilt from anywhere: lost."""
    by: dict[str, list[Problem]] = defaultdict(list)
    for p in report.problems:
        by[p.kind].append(p)
    lost: set[str] = set()

    # 1
    for p in by["dangling-dirent"] + by["dirent-in-non-directory"]:
        assert p.key is not None
        store._write(partial(_delete, db="dirents", key=p.key))
    for p in by["bad-dirent-key"]:
        store._write(partial(_rekey_dirent, key=p.key))
    for p in by["stale-orphan-mark"]:
        store._write(partial(_delete, db="meta", key=p.key))
    for p in by["bad-parent"]:
        if p.repairable and p.ino is not None and p.key is not None:
            store._write(partial(_set_parent, ino=p.ino, parent=U64.unpack(p.key)[0]))
    stray = sorted({p.ino for k in STRAY_EXTENTS for p in by[k] if p.repairable and p.ino})
    for ino in stray:
        store._write(partial(_drop_extents, ino=ino))

    # 2
    fresh = Checker(store, resume=False).run(structure_only=True)
    for p in fresh.problems:
        if p.kind == "bad-nlink" and p.ino is not None and p.key is not None:
            store._write(partial(_set_nlink, ino=p.ino, nlink=U64.unpack(p.key)[0]))

    # 3
    if stray or any(by[k] for k in REFS):
        store._write(_rebuild_refs)

    # 4
    bad = {p.digest for p in by["corrupt-chunk"] + by["missing-chunk"] if p.digest is not None}
    holders = _holders(store, bad)
    for d in sorted(bad):
        inos = sorted(holders.get(d, ()))
        if not inos:
            continue  # no file names it: freed in step 3, or by the next writer's open
        if not any(_try_heal(store, ino, d) for ino in inos):
            lost.update(p.path for p in report.problems if p.digest == d and p.path)

    # 5
    redo = sorted({p.ino for k in REIMPORT for p in by[k] if p.ino is not None})
    for ino in redo:
        if not _reimport(store, ino):
            lost.update(p.path for p in report.problems if p.ino == ino and p.kind in REIMPORT)

    # 6: the search index is a cache: rebuilt whole from the (repaired) files
    if any(p.kind.startswith("index-") for p in report.problems) or redo:
        index.rebuild(store)
    return sorted(lost)


def hold_writer_lock(path: str) -> int | None:
    """Take the store's writer lock (as `Store.open` does) without opening it, so a
    read-only check and the repair that follows see the same store. The fd to close
    when done; None if `path` is not a store (opening it will say so)."""
    if not os.path.isdir(os.path.join(path, "db")):
        return None
    fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLocked(
            f"store {path} is in use (mounted or migrating): --repair needs it unmounted; "
            "fsck without --repair checks it live"
        ) from None
    return fd


def defuse_orphan_marks(path: str) -> int:
    """Drop orphan marks on inodes that directory entries still name. Opening a store
    for writing purges every marked inode, so such a mark would delete a live file
    before a repair could look at it. The caller holds the writer lock (see
    `hold_writer_lock`). Returns how many marks were dropped."""
    if not os.path.exists(os.path.join(path, "db", "data.mdb")):
        return 0
    be = LmdbBackend(os.path.join(path, "db"))
    try:
        with be.write() as txn:
            v = txn.get("meta", b"schema")
            if v is None or U64.unpack(v)[0] != SCHEMA_VERSION:
                return 0  # not ours to touch: the open that follows refuses it
            marked = {
                U64.unpack_from(k, 7)[0]: k for k, _ in txn.range("meta", b"orphan:", b"orphan;")
            }
            named = {c for _k, v in txn.range("dirents", b"") if (c := U64.unpack(v)[0]) in marked}
            for ino in named:
                txn.delete("meta", marked[ino])
            return len(named)
    finally:
        be.close()


def _delete(txn: Txn, db: str, key: bytes | None) -> None:
    if key is not None:
        txn.delete(db, key)


def _rekey_dirent(txn: Txn, key: bytes | None) -> None:
    if key is None:
        return
    v = txn.get("dirents", key)
    if v is None:
        return
    child = bytes(v)
    parent, name = U64.unpack_from(key, 0)[0], key[16:]
    txn.delete("dirents", key)
    if txn.get("dirents", dirent_key(parent, name)) is None:
        txn.put("dirents", dirent_key(parent, name), child)


def _set_parent(txn: Txn, ino: int, parent: int) -> None:
    node = ns.get(txn, ino)
    node.parent = parent
    ns.put(txn, node)


def _set_nlink(txn: Txn, ino: int, nlink: int) -> None:
    node = ns.get(txn, ino)
    node.nlink = nlink
    ns.put(txn, node)


def _drop_extents(txn: Txn, ino: int) -> None:
    for k, _ in list(txn.range("extents", extent_key(ino, 0), extent_key(ino + 1, 0))):
        txn.delete("extents", k)


def _rebuild_refs(txn: Txn) -> None:
    counted: Counter[bytes] = Counter()
    for _k, v in txn.range("extents", b""):
        d = bytes(v[:32])
        if d != HOLE:
            counted[d] += 1
    for k, v in list(txn.range("refs", b"")):
        if k not in counted:
            txn.delete("refs", k)
        elif U64.unpack(v)[0] != counted[k]:
            txn.put("refs", k, U64.pack(counted[k]))
    for d, n in counted.items():
        if txn.get("refs", d) is None:
            txn.put("refs", d, U64.pack(n))
    pending = {k for k, _ in txn.range("pending", b"")}
    for k, _ in list(txn.range("chunks", b"")):
        if k not in counted and k not in pending:
            txn.delete("chunks", k)


def _holders(store: Store, digests: set[bytes]) -> dict[bytes, set[int]]:
    out: dict[bytes, set[int]] = defaultdict(set)
    if digests:
        with store.backend.read() as txn:
            for k, v in txn.range("extents", b""):
                d = bytes(v[:32])
                if d in digests:
                    out[d].add(U64.unpack_from(k, 0)[0])
    return out


def _try_heal(store: Store, ino: int, d: bytes) -> bool:
    try:
        return store.heal(ino, d)
    except (OpError, OSError):
        return False


def _reimport(store: Store, ino: int) -> bool:
    """Migrate an unmodified file again from Phase 3, if Phase 3 still holds exactly
    the bytes it was migrated from (else nothing is changed)."""
    with store.backend.read() as txn:
        try:
            node = ns.get(txn, ino)
        except NotFound:
            return False
        leg = ns.get_legacy(txn, ino)
    if node.changed or not node.is_reg or leg is None or not leg.hashed or store.tree is None:
        return False
    want = leg.blake3
    try:
        fd = store.tree.open_file(leg.path)
    except SourceError:
        return False
    try:
        st = os.fstat(fd)
        if (st.st_ino, st.st_dev) != (leg.st_ino, leg.st_dev):
            return False
        h = blake3.blake3()
        while block := os.read(fd, 1 << 20):
            h.update(block)
    finally:
        os.close(fd)
    if h.digest() != want:
        return False

    def reset(txn: Txn) -> bool:
        n = ns.get(txn, ino)
        if n.flags & CHANGED:
            return False
        content.delete_all(txn, ino)
        n.flags &= ~STORED
        n.version += 1
        ns.put(txn, n)
        return True

    if not store._write(reset):
        return False
    try:
        store.migrate(ino)
    except (OpError, OSError):
        return False
    with store.backend.read() as txn:
        after = ns.get_legacy(txn, ino)
        done = ns.get(txn, ino).stored
    return done and after is not None and after.blake3 == want

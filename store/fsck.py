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
2. a MIGRATED file's extents tile [0, size); nothing else has extents. A hole
   is an extent (digest HOLE, see content.py) and tiles like any other; a gap
   is an error. Every extent record is well formed (key and value sizes, a
   non-zero length), and every extent naming a chunk gives the length that
   chunk's record declares: otherwise reads of the file get EIO, and it is
   reported without --deep;
3. refs[d] equals the extents naming d (holes name nothing); no orphan chunk,
   no dangling ref;
4. (--deep) every chunk decodes to bytes that hash to its key;
5. (--deep) an unmodified MIGRATED file hashes to its Phase 3 hash (holes
   hashed as zeros from a shared buffer: memory does not grow with them);
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

The pieces: this module runs a check and holds the deep, resumable checks
(invariants 4-6); fsck_checks.py the per-run state and the structure checks;
fsck_report.py what a run found; fsck_cursor.py where a run stopped;
fsck_repair.py `repair()`, which needs the store open for writing (not mounted).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import cas, codec, content, fsck_cursor, points
from . import namespace as ns
from .errors import CorruptChunk
from .fsck_checks import Checks
from .fsck_report import Problem, Report
from .kv import Buf, Txn
from .records import HOLE, U64

__all__ = ["Checker", "Problem", "Report"]


class Checker(Checks):
    """One check of one store snapshot. `run()` once per instance."""

    # -- the run --------------------------------------------------------------------------

    def run(self, structure_only: bool = False) -> Report:
        t0 = time.monotonic()
        cursor = (
            fsck_cursor.load(self.store.dir, self.deep)
            if self.resume and not structure_only
            else None
        )
        with self.store.backend.read() as txn, ThreadPoolExecutor(self.jobs) as pool:
            self.pool = pool
            self.check_inodes(txn)
            self.check_dirents(txn)
            self.check_reachable(txn)
            self.check_nlink()
            self.check_orphan_marks(txn)
            self.check_extents(txn)
            self.check_refs_and_chunks(txn)
            self.check_packs(txn)
            self.check_index(txn)
            if not structure_only:
                self.check_point(txn)
                self._resumable(txn, cursor)
            self.drain()
            self.name_damaged_chunks(txn)
        if self.dir_fds is not None:
            self.dir_fds.close()
        self.report.seconds = time.monotonic() - t0
        return self.report

    def _resumable(self, txn: Txn, cursor: dict[str, Any] | None) -> None:
        """Invariants 4-6, item by item, stopping at the deadline with a cursor."""
        first, start = fsck_cursor.PHASES[0], None
        if cursor is not None and cursor.get("point") != self.report.point:
            cursor = None  # made against another rollback point: start over
        if cursor is not None:
            first, start = cursor["phase"], bytes.fromhex(cursor["next"])
            for phase, key in cursor["carried"]:  # found before: still there?
                self._item(txn, phase, bytes.fromhex(key), carried=True)
            self.report.notes.append(f"carried on from an earlier run's {first} phase")
        for phase in fsck_cursor.PHASES[fsck_cursor.PHASES.index(first) :]:
            stop = self._phase(txn, phase, start if phase == first else None)
            if stop is not None:
                self.report.partial = True
                self.drain()
                self._save_cursor(phase, stop)
                return
        fsck_cursor.clear(self.store.dir, self.deep)

    def _phase(self, txn: Txn, phase: str, start: bytes | None) -> bytes | None:
        """Run one phase from `start`; the key it stopped at, or None when done."""
        for key in self._keys(txn, phase, start):
            if self.progressed and self.late():
                return key
            self._item(txn, phase, key)
            self.progressed = True
        self.drain()
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

    def _save_cursor(self, phase: str, nxt: bytes) -> None:
        found = {p.origin for p in self.report.problems if p.origin is not None}
        carried = sorted(found | set(self.bad.values()))  # damaged chunks: named later
        note = fsck_cursor.save(self.store.dir, self.deep, self.report.point, phase, nxt, carried)
        if note is not None:
            self.report.notes.append(note)

    # -- invariant 4: chunk hashes (--deep) --------------------------------------------------

    def check_chunk(self, txn: Txn, d: bytes) -> None:
        rec = cas.record(txn, d)
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

        self.submit(done, _decode_ok, d, rec)

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
        if node.is_migrated and not node.changed and ino not in self.damaged:
            items: list[tuple[bytes, Buf | None, int]] = [
                (d, None if d == HOLE else cas.record(txn, d), n)
                for _off, d, n in content.all_extents(txn, ino)
            ]

            def stored(r: content.Hashed) -> None:
                status, bad, n = r.status, r.bad, r.decoded
                if status in ("ok", "short") and r.digest != leg.blake3:
                    status = "differs"
                self.verified.update(r.verified)
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

            self.submit(stored, content.hash_chunks, items)
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

        self.submit(phase3, points.content_drift, tree, leg.path, row, leg.blake3)

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
        if self.dir_fds is None:
            self.dir_fds = points.DirFds(self.tree)
        path, row = points.unpack_row(key, v)
        self.report.rows_checked += 1
        for d in points.stat_drift(txn, self.tree, self.dir_fds, self.point.id, path, row):
            self.add("phase3-drift", d.how, path=d.shown, origin=("points", key))


# -- worker functions (run on the pool; they touch no transaction) ----------------------------


def _decode_ok(d: bytes, rec: Buf) -> tuple[bool, int]:
    try:
        return True, len(codec.decode(rec, d))
    except CorruptChunk:
        return False, 0

"""Checking a store against DESIGN's invariants, and repairing what can be.

`Checker.run()` reads ONE consistent snapshot (a single read transaction), so
it works beside a live mount, like a scrub. Each invariant is a small
`check_*` method that adds `Problem`s. `--deep` also decodes every chunk
(invariant 4, on a thread pool: zstd and blake3 release the GIL), hashes every
unmodified migrated file against its Phase 3 hash (5) and the Phase 3 tree
against the rollback point's manifest, the legacy records (6). Invariant 7
(the search index) has nothing to check: nothing writes the index yet.

`repair()` needs the store opened for writing (so not mounted): it rebuilds
reference counts from the extents, frees orphan chunks, drops dirents to
missing inodes, fixes link counts, and rewrites damaged chunks from the Phase
3 copy of an unmodified file that holds them (the heal the mount does at read
time); a damaged file nobody can heal is reported as lost.
"""

from __future__ import annotations

import functools
import os
import stat
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from . import codec
from . import namespace as ns
from .errors import CorruptChunk, OpError, SourceError
from .kv import Txn
from .phase3 import Phase3Tree
from .records import HOLE, ROOT_INO, U64, Inode, Legacy, extent_key, unpack_extent
from .store import Store

CURSOR = "fsck.cursor"  # where a --max-duration run stopped in the deep chunk scan


@dataclass
class Problem:
    kind: str
    path: str
    detail: str
    ino: int | None = None
    digest: bytes | None = None

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"kind": self.kind, "path": self.path, "detail": self.detail}
        if self.ino is not None:
            d["ino"] = self.ino
        if self.digest is not None:
            d["chunk"] = self.digest.hex()
        return d


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    partial: bool = False
    chunks_checked: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    repaired: int = 0
    lost: list[str] = field(default_factory=list)


class Checker:
    def __init__(
        self,
        store: Store,
        deep: bool = False,
        max_seconds: float | None = None,
        progress: Callable[[int], None] | None = None,
        jobs: int = os.cpu_count() or 2,
    ) -> None:
        self.store = store
        self.deep = deep
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self.progress = progress or (lambda n: None)
        self.jobs = jobs
        self.report = Report()
        # Filled by the structure checks, used by the later ones.
        self.inodes: dict[int, Inode] = {}
        self.names: dict[int, tuple[int, bytes]] = {}  # ino -> one (parent, name)
        self.links: Counter[int] = Counter()
        self.subdirs: Counter[int] = Counter()
        self.refs_counted: Counter[bytes] = Counter()
        self.damaged_files: dict[bytes, set[int]] = defaultdict(set)

    # -- helpers ------------------------------------------------------------------

    def add(
        self,
        kind: str,
        detail: str,
        ino: int | None = None,
        digest: bytes | None = None,
    ) -> None:
        self.report.problems.append(Problem(kind, self.path(ino), detail, ino, digest))

    def path(self, ino: int | None) -> str:
        if ino is None:
            return ""
        parts: list[bytes] = []
        seen = set()
        while ino != ROOT_INO and ino in self.names and ino not in seen:
            seen.add(ino)
            parent, name = self.names[ino]
            parts.append(name)
            ino = parent
        if ino != ROOT_INO:
            return f"<inode {ino}>" + (
                "/" + os.fsdecode(b"/".join(reversed(parts))) if parts else ""
            )
        return "/" + os.fsdecode(b"/".join(reversed(parts)))

    # -- the run ------------------------------------------------------------------

    def run(self) -> Report:
        t0 = time.monotonic()
        with self.store.backend.read() as txn:
            self.check_inodes_and_dirents(txn)
            self.check_reachable_and_nlink(txn)
            self.check_extents(txn)
            self.check_refs_and_chunks(txn)
            if self.deep:
                self.check_chunk_hashes(txn)
                self.check_files_against_phase3(txn)
        if self.deep:
            self.check_phase3_against_point()
        self.report.seconds = time.monotonic() - t0
        return self.report

    def check_inodes_and_dirents(self, txn: Txn) -> None:
        """Invariant 1, first half: every dirent names an existing inode."""
        for k, v in txn.range("inodes", b""):
            ino = U64.unpack(k)[0]
            self.inodes[ino] = Inode.unpack(ino, v)
        for k, v in txn.range("dirents", b""):
            parent, child, name = U64.unpack_from(k, 0)[0], U64.unpack(v)[0], bytes(k[16:])
            if child not in self.inodes:
                self.names.setdefault(child, (parent, name))
                self.add("dangling-dirent", f"entry {name!r} names missing inode {child}", child)
                continue
            self.names.setdefault(child, (parent, name))
            self.links[child] += 1
            if self.inodes[child].is_dir:
                self.subdirs[parent] += 1
                if self.inodes[child].parent != parent:
                    self.add(
                        "bad-parent",
                        f"directory's parent is {self.inodes[child].parent}, "
                        f"its entry is in {parent}",
                        child,
                    )
            if parent not in self.inodes or not self.inodes[parent].is_dir:
                self.add("dirent-in-non-directory", f"entry {name!r} under inode {parent}", child)

    def check_reachable_and_nlink(self, txn: Txn) -> None:
        """Invariant 1, second half: every inode reachable; link counts right."""
        orphans = {U64.unpack_from(k, 7)[0] for k, _ in txn.range("meta", b"orphan:", b"orphan;")}
        for ino, node in self.inodes.items():
            if ino == ROOT_INO:
                continue
            if self.links[ino] == 0 and ino not in orphans:
                self.add("unreachable-inode", "no directory entry names it", ino)
                continue
            if node.is_dir:
                if node.stored and node.nlink != 2 + self.subdirs[ino]:
                    self.add(
                        "bad-nlink", f"nlink {node.nlink}, should be {2 + self.subdirs[ino]}", ino
                    )
            elif ino not in orphans and node.nlink != self.links[ino]:
                self.add("bad-nlink", f"nlink {node.nlink}, {self.links[ino]} entries name it", ino)

    def check_extents(self, txn: Txn) -> None:
        """Invariant 2: a MIGRATED file's extents tile [0, size); LEGACY files have none."""
        cur_ino, pos = -1, 0

        def close(ino: int) -> None:
            node = self.inodes.get(ino)
            if node is not None and node.is_reg and node.stored and pos != node.size:
                self.add("extent-gap", f"extents end at {pos}, size is {node.size}", ino)

        for k, v in txn.range("extents", b""):
            ino = U64.unpack_from(k, 0)[0]
            off, d, n = unpack_extent(k, v)
            if ino != cur_ino:
                if cur_ino >= 0:
                    close(cur_ino)
                cur_ino, pos = ino, 0
                node = self.inodes.get(ino)
                if node is None:
                    self.add("extents-of-missing-inode", "extents for no inode", ino)
                elif not (node.is_reg and node.stored):
                    self.add("extents-of-legacy-file", "a LEGACY file has extents", ino)
            if off != pos:
                self.add(
                    "extent-gap" if off > pos else "extent-overlap",
                    f"extent at {off}, expected {pos}",
                    ino,
                )
            pos = off + n
            if d != HOLE:
                self.refs_counted[d] += 1
        if cur_ino >= 0:
            close(cur_ino)
        with_extents = {U64.unpack_from(k, 0)[0] for k, _ in txn.range("extents", b"")}
        for ino, node in self.inodes.items():
            if node.is_reg and node.stored and node.size > 0 and ino not in with_extents:
                self.add("extent-gap", f"no extents for {node.size} bytes", ino)

    def check_refs_and_chunks(self, txn: Txn) -> None:
        """Invariant 3: refs[d] equals the extents naming d; no orphan or dangling chunk."""
        stored_refs: dict[bytes, int] = {}
        for k, v in txn.range("refs", b""):
            stored_refs[bytes(k)] = U64.unpack(v)[0]
        chunks = {bytes(k) for k, _ in txn.range("chunks", b"")}
        pending = {bytes(k) for k, _ in txn.range("pending", b"")}
        for d, n in self.refs_counted.items():
            if stored_refs.get(d) != n:
                self.add(
                    "bad-refcount", f"refs {stored_refs.get(d)}, {n} extents name it", digest=d
                )
            if d not in chunks:
                self.add("missing-chunk", "extents name a chunk that is not stored", digest=d)
                self.damaged_files[d].update(self._referrers(txn, d))
        for d in stored_refs.keys() - self.refs_counted.keys():
            self.add("dangling-ref", "a reference count for a chunk no extent names", digest=d)
        for d in chunks - self.refs_counted.keys() - pending:
            self.add("orphan-chunk", "a chunk no extent names", digest=d)

    def _referrers(self, txn: Txn, digest: bytes) -> set[int]:
        return {
            U64.unpack_from(k, 0)[0]
            for k, v in txn.range("extents", b"")
            if bytes(v[:32]) == digest
        }

    def check_chunk_hashes(self, txn: Txn) -> None:
        """Invariant 4 (--deep): every chunk decodes to bytes that hash to its key."""
        start = self._load_cursor()
        bad: list[bytes] = []

        def verify(item: tuple[bytes, bytes]) -> tuple[bytes, int, bool]:
            d, rec = item
            try:
                return d, len(codec.decode(rec, d)), True
            except CorruptChunk:
                return d, 0, False

        def items() -> Iterator[tuple[bytes, bytes]]:
            for k, v in txn.range("chunks", start):
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self.report.partial = True
                    self._save_cursor(k)
                    return
                yield bytes(k), bytes(v)

        with ThreadPoolExecutor(self.jobs) as pool:
            for d, n, ok in pool.map(verify, items(), chunksize=16):
                self.report.chunks_checked += 1
                self.report.bytes_checked += n
                self.progress(n)
                if not ok:
                    bad.append(d)
        if not self.report.partial:
            self._save_cursor(None)
        for d in bad:
            self.damaged_files[d].update(self._referrers(txn, d))
            for ino in sorted(self.damaged_files[d]) or [None]:  # type: ignore[list-item]
                self.add("corrupt-chunk", "chunk bytes do not hash to its key", ino, d)

    def check_files_against_phase3(self, txn: Txn) -> None:
        """Invariant 5 (--deep): an unmodified MIGRATED file hashes to its Phase 3 hash."""
        if self.report.partial:
            return
        damaged = {i for s in self.damaged_files.values() for i in s}
        todo = []
        for ino, node in self.inodes.items():
            if not (node.is_reg and node.stored) or node.changed or ino in damaged:
                continue
            leg = ns.get_legacy(txn, ino)
            if leg is not None and leg.hashed:
                todo.append((ino, leg.blake3))

        def differs(item: tuple[int, bytes]) -> bool:
            ino, want = item
            h = blake3.blake3()
            # A transaction belongs to one thread: each worker reads in its own, and
            # skips a file a live mount changed since the main snapshot.
            with self.store.backend.read() as t:
                try:
                    if ns.get(t, ino).changed:
                        return False
                    for _off, d, n in _extents(t, ino):
                        rec = t.get("chunks", d) if d != HOLE else None
                        h.update(bytes(n) if d == HOLE else codec.decode(rec or b"", d, n))
                except (CorruptChunk, OpError):
                    return False  # reported by check_chunk_hashes, or gone since
            return h.digest() != want

        with ThreadPoolExecutor(self.jobs) as pool:
            for (ino, _), bad in zip(todo, pool.map(differs, todo), strict=True):
                if bad:
                    self.add("content-differs", "migrated content does not hash to Phase 3's", ino)

    def check_phase3_against_point(self) -> None:
        """Invariant 6 (--deep): the Phase 3 tree still matches what was snapshotted."""
        tree = self.store.tree
        if tree is None:
            return
        items = [
            (i, leg)
            for i, leg in self._legacy_items()
            if i in self.inodes and not self.inodes[i].is_dir
        ]
        with ThreadPoolExecutor(self.jobs) as pool:
            drifts = pool.map(lambda item: phase3_drift(tree, item[1], self.deep), items)
            for (ino, leg), drift in zip(items, drifts, strict=True):
                if drift:
                    self.report.problems.append(
                        Problem("phase3-drift", "/" + os.fsdecode(leg.path), drift, ino)
                    )

    def _legacy_items(self) -> list[tuple[int, Legacy]]:
        with self.store.backend.read() as txn:
            return [(U64.unpack(k)[0], Legacy.unpack(v)) for k, v in txn.range("legacy", b"")]

    # -- --max-duration ----------------------------------------------------------------

    def _cursor_path(self) -> str | None:
        return os.path.join(self.store.path, CURSOR) if self.store.path else None

    def _load_cursor(self) -> bytes:
        p = self._cursor_path()
        if p and os.path.exists(p):
            with open(p, "rb") as f:
                return f.read()
        return b""

    def _save_cursor(self, key: bytes | None) -> None:
        p = self._cursor_path()
        if not p:
            return
        if key is None:
            if os.path.exists(p):
                os.unlink(p)
            return
        with open(p + ".tmp", "wb") as f:
            f.write(key)
        os.replace(p + ".tmp", p)


def _extents(txn: Txn, ino: int) -> Iterator[tuple[int, bytes, int]]:
    for k, v in txn.range("extents", extent_key(ino, 0), extent_key(ino + 1, 0)):
        yield unpack_extent(k, v)


def phase3_drift(tree: Phase3Tree, leg: Legacy, deep: bool) -> str:
    """How the Phase 3 file behind `leg` differs from its snapshot ('' if it does not)."""
    try:
        st = tree.lstat(leg.path)
    except (SourceError, OSError) as e:
        return f"gone ({e})"
    except Exception as e:  # NotFound
        return f"gone ({e})"
    if not stat.S_ISREG(st.st_mode):
        return "no longer a regular file"
    if (st.st_size, st.st_mtime_ns) != (leg.size, leg.mtime_ns):
        return f"size/mtime changed ({leg.size} -> {st.st_size} bytes)"
    if deep and leg.hashed:
        try:
            fd = tree.open_file(leg.path)
        except SourceError as e:
            return f"unreadable ({e})"
        h = blake3.blake3()
        with os.fdopen(fd, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        if h.digest() != leg.blake3:
            return "content changed"
    return ""


def repair(store: Store, report: Report) -> Report:
    """Fix what `report` found (store opened for writing). Returns what is left."""
    kinds = {p.kind for p in report.problems}
    if kinds & {"bad-refcount", "dangling-ref", "orphan-chunk"}:
        store._write(_rebuild_refs)
        report.repaired += sum(
            p.kind in ("bad-refcount", "dangling-ref", "orphan-chunk") for p in report.problems
        )
    for p in report.problems:
        if p.kind == "dangling-dirent" and p.ino is not None:
            store._write(functools.partial(_drop_dirents_to, ino=p.ino))
            report.repaired += 1
        elif p.kind == "bad-nlink" and p.ino is not None:
            store._write(functools.partial(_fix_nlink, ino=p.ino))
            report.repaired += 1
    bad = {
        p.digest: p
        for p in report.problems
        if p.kind in ("corrupt-chunk", "missing-chunk") and p.digest is not None
    }
    for d in bad:
        holders = _referrers_now(store, d)
        if not holders or any(store.heal(ino, d) for ino in holders):  # none: freed above
            report.repaired += sum(1 for p in report.problems if p.digest == d)
        else:
            report.lost.extend(sorted({p.path for p in report.problems if p.digest == d}))
    return report


def _rebuild_refs(txn: Txn) -> None:
    counted: Counter[bytes] = Counter()
    for _k, v in txn.range("extents", b""):
        d = bytes(v[:32])
        if d != HOLE:
            counted[d] += 1
    for k, _ in list(txn.range("refs", b"")):
        if bytes(k) not in counted:
            txn.delete("refs", bytes(k))
    for d, n in counted.items():
        txn.put("refs", d, U64.pack(n))
    pending = {bytes(k) for k, _ in txn.range("pending", b"")}
    for k, _ in list(txn.range("chunks", b"")):
        if bytes(k) not in counted and bytes(k) not in pending:
            txn.delete("chunks", bytes(k))


def _drop_dirents_to(txn: Txn, ino: int) -> None:
    for k, v in list(txn.range("dirents", b"")):
        if U64.unpack(v)[0] == ino and txn.get("inodes", U64.pack(ino)) is None:
            txn.delete("dirents", bytes(k))


def _fix_nlink(txn: Txn, ino: int) -> None:
    node = ns.get(txn, ino)
    names = sum(1 for _k, v in txn.range("dirents", b"") if U64.unpack(v)[0] == ino)
    if node.is_dir:
        node.nlink = 2 + sum(1 for _c, _n, c in ns.entries(txn, ino) if ns.get(txn, c).is_dir)
    else:
        node.nlink = names
    ns.put(txn, node)


def _referrers_now(store: Store, digest: bytes) -> list[int]:
    with store.backend.read() as txn:
        return sorted(
            {
                U64.unpack_from(k, 0)[0]
                for k, v in txn.range("extents", b"")
                if bytes(v[:32]) == digest
            }
        )

"""The structure checks of fsck (DESIGN's invariants 1-3, and 7) and the state a
run keeps: see fsck.py for what each invariant says and how a run goes."""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from . import cas, fsck_packs, index, packs, points
from . import namespace as ns
from .chunker import DIGEST_SIZE
from .fsck_report import Problem, Report
from .kv import Buf, Txn
from .phase3 import Phase3Tree
from .records import (
    HOLE,
    ROOT_INO,
    U64,
    Inode,
    name_cookie,
    unpack_extent,
)
from .store import Store

Result = Any
Handler = Callable[[Result], None]


class Checks:
    """The per-run state of one check of one store snapshot, the thread pool that
    hashes for it, and the structure checks (invariants 1-3 and 7). `Checker`
    (fsck.py) runs them and the deep, resumable ones."""

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
        self.extent_len: dict[bytes, int] = {}  # chunk -> the length its first extent gives
        self.length_differs: dict[bytes, int] = {}  # chunk -> a length disagreeing with that
        self.bad: dict[bytes, tuple[str, bytes]] = {}  # chunk failing its hash -> origin
        self.verified: set[bytes] = set()  # chunks decoded and hashed right this run
        self.point: points.Point | None = None
        self.released = False
        self.progressed = False
        self.pool: ThreadPoolExecutor | None = None
        self._inflight: deque[tuple[Future[Result], Handler]] = deque()
        self.dir_fds: points.DirFds | None = None

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

    def late(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    # -- the thread pool ------------------------------------------------------------------

    def submit(self, handler: Handler, fn: Callable[..., Result], *args: Any) -> None:
        assert self.pool is not None
        self._inflight.append((self.pool.submit(fn, *args), handler))
        while len(self._inflight) > 4 * self.jobs:
            self._settle()

    def _settle(self) -> None:
        fut, handler = self._inflight.popleft()
        handler(fut.result())

    def drain(self) -> None:
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
            if node is None or not node.is_migrated or flagged:
                return
            if pos < node.size:
                self._tiling(ino, "extent-gap", f"extents end at {pos}, size is {node.size}")
            elif pos > node.size:
                self._tiling(ino, "extents-past-end", f"extents reach {pos}, size is {node.size}")

        for k, v in txn.range("extents", b""):
            if len(k) < U64.size:
                self.add("malformed-extent", f"an extents key of {len(k)} bytes", path="")
                continue
            ino = U64.unpack_from(k, 0)[0]
            if ino != cur:
                if cur >= 0:
                    close(cur)
                cur, pos, flagged = ino, 0, False
                self._stray_extents(ino)
            bad = malformed_extent(k, v)
            if bad is not None:
                # Unreadable, so no tiling can be judged after it: one problem.
                if not flagged:
                    self._tiling(ino, "malformed-extent", bad)
                flagged = True
                continue
            off, d, n = unpack_extent(k, v)
            if off != pos and not flagged:
                kind = "extent-gap" if off > pos else "extent-overlap"
                self._tiling(ino, kind, f"an extent starts at {off}, the one before ends at {pos}")
                flagged = True
            pos = off + n
            if d != HOLE:  # holes tile like any extent but name no chunk
                self.refs_counted[d] += 1
                if self.extent_len.setdefault(d, n) != n:
                    self.length_differs[d] = n
        if cur >= 0:
            close(cur)
        with_extents = {U64.unpack_from(k, 0)[0] for k, _ in first_of_each_ino(txn)}
        for ino, node in self.inodes.items():
            if node.is_migrated and node.size > 0 and ino not in with_extents:
                self._tiling(ino, "extent-gap", f"no extents for its {node.size} bytes")

    def _stray_extents(self, ino: int) -> None:
        """Extents of something that should have none (invariant 2's other half)."""
        node = self.inodes.get(ino)
        if node is None:
            self.add("extents-of-missing-inode", "extents of no inode", ino, repairable=True)
        elif not node.is_reg:
            self.add("extents-of-non-file", "extents of a non-file", ino, repairable=True)
        elif not node.stored:
            self.add(
                "extents-of-legacy-file",
                "a LEGACY file (content in Phase 3) has extents",
                ino,
                repairable=not node.changed,
            )

    def _tiling(self, ino: int, kind: str, detail: str) -> None:
        node = self.inodes.get(ino)
        if node is None or not node.is_migrated:
            return
        self.damaged.add(ino)
        self.add(kind, detail, ino, repairable=self.healable(node))

    # -- invariant 3: references ----------------------------------------------------------

    def check_refs_and_chunks(self, txn: Txn) -> None:
        """refs[d] equals the extents naming d; no orphan chunk, no dangling ref. A chunk
        staged by a migration in flight (`pending`) may have no reference yet."""
        stored: dict[bytes, int] = {k: U64.unpack(v)[0] for k, v in txn.range("refs", b"")}
        chunks: set[bytes] = set()
        for k, v in txn.range("chunks", b""):
            chunks.add(k)
            want = self.extent_len.get(k)
            if want is not None and packs.is_pointer(v):
                v = cas.record(txn, k) or b""
            said = cas.plain_length(v) if want is not None else None
            if said is not None and said != want:
                self.length_differs.setdefault(k, said)
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
        self._name_length_differs(txn)

    def _name_length_differs(self, txn: Txn) -> None:
        """A chunk whose extents disagree on its length, or with the length its record
        declares: a read of that file gets EIO. One problem per file holding it."""
        if not self.length_differs:
            return
        holders: dict[bytes, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
        for k, v in txn.range("extents", b""):
            if malformed_extent(k, v) is None:
                _off, d, n = unpack_extent(k, v)
                if d in self.length_differs:
                    holders[d][U64.unpack_from(k, 0)[0]].add(n)
        for d in sorted(self.length_differs):
            for ino, lengths in sorted(holders[d].items()):
                node = self.inodes.get(ino)
                if node is None or not node.is_migrated:
                    continue
                self.damaged.add(ino)
                self.add(
                    "extent-length-differs",
                    f"extents of {sorted(lengths)} bytes name chunk {d.hex()[:16]}, which "
                    f"other extents or its record give {self.length_differs[d]} bytes",
                    ino,
                    repairable=self.healable(node),
                    digest=d,
                )

    # -- invariant 8: packs and dictionaries ---------------------------------------------------

    def check_packs(self, txn: Txn) -> None:
        """Chunks inside live packs, no overlaps, pack accounting, dictionaries
        (fsck_packs.py). A chunk that cannot be read is named with its files."""
        scan = fsck_packs.check(txn)
        for f in scan.findings:
            self.add(
                f.kind,
                f.detail,
                repairable=f.kind != "missing-dictionary",
                digest=f.digest,
                key=f.key,
            )
        for d in scan.unreadable:
            self.bad.setdefault(d, ("chunks", d))

    # -- invariant 7: the index -------------------------------------------------------------------

    def check_index(self, txn: Txn) -> None:
        if self.store.path is None:
            return
        found, notes = index.check(txn, self.store.path)
        self.report.notes.extend(notes)
        for f in found:
            self.add(f.kind, f.detail, ino=f.ino, repairable=True)


def malformed_extent(key: bytes, value: Buf) -> str | None:
    """Why an extents record cannot be read, or None if it is well formed."""
    if len(key) != 2 * U64.size:
        return f"an extents key of {len(key)} bytes, not {2 * U64.size}"
    if len(value) != DIGEST_SIZE + U64.size:
        return f"an extent value of {len(value)} bytes, not {DIGEST_SIZE + U64.size}"
    off, n = U64.unpack_from(key, 8)[0], U64.unpack_from(value, DIGEST_SIZE)[0]
    if n == 0:
        return f"an empty extent at {off}"
    if off + n > 1 << 64:
        return f"an extent at {off} of {n} bytes runs past the largest offset"
    return None


def first_of_each_ino(txn: Txn) -> Iterator[tuple[bytes, Buf]]:
    """The first extent of each inode (a seek per inode, not a scan of all extents)."""
    start = b""
    while True:
        item = next(iter(txn.range("extents", start)), None)
        if item is None:
            return
        yield item
        start = U64.pack(U64.unpack_from(item[0], 0)[0] + 1)

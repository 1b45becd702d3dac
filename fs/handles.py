"""Open files: handles, per-inode write buffers, and the lock that orders a
file's reads, writes, flushes and truncations.

A file's buffer is only touched on the trio thread while holding its `lock`
(writeback.py flushes it under that lock). Every `await` is a point where
another request for the same file can run: docs/concurrency.md.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import trio
from ferryfs.store.phase3 import Phase3File

# A file's buffered bytes are written out when they pass this, not only at close.
FLUSH_BYTES = 16 << 20
# ...or when this many separate spans are buffered: each costs a hundred-odd bytes
# of Python objects beside its payload, so many 1-byte writes must flush too.
FLUSH_SPANS = 1 << 16


@dataclass
class OpenFile:
    """State shared by every handle open on one inode."""

    ino: int
    lock: trio.Lock = field(default_factory=trio.Lock)
    handles: int = 0
    spans: list[tuple[int, bytearray]] = field(default_factory=list)
    dirty_bytes: int = 0
    dirty_end: int = 0  # end of the furthest buffered byte
    flushing: bool = False  # spans taken out and not committed yet

    @property
    def full(self) -> bool:
        """Enough is buffered that it should be written out now."""
        return self.dirty_bytes >= FLUSH_BYTES or len(self.spans) >= FLUSH_SPANS

    def add(self, off: int, data: bytes) -> None:
        """Buffer a write, merging it with the spans it overlaps or touches."""
        end = off + len(data)
        self.dirty_end = max(self.dirty_end, end)
        spans = self.spans
        if spans:
            last_off, last = spans[-1]
            if last_off <= off <= last_off + len(last) and end >= last_off + len(last):
                # The common case: appending to (or overwriting the tail of) the last span.
                before = len(last)
                del last[off - last_off :]
                last += data
                self.dirty_bytes += len(last) - before
                return
        i = bisect.bisect_left(spans, off, key=lambda s: s[0])
        if i > 0 and spans[i - 1][0] + len(spans[i - 1][1]) >= off:
            i -= 1
        j = i
        new_off, new_end = off, end
        while j < len(spans) and spans[j][0] <= end:
            new_off = min(new_off, spans[j][0])
            new_end = max(new_end, spans[j][0] + len(spans[j][1]))
            j += 1
        # Only the spans this write touches are visited: a write costs its bytes
        # and a bisection, not a pass over every span buffered (scattered small
        # writes would make that quadratic).
        merged = bytearray(new_end - new_off)
        replaced = 0
        for s_off, s in spans[i:j]:
            merged[s_off - new_off : s_off - new_off + len(s)] = s
            replaced += len(s)
        merged[off - new_off : end - new_off] = data
        spans[i:j] = [(new_off, merged)]
        self.dirty_bytes += len(merged) - replaced

    def restore(self, spans: list[tuple[int, bytes]]) -> None:
        """Put back spans a failed flush took, under any written since."""
        newer = self.spans
        self.spans, self.dirty_bytes, self.dirty_end = [], 0, 0
        self.flushing = False
        for off, data in [*spans, *((o, bytes(b)) for o, b in newer)]:
            self.add(off, data)

    def take(self) -> list[tuple[int, bytes]]:
        """The buffered spans, leaving the buffer empty. `dirty_end` still counts them
        until `settle()`: the store's size does not until they are committed, and a
        getattr answered in between must not shrink the file under the kernel."""
        out = [(o, bytes(b)) for o, b in self.spans]
        self.spans = []
        self.dirty_bytes = 0
        self.flushing = bool(out)
        return out

    def settle(self) -> None:
        """The spans taken are committed (or dropped): only the buffer counts again."""
        self.dirty_end = max((o + len(b) for o, b in self.spans), default=0)
        self.flushing = False

    def drop(self) -> None:
        """Forget every buffered byte (truncated away, or unwritable)."""
        self.take()
        self.settle()


@dataclass
class Handle:
    fh: int
    file: OpenFile
    legacy: Phase3File | None = None  # reads of a LEGACY file come from its Phase 3 copy


class OpenFiles:
    """File handles and the per-inode OpenFile they share."""

    def __init__(self) -> None:
        self.by_fh: dict[int, Handle] = {}
        self.by_ino: dict[int, OpenFile] = {}
        self._next = 1
        # Per-inode locks for files with no open handle (setattr by path, first-open migration).
        self._locks: dict[int, trio.Lock] = {}

    def file(self, ino: int) -> OpenFile:
        f = self.by_ino.get(ino)
        if f is None:
            f = OpenFile(ino, lock=self._locks.setdefault(ino, trio.Lock()))
            self.by_ino[ino] = f
        return f

    def lock(self, ino: int) -> trio.Lock:
        f = self.by_ino.get(ino)
        if f is not None:
            return f.lock
        return self._locks.setdefault(ino, trio.Lock())

    def open(self, ino: int) -> Handle:
        f = self.file(ino)
        f.handles += 1
        h = Handle(self._next, f)
        self._next += 1
        self.by_fh[h.fh] = h
        return h

    def get(self, fh: int) -> Handle:
        return self.by_fh[fh]

    def close(self, fh: int) -> OpenFile:
        h = self.by_fh.pop(fh)
        if h.legacy is not None:
            h.legacy.close()
            h.legacy = None
        h.file.handles -= 1
        if h.file.handles == 0 and not h.file.spans:
            self.by_ino.pop(h.file.ino, None)
            lk = self._locks.get(h.file.ino)
            if lk is not None and not lk.locked() and lk.statistics().tasks_waiting == 0:
                del self._locks[h.file.ino]
        return h.file

"""Read-ahead: decode the chunks a sequential reader will want next, on threads.

Reading a stored file is decoding it: zstd and the blake3 check cost about
1.7 ms per MiB here, and both release the GIL. When reads of a file follow one
another, the next `WINDOW` bytes' chunks are decoded into the chunk cache on
this module's threads (one per CPU, up to two), so the reader's thread finds
them there (or waits for the one being decoded) and the CPUs share the work. A chunk that fails its
check is left for the reader, which raises CorruptChunk as it always does.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable

from . import cas, codec, content
from .cas import ChunkCache
from .errors import CorruptChunk
from .kv import Backend
from .records import HOLE

WINDOW = 8 << 20
STEP = 1 << 20  # queued in pieces of this, so that every thread takes some
THREADS = min(2, os.cpu_count() or 1)
FILES = 64  # read positions remembered


class ReadAhead:
    def __init__(self, backend: Backend, cache: Callable[[], ChunkCache]) -> None:
        self._backend = backend
        self._cache = cache
        self._lock = threading.Lock()
        # ino -> (where the next sequential read starts, how far ahead is queued)
        self._pos: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._queue: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def note(self, ino: int, off: int, end: int, size: int) -> None:
        """A read of [off, end) of `ino` (of `size` bytes) was answered."""
        with self._lock:
            nxt, ahead = self._pos.pop(ino, (-1, 0))
            start, stop = max(ahead, end), min(size, end + WINDOW)
            if off != nxt:  # not sequential (yet): remember where it would go on
                self._pos[ino] = (end, end)
                start = stop
            elif stop - start < WINDOW // 2 and stop < size:
                start = stop  # enough is queued: top up in steps larger than a read
                self._pos[ino] = (end, ahead)
            else:
                self._pos[ino] = (end, max(ahead, stop))
            while len(self._pos) > FILES:
                self._pos.popitem(last=False)
            if stop <= start:
                return
            if not self._threads:
                for i in range(THREADS):
                    t = threading.Thread(target=self._run, name=f"ferryfs-readahead-{i}")
                    t.daemon = True
                    t.start()
                    self._threads.append(t)
        for piece in range(start, stop, STEP):
            self._queue.put((ino, piece, min(stop, piece + STEP)))

    def close(self) -> None:
        """Stop the thread (before the store's environment closes)."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for t in threads:
            t.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            ino, start, stop = item
            cache = self._cache()
            try:
                with self._backend.read() as txn:
                    for _, d, n in content.overlapping(txn, ino, start, stop):
                        if d == HOLE or not cache.claim(d):
                            continue
                        plain = None
                        try:
                            rec = cas.record(txn, d)
                            if rec is not None:
                                plain = codec.decode(rec, d, n)
                        except CorruptChunk:
                            pass  # the reader finds it and says so
                        finally:
                            cache.settle(d, plain)
            except Exception:  # the store closing under it, or worse: reads go on unaided
                continue

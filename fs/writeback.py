"""The write-back buffers' way to the store: a file's buffered spans are planned
into a rewrite (chunked and compressed, on a worker thread when they are many)
and committed on the writer, all under the file's lock (fs/handles.py), so a
read that waits for the lock sees either the old bytes or the new ones.
Threads and locks: docs/concurrency.md.
"""

from __future__ import annotations

import trio
from ferryfs.store.store import Store

from .handles import OpenFile, OpenFiles
from .writer import Writer

# Buffered bytes, or spans, at which planning the rewrite is worth a thread hop
# (~0.75 ms here): below them, planning inline costs less than the hop.
BIG_BYTES = 1 << 20
BIG_SPANS = 4096


class WriteBack:
    """Flushes the buffers of `files` to `store` through `writer`."""

    def __init__(self, store: Store, files: OpenFiles, writer: Writer) -> None:
        self.store = store
        self.files = files
        self.writer = writer

    async def flush_file(self, ino: int) -> None:
        """Write a file's buffered spans to the store. Call with its lock held."""
        f = self.files.by_ino.get(ino)
        while f is not None and f.spans:
            big = f.dirty_bytes >= BIG_BYTES or len(f.spans) >= BIG_SPANS
            spans = f.take()
            try:
                while True:
                    if big:
                        rw = await trio.to_thread.run_sync(self.store.plan_write, ino, spans)
                    else:
                        rw = self.store.plan_write(ino, spans)
                    # None: the file changed since the plan (a migration committed): plan again.
                    if await self.writer.run(self.store.commit, rw) is not None:
                        break
                f.settle()
            except BaseException:
                # ENOSPC or worse: keep the bytes buffered, so freeing space and
                # flushing again loses nothing the app wrote.
                f.restore(spans)
                raise

    async def flush_dirty(self, f: OpenFile) -> None:
        """Flush `f` if it has buffered bytes or a flush in flight (whose spans are
        out of the buffer, not yet committed). A clean file's lock is not taken: a
        first-open migration holds it for as long as the file takes to migrate."""
        if f.spans or f.flushing:
            async with f.lock:
                await self.flush_file(f.ino)

    async def flush_all(self) -> list[tuple[int, int, Exception]]:
        """Write out every buffered file; the (inode, bytes, error) of each file
        whose buffered bytes could not be written (they stay buffered). Callers
        say what that means: lost at shutdown, a failed sync, a refused umount."""
        failed = []
        for ino, f in list(self.files.by_ino.items()):
            try:
                await self.flush_dirty(f)  # a clean file's lock may be held by its migration
            except Exception as e:
                failed.append((ino, f.dirty_bytes, e))
        return failed

    async def sync(self) -> list[tuple[int, int, Exception]]:
        """`flush_all`, then make every commit durable (off the trio thread: an
        fsync takes milliseconds). Returns what `flush_all` could not write."""
        failed = await self.flush_all()
        await trio.to_thread.run_sync(self.store.sync)
        return failed

"""First-open migration in the background.

A LEGACY file opened for reading is served straight from its Phase 3 copy (the
same bytes), so the first read costs little more than a plain read, while this
task migrates it (read and chunked on a nice-19 thread, committed on the
writer); later opens are served from the store. A file opened for writing is
migrated before the open returns (operations.py). Threads: docs/concurrency.md.

Files are migrated `jobs` at a time in the order they were opened; a file
migrated alone holds its lock from OpenFiles, so a write waits for it; small
files queued together are migrated as one group (one call on a nice-19
thread, one commit), without their locks: the commit drops a file that a
write migrated meanwhile. A migration starts only once the mount has had no
request for `QUIET` seconds: on two CPUs, chunking and compressing beside an
app that is reading makes its reads wait (measured: reading a fresh tree took
1.4 times as long). Once
started it runs to the end; the app's next pause picks up the queue. The wait
is bounded by `PATIENCE`: an app that never pauses for 50 ms (one polling every
20 ms, say) must not keep its files unmigrated for ever, so a file queued that
long ago is migrated beside it, at most a quarter of the time (BESIDE). 3 s,
not less: reading a 200 MB tree takes about 1.1 s, and a busy second or two
should go by unhindered.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque

import trio
from ferryfs.store import migration
from ferryfs.store.errors import NotFound, OpError
from ferryfs.store.store import Store

from .background import Background
from .counters import Counters
from .handles import OpenFiles
from .writer import Writer

log = logging.getLogger("ferryfs.lazy")

QUIET = 0.05
PATIENCE = 3.0
# Beside an app that does not pause (PATIENCE passed), a migration's work is
# followed by BESIDE times as long without one: migrating at most a quarter of
# the time. Measured: reading a 24,000-file tree through a fresh mount took
# 28.4 s with first-open migrations running beside it without a break, 21.0 s
# with none. Once the app pauses for QUIET, migrations run back to back.
BESIDE = 3.0
# Queued small files migrated together: prepared in one call, committed in one
# transaction (see LazyMigrator._take).
GROUP_FILES = 32
GROUP_BYTES = 1 << 20


class LazyMigrator:
    """Migrates files on first open; `run` in a nursery, `stop` once it has ended."""

    def __init__(
        self,
        store: Store,
        files: OpenFiles,
        counters: Counters,
        writer: Writer | None = None,
        jobs: int = 2,
    ) -> None:
        self.store = store
        self.files = files
        self.counters = counters
        self.writer = writer if writer is not None else Writer()
        self._own_writer = writer is None
        self.jobs = jobs
        self._queue: deque[tuple[int, float]] = deque()  # (inode, when requested)
        self._queued: set[int] = set()
        self._wake = trio.Event()
        self._beside_after = 0.0  # no migration beside a busy app before this (BESIDE)
        self.background = Background(jobs)

    def request(self, ino: int) -> None:
        if ino not in self._queued:
            self._queued.add(ino)
            self._queue.append((ino, time.monotonic()))
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            for _ in range(self.jobs):
                n.start_soon(self._worker)
            task_status.started()

    def stop(self) -> None:
        """Release the threads, once `run` has ended (its nursery cancelled): a
        migration in flight finishes first (it is not abandoned half done)."""
        self.background.close()
        if self._own_writer:
            self.writer.close()

    async def _worker(self) -> None:
        while True:
            while not self._queue:
                if self._wake.is_set():  # one Event for all workers: each wakes
                    self._wake = trio.Event()
                await self._wake.wait()
            await self._quiet()
            if not self._queue:  # another worker took it meanwhile
                continue
            inos = self._take()
            t0 = time.monotonic()
            try:
                if len(inos) == 1:
                    await self._migrate_one(inos[0])
                else:
                    await self.migrate_many(inos)
            finally:
                self._queued.difference_update(inos)
                end = time.monotonic()
                self._beside_after = end + BESIDE * (end - t0)

    def _take(self) -> list[int]:
        """The next files to migrate: the oldest request and, while they are small,
        the ones after it, up to GROUP_FILES or GROUP_BYTES (a bigger file goes
        alone). An app reading a tree of small files opens hundreds a second:
        one thread hop and one synced commit each kept the writer busy, and
        whatever else needed the writer (listing the next directory the app
        opens) waited behind them."""
        inos = [self._queue.popleft()[0]]
        nbytes = self._size(inos[0])
        while self._queue and len(inos) < GROUP_FILES and nbytes < GROUP_BYTES:
            n = self._size(self._queue[0][0])
            if nbytes + n > GROUP_BYTES:
                break
            inos.append(self._queue.popleft()[0])
            nbytes += n
        return inos

    def _size(self, ino: int) -> int:
        try:
            return self.store.getattr(ino).size
        except NotFound:
            return 0

    async def _migrate_one(self, ino: int) -> None:
        try:
            await self.migrate(ino, background=True)
        except NotFound:  # the app deleted it since it opened it: nothing to do
            log.debug("inode %d was deleted before its first-open migration", ino)
        except OpError as e:
            log.warning("cannot migrate inode %d on first open: %s", ino, e)

    async def migrate_many(self, inos: list[int]) -> None:
        """Migrate several first-opened files at low priority: prepared in one
        call on a nice-19 thread, committed in one transaction. Their locks are
        not held: the commit checks each file is still the LEGACY version
        prepared (a write meanwhile migrated it first, under its lock, and it
        is dropped from this batch), so a write never waits for a batch."""
        todo = []
        for ino in inos:
            try:
                node = self.store.getattr(ino)
            except NotFound:
                continue
            if node.is_reg and not node.stored:
                todo.append(ino)
        if not todo:
            return

        def spill(records: dict[bytes, bytes]) -> None:
            self.writer.call(self.store.stage_chunks, records)

        results = await self.background.run(migration.prepare_batch, self.store, todo, spill)
        ms = []
        for ino, m in zip(todo, results, strict=True):
            if isinstance(m, NotFound):
                log.debug("inode %d was deleted before its first-open migration", ino)
            elif isinstance(m, OpError):
                log.warning("cannot migrate inode %d on first open: %s", ino, m)
                with contextlib.suppress(OpError):
                    await self.writer.run(self.store.record_error, ino, str(m))
            elif m is not None:
                ms.append(m)
        if not ms:
            return
        try:
            done = await self.writer.run(self.store.commit_migrations, ms)
        except OpError as e:  # failsafe, read-only, a full disk: they stay LEGACY
            log.warning("cannot migrate %d files on first open: %s", len(ms), e)
            return
        self.counters.migrated_on_open += len(done)

    async def _quiet(self) -> None:
        """Wait for `QUIET` seconds without a request, or until the oldest
        queued file has waited `PATIENCE` seconds and the last migration's
        BESIDE break is over."""
        while self._queue:
            now = time.monotonic()
            idle = now - self.counters.last_request
            waited = now - self._queue[0][1]
            if idle >= QUIET or (waited >= PATIENCE and now >= self._beside_after):
                return
            await trio.sleep(min(QUIET - idle, max(PATIENCE - waited, self._beside_after - now)))

    async def migrate(self, ino: int, background: bool = False) -> None:
        """Migrate `ino` now unless it already is (holding its lock)."""
        async with self.files.lock(ino):
            await self.migrate_locked(ino, background)

    async def migrate_locked(self, ino: int, background: bool = False) -> None:
        """Migrate `ino` unless it already is; the caller holds its lock. With
        `background`, the work runs at low priority (nobody waits for it)."""
        node = self.store.getattr(ino)
        if not node.is_reg or node.stored:
            return

        # A big file's chunks are written as they are made (Store.prepare_migration),
        # by the writer: the preparing thread only hands them over.
        def spill(records: dict[bytes, bytes]) -> None:
            self.writer.call(self.store.stage_chunks, records)

        try:
            if background:
                m = await self.background.run(self.store.prepare_migration, ino, None, spill)
            else:
                m = await trio.to_thread.run_sync(self.store.prepare_migration, ino, None, spill)
        except NotFound:
            raise  # deleted meanwhile: no error to record about it
        except OpError as e:
            await self.writer.run(self.store.record_error, ino, str(e))
            raise
        if m is None:
            return
        if await self.writer.run(self.store.commit_migrations, [m]):
            self.counters.migrated_on_open += 1

"""The search index's catching up, in the background of a mount.

Like the sweep, it works when no foreground request came for `idle_ms`, and a
request pre-empts it: reading and cutting files into words runs on a
low-priority thread (background.py) that polls the pre-emption flag between
files; the commit (tantivy's, then one store transaction) runs at normal
priority: tantivy's on a worker thread, the store's rows on the mount's writer
(docs/concurrency.md). Its wait for a quiet period is bounded by `PATIENCE`,
as first-open migration's is (lazy.py): an app that never pauses for
`idle_ms` must not leave the index behind for ever (each query would read
every file changed since), so after that long it works a `SLICE` beside the
app's requests, which pre-empt it only once the slice is over. What is
left to do is the store's own `index` rows (store/index.py), so a daemon killed at
any moment carries on where it stopped, and a search is exact meanwhile.

Concurrency rules: the Indexer is touched by one worker thread at a time (the
task awaits each step before the next); the trio thread only sets flags.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import partial
from typing import Any

import trio
from ferryfs.store.errors import FerryError
from ferryfs.store.index_writer import Indexer
from ferryfs.store.store import Store

from .background import Background
from .writer import Writer

log = logging.getLogger("ferryfs.indexer")

POLL = 0.25  # seconds between looks at the marks when there is nothing to do
RETRY = 5  # seconds before indexing again after a failure (a full disk, failsafe)
LOW_SPACE = 64 << 20  # free bytes under which a failure is taken for a full disk
# Seconds the index waits for a quiet period before it works anyway, and how long
# it then works before a request pre-empts it: under constant requests it gets
# about SLICE / (PATIENCE + SLICE) of a low-priority thread, plus its commits.
PATIENCE = 3.0
SLICE = 0.25


class IndexTask:
    def __init__(self, store: Store, idle_ms: int, writer: Writer) -> None:
        self.indexer = Indexer(store)
        self.writer = writer
        self.idle = idle_ms / 1000
        self.state = "starting"
        self.last_request = -float("inf")
        self._preempt = threading.Event()
        self.background = Background(1)
        self._stopped = False
        self.impatient = 0  # slices worked beside requests (PATIENCE ran out)

    def poke(self) -> None:
        """A foreground request arrived: give way now."""
        self.last_request = time.monotonic()
        self._preempt.set()

    def status(self) -> dict[str, Any]:
        p = self.indexer.progress
        return {
            "index_state": self.state,
            "index_files": p.files,
            "index_errors": p.errors,
            "index_parked": p.parked,  # left marked for now: read at query time
            "index_impatient": self.impatient,
        }

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.to_thread.run_sync(self._open)
        except (FerryError, OSError, ValueError) as e:
            log.warning("search index unavailable (searches read every file): %s", e)
            self.state = "off"
            return
        while not self._stopped:
            impatient = await self._wait_quiet()
            if self.indexer.writer is None and not await self._restart():
                self.state = "waiting"
                await trio.sleep(RETRY)
                continue
            self.state = "running"
            stop = self._preempt.is_set
            if impatient:
                self.impatient += 1
                stop = partial(self._slice_over, time.monotonic() + SLICE)
            try:
                batch = await self.background.run(self.indexer.prepare, stop)
                if batch is None:
                    self.state = "idle"
                    await trio.sleep(POLL)
                    continue
                await trio.to_thread.run_sync(self.indexer.commit_index, batch)
                await self.writer.run(self.indexer.commit_rows, batch)
            except (FerryError, OSError, ValueError) as e:
                # The disk is full, or failsafe: the marks stay for the next try.
                # tantivy kills its writer on an I/O error, so a new one is started
                # before that try (the batch's documents were never committed).
                log.warning("indexing: %s%s", e, self._space_note())
                self.state = "waiting"
                await trio.to_thread.run_sync(self.indexer.close)
                await trio.sleep(RETRY)

    async def _restart(self) -> bool:
        """A new tantivy writer after one was killed; False if it cannot start yet."""
        try:
            await trio.to_thread.run_sync(self._open)
            return True
        except (FerryError, OSError, ValueError) as e:
            log.info("search index writer not started again yet: %s", e)
            return False

    def _space_note(self) -> str:
        # tantivy says "io::Error most likely", not which: name a full disk.
        try:
            st = os.statvfs(self.indexer.path)
        except OSError:
            return ""
        if st.f_bavail * st.f_frsize < LOW_SPACE:
            return " (no space left for the store: indexing waits for space)"
        return ""

    def _open(self) -> None:
        # Starting an index over marks every file, a transaction per few thousand
        # rows: permitted beside the writer, as the first rollback point's walk is,
        # rather than holding every foreground write (docs/concurrency.md).
        with self.writer.permit():
            self.indexer.open()

    async def _wait_quiet(self) -> bool:
        """Wait for `idle` seconds without a request, or `PATIENCE` seconds in all;
        True if it was the patience that ran out."""
        since = time.monotonic()
        while True:
            now = time.monotonic()
            quiet_for = now - self.last_request
            if quiet_for >= self.idle:
                self._preempt.clear()
                return False
            if now - since >= PATIENCE:
                return True
            self.state = "waiting"
            await trio.sleep(max(0.005, min(self.idle - quiet_for, PATIENCE - (now - since))))

    def _slice_over(self, until: float) -> bool:
        """The pre-emption test of a slice worked beside requests: none before `until`."""
        return self._preempt.is_set() and time.monotonic() >= until

    def close(self) -> None:
        """After the task ended: let tantivy's merges finish, stop the thread."""
        self._stopped = True
        self.background.close()
        self.indexer.close()

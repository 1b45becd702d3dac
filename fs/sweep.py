"""The idle sweep: migrates every file nobody has opened yet, in the background.

It runs when no foreground request came for `idle_ms` and the CPUs kept busy by
other processes are under `max_load`; it works in batches of `batch` files
with `batch_delay_ms` between them, on `jobs` low-priority threads
(background.py). Any foreground request pre-empts it: the workers poll a flag
between chunks and give up the file they are on (nothing of it was committed),
and the sweep waits for the next quiet period. Its progress is the store's own
state (a file is LEGACY or MIGRATED), so a daemon killed at any moment carries
on where it stopped.

What the app does meanwhile is not an error: a file deleted or rewritten while
its batch was prepared is dropped from the batch and the rest commit. A full
disk is not the files' error either: a batch that does not fit commits what
fits, and the rest wait for space (state "waiting for space", looked at again
every SPACE_RETRY seconds). `cancel` is for the rest of the mount's life:
`resume` after it is refused.

Threads (docs/concurrency.md): the todo list and counters are touched only on
the trio thread; the nice-19 threads (background.py) read, chunk and compress
(`migration.prepare_batch`, several small files a call) and write nothing;
every transaction, listing directories and committing each prepared batch,
runs on the mount's writer.
A committer task hands a batch to the writer while the next is being prepared.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio
from ferryfs.store import migration, recompress, upkeep
from ferryfs.store.errors import NoSpace, NotFound, OpError
from ferryfs.store.migration import Migration
from ferryfs.store.records import ROOT_INO, Inode
from ferryfs.store.store import Store

from .background import Background
from .counters import RecompressProgress
from .load import OtherLoad
from .sweep_config import SweepConfig
from .writer import Writer

log = logging.getLogger("ferryfs.sweep")

# Plain bytes at which a batch stops taking files (see _next_batch).
BATCH_BYTES = 64 << 20
# A worker's task: small files go to the nice-19 threads this many at a time (or
# this many bytes; a bigger file alone). One hop to a thread per file cost about
# as much as migrating a small file (a thread hop is most of a millisecond here).
GROUP_FILES = 16
GROUP_BYTES = 1 << 20
# Seconds between looks for space when files wait for the store's disk to have room.
SPACE_RETRY = 30.0
# Once done, how often to look whether the store changed (upkeep to do again).
RECHECK_CHANGES = 1.0


def _take_group(queue: deque[tuple[int, int]]) -> list[tuple[int, int]]:
    """The next worker task from `queue` of (inode, size): see GROUP_FILES."""
    group = [queue.popleft()]
    nbytes = group[0][1]
    while queue and len(group) < GROUP_FILES and nbytes + queue[0][1] <= GROUP_BYTES:
        group.append(queue.popleft())
        nbytes += group[-1][1]
    return group


class SweepCancelled(OpError):
    """`resume` of a cancelled sweep: refused (ECANCELED), see control_cmd."""

    errno = errno.ECANCELED


@dataclass
class SweepStats:
    files: int = 0
    bytes: int = 0
    batches: int = 0
    errors: int = 0
    idle_rounds: int = 0  # times the idle upkeep ran out of work (status: it has settled)
    started: float = field(default_factory=time.monotonic)
    window: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def rate(self) -> float:
        """Bytes per second over the recent batches."""
        if len(self.window) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.window[0], self.window[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


class Sweep:
    """Background migration of a mount's LEGACY files; see the module docstring."""

    def __init__(self, store: Store, config: SweepConfig, writer: Writer | None = None) -> None:
        self.store = store
        self.cfg = config
        self.writer = writer if writer is not None else Writer()
        self._own_writer = writer is None
        self.state = "waiting"
        self.stats = SweepStats()
        self.recompress = RecompressProgress()  # the idle cold recompression's, for status
        # No foreground request has come yet: the first quiet period is now.
        self.last_request = -float("inf")
        self._preempt = threading.Event()
        self._paused = False
        self._cancelled = False
        self._wake = trio.Event()
        self._idle = trio.Event()  # set while no batch is being prepared or committed
        self._idle.set()
        self._inflight = 0  # batches being prepared or committed
        # Unbuffered: a prepared batch waits for the commit before it, so at most two
        # batches are held in memory, and preparing one overlaps committing the other.
        self._to_commit, self._commits = trio.open_memory_channel[tuple[list[Migration], float]](0)
        self._load = OtherLoad()
        self._failed: set[int] = set()
        self._no_space: set[int] = set()  # files waiting for the store's disk to have room
        self._listing_waits = False  # listing directories met a full disk, too
        self.space_retry = SPACE_RETRY
        self._todo: array[int] = array("Q")
        self._sizes: array[int] = array("Q")  # of the files in _todo, index for index
        self._pending_bytes: int | None = None  # unknown until the first scan
        # Directories still to visit for listing, breadth first; None before the walk.
        self._listing: deque[int] | None = None
        # Files prepared by a batch that was pre-empted: committed with the next batch,
        # not while the foreground request that pre-empted it is still being answered.
        self._prepared: list[Migration] = []
        # Chunking and compressing at nice 19 and idle I/O priority (background.py).
        self.background = Background(config.jobs)

    # -- called by the adapter and the control channel --------------------------------

    def _spill(self, records: dict[bytes, bytes]) -> None:
        """A big file's chunk records, handed to the writer from the nice-19 thread
        preparing it (docs/concurrency.md)."""
        self.writer.call(self.store.stage_chunks, records)

    def poke(self) -> None:
        """A foreground request arrived: give way now."""
        self.last_request = time.monotonic()
        self._preempt.set()

    async def pause(self) -> None:
        self._paused = True
        self._preempt.set()
        await self._idle.wait()
        if self.state not in ("done", "cancelled"):
            self.state = "paused"

    async def resume(self) -> None:
        if self._cancelled:
            # Cancel is for the rest of this mount's life (control_cmd says so):
            # a resume that silently did nothing would look like it worked.
            raise SweepCancelled("the sweep was cancelled for the life of this mount")
        self._paused = False
        if self.state == "paused":
            self.state = "waiting"
        self._wake.set()

    async def cancel(self) -> None:
        self._cancelled = True
        self._preempt.set()
        await self._idle.wait()
        if self.state != "done":
            self.state = "cancelled"
        self._wake.set()

    def status(self) -> dict[str, Any]:
        rate = self.stats.rate()
        left = self._pending_bytes
        if self.state == "cancelled":
            eta: float | None = None  # it will not finish: no time to show
        elif left == 0 or self.state == "done":
            eta = 0.0
        elif left is None or rate <= 0:
            eta = None
        else:
            eta = left / rate
        return {
            "sweep_state": self.state,
            "sweep_files": self.stats.files,
            "sweep_bytes": self.stats.bytes,
            "sweep_batches": self.stats.batches,
            "sweep_errors": self.stats.errors,
            "sweep_idle_rounds": self.stats.idle_rounds,
            "sweep_waiting_for_space": len(self._no_space),
            "sweep_rate": round(rate, 1),
            "sweep_eta_seconds": None if eta is None else round(eta, 1),
            "other_load": round(self._load.value, 2),
            # Free database pages given back to the filesystem (store/reclaim.py).
            "reclaimed_bytes": getattr(self.store.backend, "given_back", 0),
            **self.recompress.status(),
        }

    # -- the task ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(self._committer, self._commits)
            task_status.started()
            async with self._to_commit:  # closed when the loop ends: the committer ends
                await self._loop()

    def stop(self) -> None:
        """Release the threads, once `run` has ended (a file being prepared is
        finished first, and dropped)."""
        self.background.close()
        if self._own_writer:
            self.writer.close()

    async def _loop(self) -> None:
        while True:
            if self._cancelled:
                self.state = "cancelled"
                return
            if self._paused:
                self.state = "paused"
                await self._wait_wake()
                continue
            if not await self._wait_quiet():
                continue
            self.state = "running"
            more = await self._import_some()
            if not more:
                batch = await self._next_batch()
                if not batch and self._prepared:
                    await self._hand_over(time.monotonic())  # what a pre-empted batch prepared
                    continue
                if not batch:
                    await self._idle.wait()  # what is committing is no longer LEGACY
                    if await self._refill():
                        continue
                    if self._no_space or self._listing_waits:
                        await self._wait_space()
                        continue
                    if await self._upkeep():
                        continue
                    self.stats.idle_rounds += 1
                    self.state = "done"
                    log.info(
                        "sweep done: %d files, %.1f MB migrated in the background, %d errors",
                        self.stats.files,
                        self.stats.bytes / 1e6,
                        self.stats.errors,
                    )
                    await self._rest()
                    if self.state == "done":
                        self.state = "waiting"
                    continue
                await self._run_batch(batch)
            await trio.sleep(self.cfg.batch_delay_ms / 1000)

    async def _upkeep(self) -> bool:
        """Nothing left to migrate: idle work on chunk records (store/upkeep.py: packs,
        the dictionary, cold recompression), pre-empted as a batch is. True if any."""
        self.state = "upkeep"  # what status shows meanwhile
        host = upkeep.OnWriter(self.store, self.writer.call)
        self.recompress.begin()
        try:
            # (Positional: Background.run passes no keywords. cold_days, now_ns, progress.)
            return await self.background.run(
                upkeep.idle,
                host,
                self._preempt.is_set,
                recompress.COLD_DAYS,
                None,
                self.recompress.report,
            )
        finally:
            self.recompress.end()

    async def _rest(self) -> None:
        """Done: wait for a resume. Meanwhile, whenever the store changed (deletes and
        writes through the mount leave dead packs and free pages), do the idle upkeep
        again once the mount is quiet, then rest again."""
        self._wake = trio.Event()
        seen = self.store.commits
        while not self._wake.is_set():
            with trio.move_on_after(RECHECK_CHANGES):
                await self._wake.wait()
            if self._wake.is_set() or self._paused or self._cancelled:
                continue  # paused: as before, the state stays until resumed
            if self.store.commits == seen:
                continue
            while await self._wait_quiet() and await self._upkeep():
                pass
            if self._paused or self._cancelled:
                continue
            self.stats.idle_rounds += 1
            self.state = "done"
            seen = self.store.commits

    async def _wait_wake(self) -> None:
        self._wake = trio.Event()
        await self._wake.wait()

    async def _wait_space(self) -> None:
        """Everything else is done; files wait for space: look again after
        `space_retry` seconds (or at resume), with them back in the todo list."""
        self.state = "waiting for space"
        self._wake = trio.Event()
        with trio.move_on_after(self.space_retry):
            await self._wake.wait()
        self._no_space.clear()
        self._listing_waits = False

    async def _wait_quiet(self) -> bool:
        """Wait until the mount is idle and the machine is not busy. False to re-check state."""
        idle = self.cfg.idle_ms / 1000
        while not (self._paused or self._cancelled):
            quiet_for = time.monotonic() - self.last_request
            if quiet_for >= idle:
                if self._load.sample() < self.cfg.max_load:
                    self._preempt.clear()
                    return True
                self.state = "waiting"
                await trio.sleep(0.5)
                continue
            self.state = "waiting"
            await trio.sleep(max(0.005, idle - quiet_for))
        return False

    async def _import_some(self) -> bool:
        """List UNLISTED directories, a transaction at a time on the writer, until
        none is left or a foreground request comes. True if there may be more."""
        if self._listing is None:
            self._listing = deque([ROOT_INO])
        if self._listing_waits:
            return False
        while self._listing and not self._preempt.is_set():
            try:
                await self.writer.run(self.store.import_step, self._listing, 1024)
            except NoSpace as e:  # the queue is as it was: listing goes on at the next look
                log.warning("sweep: cannot list directories: %s; waiting for space", e)
                self._listing_waits = True
                return False
            except OpError as e:  # failsafe or read-only: the rest stays unlisted
                log.warning("sweep: cannot list directories: %s", e)
                self.stats.errors += 1
                self._listing.clear()
                return False
        return bool(self._listing)

    async def _refill(self) -> bool:
        """Build the todo list from the store. True if there is work."""
        # Errors of files deleted or migrated since (by a read, a write, a truncation)
        # no longer apply: status stops counting them.
        with contextlib.suppress(OpError):
            await self.writer.run(self.store.prune_errors)
        self._todo, self._sizes = await trio.to_thread.run_sync(self._scan)
        return bool(self._todo)

    def _scan(self) -> tuple[array[int], array[int]]:
        items = []
        pending = 0
        skip = self._failed | self._no_space
        for node in self.store.iter_inodes():
            # nlink 0: deleted, kept only while the kernel still knows it; not worth migrating.
            if node.is_reg and not node.stored and node.nlink > 0 and node.ino not in skip:
                items.append((node.mtime_ns, node.size, node.ino))
                pending += node.size
        order = self.cfg.order
        if order == "recent":
            items.sort(key=lambda x: -x[0])
        elif order == "oldest":
            items.sort(key=lambda x: x[0])
        elif order == "largest":
            items.sort(key=lambda x: -x[1])
        elif order == "smallest":
            items.sort(key=lambda x: x[1])
        self._pending_bytes = pending
        # Popped from the end, so keep the first to do last.
        items.reverse()
        return array("Q", [i for _, _, i in items]), array("Q", [n for _, n, _ in items])

    async def _next_batch(self) -> list[tuple[int, int]]:
        """Up to `batch` files (inode, size), taken until their sizes reach
        BATCH_BYTES: a prepared file is held in memory until its batch commits, and
        64 large attachments would be gigabytes. (One large file still goes, in a
        batch that ends with it.)"""
        out: list[tuple[int, int]] = []
        nbytes = 0
        while self._todo and len(out) < self.cfg.batch and (not out or nbytes < BATCH_BYTES):
            out.append((self._todo.pop(), self._sizes.pop()))
            nbytes += out[-1][1]
        return out

    def _commit(self, ms: list[Migration]) -> tuple[list[Inode], list[Migration]]:
        """(committed, not committed for want of space). A batch that does not fit
        is committed file by file, smallest first, so that what fits is migrated."""
        try:
            return self.store.commit_migrations(ms), []
        except NoSpace:
            if len(ms) == 1:
                return [], ms
        done: list[Inode] = []
        full: list[Migration] = []
        for m in sorted(ms, key=lambda m: m.size):
            try:
                done += self.store.commit_migrations([m])
            except NoSpace:
                full.append(m)
        return done, full

    def _wait_for_space(self, inos: list[int]) -> None:
        """The store's disk is full: these files wait (out of the todo list) until
        the sweep next looks for space (SPACE_RETRY); not an error of theirs."""
        if not self._no_space:
            log.warning(
                "sweep: no space left for the store; %d files wait for space (retried every %g s)",
                len(inos),
                self.space_retry,
            )
        self._no_space.update(inos)

    async def _give_up(self, inos: list[int], e: OpError) -> None:
        """Skip these files until the next mount, and say why in status and the log."""
        self._failed.update(inos)
        self.stats.errors += len(inos)
        for ino in inos:
            log.warning("sweep: cannot migrate inode %d: %s", ino, e)
        await self.writer.run(self._record_errors, inos, str(e))

    def _record_errors(self, inos: list[int], message: str) -> None:
        for ino in inos:
            # On a full disk the error cannot be recorded either: the count stays.
            with contextlib.suppress(OpError):
                self.store.record_error(ino, message)

    def _hold(self) -> None:
        if self._inflight == 0:
            self._idle = trio.Event()
        self._inflight += 1

    def _release(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def _hand_over(self, t0: float) -> None:
        """Give the prepared files to the committer, which releases this hold."""
        ms, self._prepared = self._prepared, []
        self._hold()
        try:
            await self._to_commit.send((ms, t0))
        except BaseException:
            self._release()
            raise

    async def _run_batch(self, batch: list[tuple[int, int]]) -> None:
        """Prepare `batch` on the background threads and hand it, with any files
        prepared before, to the committer."""
        self._hold()
        t0 = time.monotonic()
        done: list[Migration] = []
        gave_way: list[tuple[int, int]] = []
        try:
            queue = deque(batch)

            async def worker() -> None:
                while queue:
                    group = _take_group(queue)
                    if self._preempt.is_set():
                        gave_way.extend(group)
                        continue
                    results = await self.background.run(
                        migration.prepare_batch,
                        self.store,
                        [ino for ino, _ in group],
                        self._spill,  # a big file's chunks, as they are made
                        self._preempt.is_set,
                    )
                    gave_way.extend(group[len(results) :])  # pre-empted: not prepared
                    for (ino, _), m in zip(group, results, strict=False):
                        if isinstance(m, NotFound):  # the app deleted it: not an error
                            continue
                        if isinstance(m, NoSpace):  # staging its chunks: it waits for space
                            self._wait_for_space([ino])
                        elif isinstance(m, OpError):
                            await self._give_up([ino], m)
                        elif m is not None:
                            done.append(m)

            async with trio.open_nursery() as n:
                for _ in range(max(1, self.cfg.jobs)):
                    n.start_soon(worker)
            self._prepared += done
            # Pre-empted: the request that did it is still being answered, and an
            # fdatasync beside it would make it wait for the disk. The files prepared
            # so far go with the next batch, after the next quiet period.
            if not gave_way and self._prepared:
                await self._hand_over(t0)
        finally:
            for ino, size in reversed(gave_way):
                self._todo.append(ino)
                self._sizes.append(size)
            self._release()
        if gave_way:
            log.info(
                "sweep: gave way on %d files (%d prepared held back); %d files left",
                len(gave_way),
                len(self._prepared),
                len(self._todo),
            )

    async def _committer(
        self, batches: trio.MemoryReceiveChannel[tuple[list[Migration], float]]
    ) -> None:
        """Commit prepared batches in order, one transaction each, on the writer
        (its fdatasync takes milliseconds, and the trio thread must go on answering
        requests), while the loop prepares the next batch."""
        async for ms, t0 in batches:
            committed: list[Inode] = []
            try:
                committed, full = await self.writer.run(self._commit, ms)
                if full:
                    self._wait_for_space([m.ino for m in full])
            except OpError as e:  # failsafe or read-only: they stay LEGACY
                await self._give_up([m.ino for m in ms], e)
            finally:
                self._release()
            nbytes = sum(x.size for x in committed)
            self.stats.files += len(committed)
            self.stats.bytes += nbytes
            self.stats.batches += 1
            self._pending_bytes = max(0, (self._pending_bytes or 0) - nbytes)
            self.stats.window.append((time.monotonic(), self.stats.bytes))
            log.info(
                "sweep: batch %d: %d files, %.1f MB in %.2f s; %d files left",
                self.stats.batches,
                len(committed),
                nbytes / 1e6,
                time.monotonic() - t0,
                len(self._todo),
            )

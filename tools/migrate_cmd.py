"""Migrate a whole Phase 3 tree into a store, with no mount (interruptible, resumable).

Files are read, chunked, hashed and compressed by `--jobs` threads (blake3,
zstandard and the chunker release the GIL); this thread commits them in groups,
each group one transaction, so an interrupted run leaves every file LEGACY or
MIGRATED and the next run carries on with the LEGACY ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ferryfs.store import dictionaries, index_writer, migration, points, upkeep
from ferryfs.store.errors import OpError, SourceError, UsageError
from ferryfs.store.kv import LmdbBackend
from ferryfs.store.migration import Migration
from ferryfs.store.store import Store

from . import layout
from .paths import default_store
from .progress import Bar

GROUP_BYTES = 32 << 20
# Files per commit: a transaction's dirty pages are memory, and more files touch
# more pages the bigger the store is.
GROUP_FILES = 256
GROUP_SECONDS = 0.5
# A worker task: this many small files, or this many bytes (see `_tasks`).
TASK_FILES = 64
TASK_BYTES = 1 << 20
# Processes cutting text into words for the index beside the migration (see
# Indexer.open): one took a sixth off `migrate` of 24,000 small files on 2 CPUs.
INDEX_WORKERS = 1
# Bytes of files per batch of the indexer (see Indexer.batch_bytes): 8 MB took
# 55 MB off migrate's peak RSS on the sample tree, at the same speed.
INDEX_BATCH_BYTES = 8 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the Phase 3 tree")
    p.add_argument("--store", help="the store directory (default: SRC.ferry beside SRC)")
    p.add_argument(
        "--jobs", type=int, default=default_jobs(), help="reader threads (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--no-index",
        action="store_true",
        help="leave the search index to the sweep of the next mount (search stays exact)",
    )


def default_jobs() -> int:
    """Two reader threads per CPU: on a cold page cache a small file's read is a
    wait on the disk, not work (measured on 24,000 files and 2 CPUs, 4 threads
    beat 2 by a tenth; 8 no more than 4, with more memory)."""
    return min(16, 2 * (os.cpu_count() or 1))


def run(args: argparse.Namespace) -> int:
    store_dir = args.store or default_store(args.src)
    layout.check(args.src, store_dir)  # first: a dead ferryfs mount is no directory either
    if not os.path.isdir(args.src):
        raise UsageError(f"source {args.src} is not a directory")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    t0 = time.monotonic()
    with Store.open(store_dir, source=args.src, create=True) as store:
        check_source(store, args.src)
        points.ensure_first_point(store)
        store.import_all()
        if args.no_index:
            result = migrate_all(store, args.jobs)
            result["indexed"] = 0
        else:
            result = migrate_indexing(store, args.jobs)
        if result["files"] and _room_for_a_copy(store):
            # The store's last write: its database rewritten with every page full and
            # none free (a bulk load leaves its tables' pages 55-70% full; kv.py).
            upkeep.shrink_file(store)
    took = time.monotonic() - t0
    if args.json:
        import json

        print(json.dumps({**result, "seconds": round(took, 3)}))
    else:
        mb = result["bytes"] / 1e6
        print(
            f"migrated {result['files']} files ({mb:.1f} MB) in {took:.1f} s"
            f" ({mb / max(took, 1e-9):.1f} MB/s); {result['errors']} errors; store {store_dir}"
        )
    return 1 if result["errors"] else 0


def _room_for_a_copy(store: Store) -> bool:
    """Whether the filesystem holding the store has room for a second copy of its
    database (the rewrite writes one beside it, then renames it over the old), with
    a quarter to spare: else the store is left as it is, whole and correct."""
    if not isinstance(store.backend, LmdbBackend):
        return False
    have = store.backend.disk_bytes()
    return shutil.disk_usage(store.backend.path).free > have + have // 4 + (64 << 20)


def migrate_indexing(store: Store, jobs: int) -> dict[str, int]:
    """`migrate_all` with the search index built beside it: a thread reads the
    files from Phase 3 (LEGACY or migrated unchanged, the same bytes) and hands
    them to a worker process that cuts them into words (which holds an
    interpreter lock, while chunking, hashing and compressing mostly do not),
    then to tantivy's own thread. Migrated files come back marked; the last
    pass mostly drops their marks."""
    ix = index_writer.Indexer(store)
    ix.phase3_first = True
    ix.batch_bytes = INDEX_BATCH_BYTES
    ix.open(workers=INDEX_WORKERS)
    try:
        halt = threading.Event()  # ^C or a failure: the thread stops too
        ended = threading.Event()  # (not Thread.join: a ^C inside it can leave it unsure)

        def index() -> None:
            try:
                ix.catch_up(halt.is_set)
            finally:
                ended.set()

        worker = threading.Thread(target=index, name="ferryfs-index")
        try:
            _start_whole(worker)
            result = migrate_all(store, jobs)
            ended.wait()  # (a ^C here too: the thread must end before the store closes)
        except BaseException:
            halt.set()
            if worker.ident is not None:  # started (whole: see _start_whole)
                _wait_regardless(ended)
            raise
        result["indexed"] = ix.catch_up().files
        return result
    finally:
        ix.close()


def _start_whole(t: threading.Thread) -> None:
    """Start `t` with ^C held back until it has started: a ^C inside start() could
    leave a thread running that the caller does not know of (the pool's resource
    tracker is a child process before this thread is, so a ^C aimed at the first
    child can come here)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        t.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _wait_regardless(ended: threading.Event) -> None:
    """Wait for the thread told to stop to end, whatever ^C comes meanwhile: it
    reads the store, which is closed once this returns."""
    while True:
        try:
            ended.wait()
            return
        except KeyboardInterrupt:
            continue


def check_source(store: Store, src: str) -> None:
    recorded = store.source_path()
    if recorded is not None and os.path.abspath(src) != recorded:
        raise UsageError(f"store belongs to {recorded}, not {os.path.abspath(src)}")


def _tasks(store: Store) -> Iterator[list[int]]:
    """The LEGACY files in path order, cut into worker tasks: up to TASK_FILES
    files or TASK_BYTES bytes each (a bigger file is a task alone). One file per
    task made the wait on its future, the pool's queue and the GIL hand-offs a
    fixed cost per file of the same order as a small file's own work."""
    task: list[int] = []
    size = 0
    for ino, n in migration.legacy_files_sized(store):
        if task and (len(task) >= TASK_FILES or size + n > TASK_BYTES):
            yield task
            task, size = [], 0
        task.append(ino)
        size += n
    if task:
        yield task


def migrate_all(store: Store, jobs: int) -> dict[str, int]:
    """Migrate every LEGACY file of `store`. Returns files, bytes and errors counts."""
    total = store.stats().bytes_legacy
    done = {"files": 0, "bytes": 0, "errors": 0}
    group: list[Migration] = []
    group_bytes = 0
    last = time.monotonic()
    # The store's first dictionary, from this run's own text chunks once there are
    # enough: the text chunks after those are compressed with it (dictionaries.py).
    learner = dictionaries.Learner(store)

    def flush() -> None:
        nonlocal group, group_bytes, last
        if group:
            learner.feed(r for m in group for r in m.records.values())
            for node in store.commit_migrations(group):
                done["files"] += 1
                done["bytes"] += node.size
        group, group_bytes, last = [], 0, time.monotonic()

    # A big file's chunks are written as they are made, from the pool's threads (one
    # process: LMDB takes its write transactions one at a time).
    spill = store.stage_chunks

    def submit(inos: list[int]) -> Future[list[Migration | OpError | None]]:
        return pool.submit(migration.prepare_batch, store, inos, spill)

    with ThreadPoolExecutor(jobs) as pool, Bar("migrating", total) as bar:
        pending: deque[tuple[list[int], Future[list[Migration | OpError | None]]]] = deque()
        tasks = _tasks(store)
        for inos in tasks:
            pending.append((inos, submit(inos)))
            if len(pending) >= jobs * 4:
                break
        while pending:
            inos, fut = pending.popleft()
            nxt = next(tasks, None)
            if nxt is not None:
                pending.append((nxt, submit(nxt)))
            for ino, m in zip(inos, fut.result(), strict=True):
                if isinstance(m, OpError) and not isinstance(m, SourceError):
                    raise m  # (as it was raised before files were prepared in batches)
                if isinstance(m, SourceError):
                    store.record_error(ino, str(m))
                    done["errors"] += 1
                    continue
                if m is None:
                    continue
                group.append(m)
                group_bytes += m.size
                bar.advance(m.size)
                if (
                    group_bytes >= GROUP_BYTES
                    or len(group) >= GROUP_FILES
                    or time.monotonic() - last > GROUP_SECONDS
                ):
                    flush()
        flush()
    return done

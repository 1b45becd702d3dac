"""The mount daemon: opens the Phase 3 tree (before the mount shadows it), the
store, mounts, serves requests on one trio loop, and stops cleanly on SIGTERM
or `ferryfs umount` (flush, close the store, unmount).

Started by `ferryfs mount` as `python -m ferryfs.fs.daemon`, it reports
"ready" or one error line on the pipe given by `--ready-fd`. On an internal
crash it leaves the mount in place for the operator (as borg does): an empty
mountpoint is worse than a dead one, since a script might rsync into it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio
from ferryfs.store import points
from ferryfs.store.errors import FerryError
from ferryfs.store.phase3 import Phase3Tree
from ferryfs.store.store import Store
from ferryfs.store.storedir import LogRotation

from .control import Command, Control
from .counters import Counters
from .handles import OpenFiles
from .indexer import IndexTask
from .mountinfo import mount_entries
from .operations import Operations
from .sweep import Sweep
from .sweep_config import SweepConfig, add_sweep_arguments, sweep_config
from .writeback import WriteBack
from .writer import Writer

log = logging.getLogger("ferryfs.daemon")


def mount_options(allow_other: bool) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=ferryfs", "subtype=ferryfs", "nodev"}
    if allow_other:
        opts.add("allow_other")
    return opts


async def serve(
    ops: Operations,
    ready: int | None,
    sweep: Sweep | None,
    mnt: str,
    indexer: IndexTask | None = None,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, ops, sweep)
        await nursery.start(ops.lazy.run)
        if sweep is not None:
            await nursery.start(sweep.run)
        if indexer is not None:
            await nursery.start(indexer.run)
        if ready is not None:
            os.write(ready, b"ready\n")
            os.close(ready)
        nursery.start_soon(_record_point, ops.store, ops.writer)
        nursery.start_soon(_tune_readahead, mnt)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _tune_readahead(mnt: str) -> None:
    # After the kernel's INIT is answered: the answer sets read-ahead to at most
    # what the kernel offered (128 KiB), undoing an earlier raise.
    for _ in range(50):
        await trio.sleep(0.05)
        if raise_readahead(mnt):
            return
    log.info("kernel read-ahead left at 128 KiB (raising it needs root)")


async def _record_point(store: Store, writer: Writer) -> None:
    """Record the first rollback point behind the mount, not before it: the walk
    of a big tree takes seconds, and the mount never changes Phase 3, so what it
    records is the same whenever it runs. The walk writes a transaction per few
    thousand rows from its own thread, beside the writer: the one exception in
    docs/concurrency.md (on the writer, it would hold up every write for the walk)."""

    def record() -> points.Point:
        with writer.permit():
            return points.ensure_first_point(store)

    try:
        p = await trio.to_thread.run_sync(record)
        log.info("rollback point %d: %d entries of the Phase 3 tree recorded", p.id, p.entries)
    except FerryError as e:
        log.error("could not record a rollback point: %s", e)


async def _signals(ops: Operations, sweep: Sweep | None) -> None:
    """Stop on SIGTERM/SIGINT: write out what is buffered, then unmount. A signal
    cannot be refused (the machine may be shutting down), so bytes that cannot be
    written are lost: each such file is logged as an error, and `ferryfs umount`
    asks first (`open` report) so that it never gets here with any unless forced."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("stopping: flushing open files")
            if sweep is not None:
                await sweep.cancel()
            for ino, n, e in await ops.writeback.flush_all():
                msg = f"lost {n} buffered bytes of inode {ino} at shutdown: could not write: {e}"
                log.error("%s", msg)
                ops.counters.errors.append(msg)
            pyfuse3.terminate()
            return


# At most this many files in an `open` report: an xattr value holds 64 KiB.
REPORT_FILES = 200


async def open_report(writeback: WriteBack) -> dict[str, Any]:
    """Write out every buffered file it can, then say which files are open (by inode:
    the daemon does not keep names) and which hold bytes that could not be saved."""
    failed = {ino: e for ino, _n, e in await writeback.flush_all()}
    files: list[dict[str, Any]] = [
        {
            "ino": ino,
            "handles": f.handles,
            "unsaved": f.dirty_bytes,
            "error": str(failed[ino]) if ino in failed else None,
        }
        for ino, f in writeback.files.by_ino.items()
        if f.handles or f.spans
    ]
    files.sort(key=lambda d: -d["unsaved"])  # the ones that matter most survive the cut
    return {
        "handles": len(writeback.files.by_fh),
        "unsaved": sum(d["unsaved"] for d in files),
        "files": files[:REPORT_FILES],
        "more": max(0, len(files) - REPORT_FILES),
    }


READ_AHEAD_KB = 1024


def raise_readahead(mnt: str, kb: int = READ_AHEAD_KB) -> bool:
    """Let the kernel read ahead `kb` KiB on this mount, not the 128 KiB every FUSE
    mount starts with (and init cannot raise): reads then come 1 MiB at a time, an
    eighth of the round trips, and the read-ahead threads get work to share. Needs
    root (a sysfs knob of the mount's bdi); False if it could not be set."""
    # Not realpath(mnt): that would stat the mount itself, before anyone serves it.
    mnt = os.path.abspath(mnt)
    parent, name = os.path.split(mnt)
    target = os.fsencode(os.path.join(os.path.realpath(parent), name))
    try:
        ours = [m for m in mount_entries() if m.point == target and m.fstype == "fuse.ferryfs"]
        if not ours:
            return False
        dev = ours[-1].dev_name  # the last one is the newest: ours
        knob = f"/sys/class/bdi/{dev}/read_ahead_kb"
        with open(knob, "w") as f:
            f.write(str(kb))
        with open(knob) as f:
            return f.read().strip() == str(kb)
    except (OSError, IndexError, ValueError):
        return False


def run(
    src: str,
    mnt: str,
    store_dir: str,
    allow_other: bool = False,
    ready: int | None = None,
    sweep_config: SweepConfig | None = None,
) -> int:
    """Mount and serve until unmounted. Returns the exit code."""
    try:
        tree = Phase3Tree.open(src)
        store = Store.open(store_dir, source=src, create=True, keep_orphans=True, tree=tree)
    except FerryError as e:
        _fail(ready, str(e))
        return e.exit_code
    rotation = _rotate_log(store)
    writer = Writer()
    writer.watch(store)  # from here on, every write transaction runs on the writer
    writer.share(store)  # and those that reach it together share one commit
    counters = Counters()
    writeback = WriteBack(store, OpenFiles(), writer)
    sweep = Sweep(store, sweep_config, writer) if sweep_config is not None else None
    # The search index catches up in idle time, as the sweep does (and not without it).
    indexer = IndexTask(store, sweep_config.idle_ms, writer) if sweep_config is not None else None
    commands: dict[bytes, Command] = {b"sync": lambda: _sync(writeback)}
    status_extra: Callable[[], dict[str, Any]] = lambda: {"sweep_state": "off"}  # noqa: E731
    on_request: Callable[[], None] | None = None
    if sweep is not None and indexer is not None:
        sw, ix = sweep, indexer
        commands.update({b"pause": sw.pause, b"resume": sw.resume, b"cancel": sw.cancel})

        def poke() -> None:
            sw.poke()
            ix.poke()

        def both_status() -> dict[str, Any]:
            return {**sw.status(), **ix.status()}

        on_request, status_extra = poke, both_status
    control = Control(
        store,
        store_dir,
        counters,
        commands=commands,
        reports={b"open": lambda: open_report(writeback)},
        status_extra=status_extra,
    )
    ops = Operations(
        store,
        os.getuid(),
        writer=writer,
        writeback=writeback,
        counters=counters,
        control=control,
        on_request=on_request,
    )
    why = _mount(ops, mnt, mount_options(allow_other))
    if why is not None:
        store.close()
        _fail(ready, f"cannot mount on {mnt}: {why}")
        return 1
    # Request handlers wait for the GIL whenever a migration thread holds it; at
    # the default 5 ms switch interval that made a first read 12x slower.
    sys.setswitchinterval(0.0002)
    log.info("mounted %s on %s (store %s, pid %d)", src, mnt, store_dir, os.getpid())
    clean = False
    try:
        trio.run(serve, ops, ready, sweep, mnt, indexer)
        clean = True
    finally:
        try:
            ops.lazy.stop()
            if sweep is not None:
                sweep.stop()
            writer.close()  # the last transaction handed over is committed
            store.sync()
        finally:
            if indexer is not None:
                indexer.close()
            store.close()
            pyfuse3.close(unmount=clean)
    log.info("unmounted %s", mnt)
    if rotation is not None:
        rotation.stop()
    return 0


async def _sync(writeback: WriteBack) -> None:
    """The `sync` command: write out every buffer, then fsync the store."""
    failed = await writeback.sync()
    if failed:  # the caller must not take a sync that saved nothing for a good one
        ino, n, e = failed[0]
        log.warning("sync: could not write %d buffered bytes of inode %d: %s", n, ino, e)
        raise e


def _mount(ops: Operations, mnt: str, options: set[str]) -> str | None:
    """pyfuse3.init; None once mounted, else why not. pyfuse3 only says
    "fuse_session_mount failed": the reason is what libfuse (or fusermount3, which
    it runs for a user who is not root) wrote on stderr, so stderr is caught for
    the call, copied back (to daemon.log) and its last line given as the reason."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            pyfuse3.init(ops, mnt, options)
            failure = None
        except RuntimeError as e:
            failure = str(e)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        said = caught.read()
    if said:
        os.write(2, said)
    if failure is None:
        return None
    lines = [ln.strip() for ln in said.decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        return failure
    reason = lines[-1].removeprefix("fuse: ")
    if "/dev/fuse" in reason and "ermission denied" in reason:
        reason += " (a user who is not root needs read-write access to /dev/fuse)"
    return reason


def _rotate_log(store: Store) -> LogRotation | None:
    """When stderr is STORE/daemon.log (as `ferryfs mount` starts the daemon), keep
    it and daemon.log.1 to a few MB each: the log records and what libfuse writes."""
    rotation = store.dir.rotate_stderr() if store.dir is not None else None
    if rotation is not None:
        for h in logging.getLogger().handlers:
            h.addFilter(rotation)
    return rotation


def _fail(ready: int | None, message: str) -> None:
    log.error("%s", message)
    if ready is not None:
        os.write(ready, f"error: {message}\n".encode())
        os.close(ready)
    else:
        print(f"ferryfs: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ferryfs-daemon")
    p.add_argument("src")
    p.add_argument("mnt")
    p.add_argument("--store", required=True)
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--debug", action="store_true")
    add_sweep_arguments(p)
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run(a.src, a.mnt, a.store, a.allow_other, a.ready_fd, sweep_config(a))


if __name__ == "__main__":
    sys.exit(main())

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

import pyfuse3
import trio
from ferryfs.store import points
from ferryfs.store.errors import FerryError
from ferryfs.store.phase3 import Phase3Tree
from ferryfs.store.store import Store

from .control import Control
from .indexer import IndexTask
from .operations import Operations
from .sweep import Sweep
from .sweep_config import SweepConfig, add_sweep_arguments, sweep_config

log = logging.getLogger("ferryfs.daemon")


def mount_options(allow_other: bool) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=ferryfs", "subtype=ferryfs", "nodev"}
    if allow_other:
        opts.add("allow_other")
    return opts


async def serve(
    ops: Operations,
    control: Control,
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
        nursery.start_soon(_record_point, ops.store)
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


async def _record_point(store: Store) -> None:
    """Record the first rollback point behind the mount, not before it: the walk
    of a big tree takes seconds, and the mount never changes Phase 3, so what it
    records is the same whenever it runs."""
    try:
        p = await trio.to_thread.run_sync(points.ensure_first_point, store)
        log.info("rollback point %d: %d entries of the Phase 3 tree recorded", p.id, p.entries)
    except FerryError as e:
        log.error("could not record a rollback point: %s", e)


async def _signals(ops: Operations, sweep: Sweep | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("stopping: flushing open files")
            if sweep is not None:
                await sweep.cancel()
            await ops.flush_all()
            pyfuse3.terminate()
            return


READ_AHEAD_KB = 1024


def raise_readahead(mnt: str, kb: int = READ_AHEAD_KB) -> bool:
    """Let the kernel read ahead `kb` KiB on this mount, not the 128 KiB every FUSE
    mount starts with (and init cannot raise): reads then come 1 MiB at a time, an
    eighth of the round trips, and the read-ahead threads get work to share. Needs
    root (a sysfs knob of the mount's bdi); False if it could not be set."""
    # Not realpath(mnt): that would stat the mount itself, before anyone serves it.
    mnt = os.path.abspath(mnt)
    parent, name = os.path.split(mnt)
    target = os.path.join(os.path.realpath(parent), name).encode()
    dev = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                # Mount points escape space, tab, newline and backslash as octal.
                point = fields[4].decode("unicode_escape").encode("latin-1")
                if point == target and b"fuse.ferryfs" in line:
                    dev = fields[2].decode()  # the last one is the newest: ours
        if dev is None:
            return False
        knob = f"/sys/class/bdi/{dev}/read_ahead_kb"
        with open(knob, "w") as f:
            f.write(str(kb))
        with open(knob) as f:
            return f.read().strip() == str(kb)
    except (OSError, IndexError, UnicodeDecodeError):
        return False
    return True


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
    ops = Operations(store, owner_uid=os.getuid())
    control = Control(store, store_dir, ops.counters)
    ops.control = control

    async def sync() -> None:
        await ops.flush_all()
        store.sync()

    control.commands[b"sync"] = sync
    sweep = Sweep(store, sweep_config) if sweep_config is not None else None
    # The search index catches up in idle time, as the sweep does (and not without it).
    indexer = IndexTask(store, sweep_config.idle_ms) if sweep_config is not None else None
    if sweep is not None and indexer is not None:
        sw, ix = sweep, indexer

        def poke() -> None:
            sw.poke()
            ix.poke()

        ops.on_request = poke
        control.commands.update(
            {b"pause": sweep.pause, b"resume": sweep.resume, b"cancel": sweep.cancel}
        )
        control.status_extra = lambda: {**sw.status(), **ix.status()}
    else:
        control.status_extra = lambda: {"sweep_state": "off"}
    try:
        pyfuse3.init(ops, mnt, mount_options(allow_other))
    except RuntimeError as e:
        store.close()
        _fail(ready, f"cannot mount on {mnt}: {e}")
        return 1
    # Request handlers wait for the GIL whenever a migration thread holds it; at
    # the default 5 ms switch interval that made a first read 12x slower.
    sys.setswitchinterval(0.0002)
    log.info("mounted %s on %s (store %s, pid %d)", src, mnt, store_dir, os.getpid())
    clean = False
    try:
        trio.run(serve, ops, control, ready, sweep, mnt, indexer)
        clean = True
    finally:
        try:
            store.sync()
        finally:
            ops.lazy.background.close()
            if sweep is not None:
                sweep.background.close()
            if indexer is not None:
                indexer.close()
            store.close()
            pyfuse3.close(unmount=clean)
    log.info("unmounted %s", mnt)
    return 0


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

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
import contextlib
import logging
import os
import signal
import sys

import pyfuse3
import trio
from ferryfs.store.errors import FerryError
from ferryfs.store.phase3 import Phase3Tree
from ferryfs.store.store import Store

from .control import Control
from .operations import Operations

log = logging.getLogger("ferryfs.daemon")


def mount_options(allow_other: bool) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {"fsname=ferryfs", "subtype=ferryfs", "nodev"}
    if allow_other:
        opts.add("allow_other")
    return opts


async def serve(ops: Operations, control: Control, ready: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, ops, nursery.cancel_scope)
        if ready is not None:
            os.write(ready, b"ready\n")
            os.close(ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _signals(ops: Operations, scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("stopping: flushing open files")
            await ops.flush_all()
            pyfuse3.terminate()
            return


def run(
    src: str,
    mnt: str,
    store_dir: str,
    allow_other: bool = False,
    ready: int | None = None,
    sweep: bool = True,
) -> int:
    """Mount and serve until unmounted. Returns the exit code."""
    try:
        tree = Phase3Tree.open(src)
        store = Store.open(store_dir, source=src, create=True, keep_orphans=True, tree=tree)
    except FerryError as e:
        _fail(ready, str(e))
        return e.exit_code
    with contextlib.suppress(ImportError):
        from ferryfs.store import points  # type: ignore[attr-defined,unused-ignore]

        points.ensure_first_point(store)
    ops = Operations(store, owner_uid=os.getuid())
    control = Control(store, store_dir, ops.counters)
    ops.control = control
    try:
        pyfuse3.init(ops, mnt, mount_options(allow_other))
    except RuntimeError as e:
        store.close()
        _fail(ready, f"cannot mount on {mnt}: {e}")
        return 1
    log.info("mounted %s on %s (store %s, pid %d)", src, mnt, store_dir, os.getpid())
    clean = False
    try:
        trio.run(serve, ops, control, ready)
        clean = True
    finally:
        try:
            store.sync()
        finally:
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
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run(a.src, a.mnt, a.store, a.allow_other, a.ready_fd, not a.no_sweep)


if __name__ == "__main__":
    sys.exit(main())

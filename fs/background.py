"""Worker threads for background migration, at the lowest CPU and I/O priority.

Chunking, compressing and hashing a file that nobody is waiting for (the
sweep's files, and first-open migrations, whose reads are served from Phase 3
meanwhile) must not take a CPU or the disk from the thread that answers FUSE
requests, nor from the app. On Linux, nice and I/O priority belong to a
thread, not to the process, so these threads run at nice 19 and in the idle
I/O class: when both CPUs are wanted, the scheduler gives them to the request
thread and the app first; when the machine is idle, they still run at full
speed. These threads only compute (read Phase 3, chunk, hash, compress) and
hand their results over; they never open a write transaction, or a foreground
write could wait behind a starved thread holding the store's kv write lock. The
rule and the other threads: docs/concurrency.md.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import trio

log = logging.getLogger("ferryfs.background")

T = TypeVar("T")

NICE = 19
# ioprio_set(2): the syscall has no libc wrapper; its number per architecture.
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}.get(platform.machine())
_IOPRIO_WHO_PROCESS = 1  # with a thread id: that thread alone
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13


def lower_priority() -> list[str]:
    """Put the calling thread at nice 19 and in the idle I/O class. Returns what
    could not be done (each is harmless: the thread then competes as usual)."""
    missed = []
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, NICE)
    except OSError as e:
        missed.append(f"nice: {e.strerror}")
    if _IOPRIO_SET is None:
        missed.append(f"I/O priority: no ioprio_set on {platform.machine()}")
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        prio = _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
        if libc.syscall(_IOPRIO_SET, _IOPRIO_WHO_PROCESS, tid, prio) != 0:
            missed.append(f"I/O priority: {os.strerror(ctypes.get_errno())}")
    return missed


def _init_thread() -> None:
    for what in lower_priority():
        log.debug("background thread %d: %s", threading.get_native_id(), what)


class Background:
    """A fixed pool of low-priority threads, awaited from trio."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(
            max(1, threads), thread_name_prefix="ferryfs-background", initializer=_init_thread
        )

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a pool thread; its result or its exception. Not
        cancellable, like `trio.to_thread.run_sync`: the work is not abandoned
        half done (callers stop it early through their own pre-emption flag)."""
        fut = self._pool.submit(fn, *args)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        fut.add_done_callback(lambda _: token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):
            await done.wait()
        return fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

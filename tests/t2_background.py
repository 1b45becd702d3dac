"""The low-priority pool that background migration runs on (fs/background.py)."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import pytest
import trio
from ferryfs.fs.background import NICE, Background

IOPRIO_GET = 252  # x86_64; ioprio_get(IOPRIO_WHO_PROCESS, tid)


def _priorities() -> tuple[int, int, int]:
    """(native thread id, nice, I/O priority class) of the calling thread."""
    tid = threading.get_native_id()
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    libc = ctypes.CDLL(None, use_errno=True)
    prio = libc.syscall(IOPRIO_GET, 1, tid)
    return tid, nice, prio >> 13


async def test_work_runs_on_low_priority_threads_and_the_caller_keeps_its_own() -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("the ioprio_get syscall number is x86_64's")
    bg = Background(2)
    try:
        results = [await bg.run(_priorities) for _ in range(4)]
    finally:
        bg.close()
    assert {nice for _, nice, _ in results} == {NICE}
    assert {cls for _, _, cls in results} == {3}  # IOPRIO_CLASS_IDLE
    assert len({tid for tid, _, _ in results}) <= 2
    tid, nice, _ = _priorities()
    assert tid not in {t for t, _, _ in results}
    assert nice == os.getpriority(os.PRIO_PROCESS, 0)  # the caller's thread is untouched


async def test_exceptions_come_back_and_cancellation_waits_for_the_work() -> None:
    bg = Background(1)
    finished = threading.Event()

    def slow() -> str:
        time.sleep(0.2)
        finished.set()
        return "done"

    def boom() -> None:
        raise ValueError("from the pool")

    try:
        with pytest.raises(ValueError, match="from the pool"):
            await bg.run(boom)
        with trio.move_on_after(0.01):
            await bg.run(slow)
        # Cancelled from outside, but the call returned only once the work ended.
        assert finished.is_set()
    finally:
        bg.close()

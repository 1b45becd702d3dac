"""One writer (docs/concurrency.md): every write transaction of a mount runs on the
writer thread, never on the trio thread nor on a nice-19 background thread; a
write waiting for the store's lock does not stop the trio thread answering reads."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from ferryfs.fs.background import Background
from ferryfs.fs.control import Control
from ferryfs.fs.counters import Counters
from ferryfs.fs.handles import OpenFiles
from ferryfs.fs.lazy import LazyMigrator
from ferryfs.fs.operations import Operations
from ferryfs.fs.sweep import Sweep
from ferryfs.fs.sweep_config import SweepConfig
from ferryfs.fs.writer import Writer
from ferryfs.store.errors import Exists, Invalid, NoData, NotFound, NotPermitted
from ferryfs.store.kv import MapFull
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store
from helpers.mount import mounted, wait_for

# Bigger than what a migration holds in memory before it wrote chunk records early
# (ingest.STAGE_BYTES, 32 MiB of compressed bytes), from the thread preparing it.
BIG = (32 << 20) + (4 << 20)

ROOT_CTX = pyfuse3.RequestContext()  # uid 0, gid 0


async def until(cond: object, seconds: float) -> None:
    with trio.fail_after(seconds):
        while not cond():  # type: ignore[operator]
            await trio.sleep(0.01)


def tree(root: Path, big: bool) -> list[Path]:
    files = []
    for s in range(3):
        d = root / f"s{s}"
        d.mkdir(parents=True)
        for i in range(5):
            p = d / f"m{i}.json"
            p.write_bytes(os.urandom(300) * (1 + i))
            files.append(p)
    if big:
        p = root / "big.bin"
        p.write_bytes(os.urandom(BIG))  # incompressible: its records pass the limit
        files.append(p)
    return files


async def test_writer_runs_in_order_and_hands_back_results_and_errors() -> None:
    w = Writer()
    try:
        seen: list[int] = []
        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(w.run, seen.append, i)
                await trio.testing.wait_all_tasks_blocked()
        assert seen == list(range(20))
        assert await w.run(threading.current_thread) is not threading.current_thread()
        with pytest.raises(NotFound):
            await w.run(Store.memory().getattr, 999)
    finally:
        w.close()


async def test_the_check_catches_a_write_from_a_background_thread(tmp_path: Path) -> None:
    st = Store.open(str(tmp_path / "store"), source=str(tmp_path), create=True)
    w = Writer()
    bg = Background(1)
    try:
        w.watch(st)
        await w.run(st.record_error, ROOT_INO, "on the writer: fine")
        assert not w.strays
        await bg.run(st.record_error, ROOT_INO, "at nice 19: not fine")
        assert list(w.strays) and all(n.startswith("ferryfs-background") for n in w.strays)
    finally:
        bg.close()
        w.close()
        st.close()


@pytest.mark.parametrize("big", [False, True], ids=["small", "big"])
async def test_sweep_and_first_open_migrations_write_only_on_the_writer(
    tmp_path: Path, big: bool
) -> None:
    # The big file is the priority inversion of issue #12: a migration too big
    # to hold staged its chunk records from the nice-19 thread preparing it.
    src = tmp_path / "src"
    files = tree(src, big)
    st = Store.open(str(tmp_path / "store"), source=str(src), create=True)
    w = Writer()
    w.watch(st)
    counters = Counters(last_request=-float("inf"))
    ops = Operations(st, 0, writer=w, counters=counters)
    sweep = Sweep(st, SweepConfig(idle_ms=0, max_load=64, batch=4, batch_delay_ms=0), w)
    lazy = ops.lazy
    try:
        async with trio.open_nursery() as n:
            await n.start(lazy.run)
            # Handlers that write: listing on lookup, a first-open migration, a new file.
            d = await ops.lookup(ROOT_INO, b"s0", ROOT_CTX)
            f = await ops.lookup(d.st_ino, b"m0.json", ROOT_CTX)
            fi = await ops.open(f.st_ino, os.O_RDONLY, ROOT_CTX)
            assert await ops.read(fi.fh, 0, 300) == files[0].read_bytes()[:300]
            await ops.release(fi.fh)
            await until(lambda: st.getattr(f.st_ino).stored, 60)
            fi, e = await ops.create(d.st_ino, b"new", 0o644, os.O_WRONLY, ROOT_CTX)
            await ops.write(fi.fh, 0, b"hello")
            await ops.release(fi.fh)
            await ops.rename(d.st_ino, b"new", ROOT_INO, b"moved", 0, ROOT_CTX)
            await ops.setxattr(e.st_ino, b"user.k", b"v", ROOT_CTX)
            await ops.unlink(ROOT_INO, b"moved", ROOT_CTX)
            await n.start(sweep.run)
            await until(lambda: sweep.state == "done", 120)
            n.cancel_scope.cancel()
        s = st.stats()
        assert s.files_migrated == s.files_total == len(files)
        assert dict(w.strays) == {}, "write transactions off the writer"
    finally:
        lazy.stop()
        sweep.stop()
        w.close()
        st.close()


async def test_a_write_waiting_for_the_store_does_not_stop_reads(tmp_path: Path) -> None:
    # Before: a handler that writes took the store's writer lock on the trio thread,
    # so while a sweep batch held it (up to 64 MiB and an fdatasync), every request
    # waited, reads too.
    st = Store.open(str(tmp_path / "store"), source=str(tmp_path), create=True)
    ops = Operations(st, 0)
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with st.backend.write():
            holding.set()
            release.wait(10)  # the safety net if the trio thread is stuck behind us

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        holding.wait(10)
        async with trio.open_nursery() as n:
            n.start_soon(ops.mkdir, ROOT_INO, b"d", 0o755, ROOT_CTX)
            await trio.testing.wait_all_tasks_blocked()
            assert not release.is_set()
            t0 = time.monotonic()
            await ops.getattr(ROOT_INO, ROOT_CTX)
            answered_while_held = holder.is_alive()
            release.set()
        assert answered_while_held and time.monotonic() - t0 < 5
        assert st.lookup(ROOT_INO, b"d").is_dir
    finally:
        release.set()
        holder.join()
        ops.writer.close()
        st.close()


async def test_control_errors_go_through_the_error_table(tmp_path: Path) -> None:
    st = Store.open(str(tmp_path / "store"), source=str(tmp_path), create=True)
    ran: list[str] = []

    async def sync() -> None:
        ran.append("sync")

    control = Control(st, str(tmp_path / "store"), Counters(), commands={b"sync": sync})
    try:
        with pytest.raises(NoData) as e:
            await control.get(b"nothing")
        assert e.value.errno == pyfuse3.ENOATTR
        with pytest.raises(NotPermitted):
            await control.set(b"status", b"x")
        with pytest.raises(Invalid) as inv:
            await control.set(b"control", b"explode")
        assert inv.value.errno == errno.EINVAL
        await control.set(b"control", b"sync\n")
        assert ran == ["sync"]
        # Through the handler: only the owner or root.
        ops = Operations(st, owner_uid=os.getuid(), control=control)
        assert (
            await ops.getxattr(ROOT_INO, b"user.ferryfs.pid", ROOT_CTX) == str(os.getpid()).encode()
        )
    finally:
        st.close()


async def test_lazy_migrator_stops_its_threads(tmp_path: Path) -> None:
    st = Store.open(str(tmp_path / "store"), source=str(tmp_path), create=True)
    lazy = LazyMigrator(st, OpenFiles(), Counters())
    try:
        async with trio.open_nursery() as n:
            await n.start(lazy.run)
            n.cancel_scope.cancel()
        lazy.stop()
        with pytest.raises(RuntimeError):  # the pool is shut down
            await lazy.background.run(int, "1")
    finally:
        st.close()


def test_a_mount_writes_only_on_its_writer(tmp_path: Path) -> None:
    # Every live-mount test fails on an ERROR in daemon.log, and a write transaction
    # off the writer logs one: this test makes sure each kind of write is done.
    src = tmp_path / "src"
    files = tree(src, big=False)
    fast = ("--idle-ms", "50", "--max-load", "64", "--batch-delay-ms", "0")
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt", tmp_path / "store", args=fast) as m:
        mnt = m.mnt
        assert (mnt / "s0" / "m1.json").read_bytes() == files[1].read_bytes()
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(b"x" * 5000)
        os.truncate(mnt / "d" / "f", 10)
        os.chmod(mnt / "d" / "f", 0o600)
        os.utime(mnt / "d" / "f", (1, 2))
        os.setxattr(mnt / "d" / "f", "user.a", b"1")
        os.removexattr(mnt / "d" / "f", "user.a")
        os.link(mnt / "d" / "f", mnt / "d" / "g")
        os.symlink("f", mnt / "d" / "l")
        os.rename(mnt / "d" / "g", mnt / "d" / "h")
        with open(mnt / "s1" / "m0.json", "r+b") as f:
            f.write(b"[")
            os.fsync(f.fileno())
        with open(mnt / "s1" / "m1.json", "wb") as f:  # O_TRUNC of a LEGACY file
            f.write(b"{}")
        os.unlink(mnt / "d" / "h")
        wait_for(lambda: m.status()["sweep_state"] == "done", 120, "the sweep to finish")
        m.sync()
        assert "not on the writer" not in m.new_log()


async def test_close_commits_what_was_handed_over_then_refuses_more() -> None:
    st = Store.memory()
    w = Writer()
    w.watch(st)
    release = threading.Event()
    closer = threading.Thread(target=w.close)
    async with trio.open_nursery() as n:
        n.start_soon(w.run, release.wait)
        n.start_soon(w.run, st.mkdir, ROOT_INO, b"d", 0o755, 0, 0)
        await trio.testing.wait_all_tasks_blocked()
        closer.start()  # joins the writer: it drains the queue first
        deadline = time.monotonic() + 10
        while not w._closed and time.monotonic() < deadline:
            await trio.sleep(0.001)
        release.set()
    closer.join()
    assert st.lookup(ROOT_INO, b"d").is_dir
    assert not w.strays  # the jobs drained at close ran on the writer too
    with pytest.raises(RuntimeError):
        await w.run(st.getattr, ROOT_INO)


# -- group commit -------------------------------------------------------------------


async def _queued_behind_a_gate(w: Writer, calls: list[tuple[object, ...]]) -> list[object]:
    """Hand `calls` to `w` while its thread is held on a first job, so that they
    all wait in its queue and reach it together; their outcomes, in order."""
    gate, held = threading.Event(), threading.Event()
    results: list[object] = [None] * len(calls)

    def hold() -> None:
        held.set()
        gate.wait(30)

    async def one(i: int, fn: object, *args: object) -> None:
        try:
            results[i] = await w.run(fn, *args)  # type: ignore[arg-type]
        except Exception as e:
            results[i] = e

    async with trio.open_nursery() as n:
        n.start_soon(w.run, hold)
        await until(held.is_set, 10)  # the writer is in it: the calls below queue
        for i, (fn, *args) in enumerate(calls):
            n.start_soon(one, i, fn, *args)
            await trio.testing.wait_all_tasks_blocked()
        gate.set()
    return results


async def test_jobs_that_wait_together_commit_together(tmp_path: Path) -> None:
    st = Store.open(str(tmp_path / "store"), source=str(tmp_path), create=True)
    w = Writer()
    w.watch(st)
    w.share(st)
    try:
        commits = st.commits
        calls = [(st.mkdir, ROOT_INO, f"d{i}".encode(), 0o755, 0, 0) for i in range(10)]
        out = await _queued_behind_a_gate(w, calls)
        assert [n.ino for n in out] == sorted(n.ino for n in out)  # type: ignore[attr-defined]
        assert w.groups == 1, "the ten jobs waiting together did not share one commit"
        assert st.commits - commits == 10
        # A job after the group reads what the group wrote (inside it, too: d5 below
        # is looked up by the job that creates d5/x, in the same group).
        out = await _queued_behind_a_gate(
            w, [(st.mkdir, ROOT_INO, b"e", 0o755, 0, 0), (st.lookup, ROOT_INO, b"e")]
        )
        assert out[1].ino == out[0].ino  # type: ignore[attr-defined]
        assert not w.strays
    finally:
        w.close()
        st.close()
    with Store.open(str(tmp_path / "store")) as st:  # committed, on disk
        assert all(st.lookup(ROOT_INO, f"d{i}".encode()).is_dir for i in range(10))


async def test_a_failing_job_in_a_group_fails_alone_and_leaves_nothing_half_done(
    tmp_path: Path,
) -> None:
    st = Store.open(str(tmp_path / "store"), source=str(tmp_path), create=True)
    w = Writer()
    w.watch(st)
    w.share(st)

    def half_then_fail() -> None:
        def op(txn: object) -> None:
            st_mkdir = txn.put  # type: ignore[attr-defined]
            st_mkdir("meta", b"half-done", b"1")
            raise Invalid("this job fails after writing")

        st.transact(op)  # type: ignore[arg-type]

    try:
        out = await _queued_behind_a_gate(
            w,
            [
                (st.mkdir, ROOT_INO, b"before", 0o755, 0, 0),
                (half_then_fail,),
                (st.mkdir, ROOT_INO, b"before", 0o755, 0, 0),  # exists: its own error
                (st.mkdir, ROOT_INO, b"after", 0o755, 0, 0),
            ],
        )
        assert w.groups == 1
        assert isinstance(out[1], Invalid)
        assert isinstance(out[2], Exists)
        assert out[0].is_dir and out[3].is_dir  # type: ignore[attr-defined]
    finally:
        w.close()
        st.close()
    with Store.open(str(tmp_path / "store")) as st:
        assert st.lookup(ROOT_INO, b"before").is_dir and st.lookup(ROOT_INO, b"after").is_dir
        with st.backend.read() as txn:
            assert txn.get("meta", b"half-done") is None


async def test_a_group_that_cannot_commit_runs_each_job_alone(tmp_path: Path) -> None:
    # A full map in one job: growing it needs every transaction closed, so the
    # group is abandoned whole and each job runs again in a transaction of its own
    # (where the map grows): every job gets its own outcome, all of them succeed.
    st = Store.open(str(tmp_path / "store"), source=str(tmp_path), create=True)
    w = Writer()
    w.watch(st)
    w.share(st)
    grown: list[int] = []
    real_grow = st.backend.grow

    def grow() -> None:
        grown.append(1)
        real_grow()

    st.backend.grow = grow  # type: ignore[method-assign]

    def fills_the_map() -> str:
        def op(txn: object) -> str:
            if not grown:  # full until grown
                raise MapFull()
            txn.put("meta", b"big", b"x")  # type: ignore[attr-defined]
            return "done"

        return st.transact(op)  # type: ignore[arg-type]

    try:
        out = await _queued_behind_a_gate(
            w,
            [
                (st.mkdir, ROOT_INO, b"a", 0o755, 0, 0),
                (fills_the_map,),
                (st.mkdir, ROOT_INO, b"b", 0o755, 0, 0),
            ],
        )
        assert out[1] == "done" and grown == [1]
        assert out[0].is_dir and out[2].is_dir  # type: ignore[attr-defined]
        assert w.groups == 0, "the group committed though one of its jobs hit a full map"
    finally:
        w.close()
        st.close()
    with Store.open(str(tmp_path / "store")) as st:
        assert st.lookup(ROOT_INO, b"a").is_dir and st.lookup(ROOT_INO, b"b").is_dir

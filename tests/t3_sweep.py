"""The idle sweep on a live mount: it migrates everything, pause and resume
really stop and restart it, foreground requests pre-empt it, a daemon killed
mid-sweep carries on after a remount without redoing work, and only the
mount's owner may steer it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest
from ferryfs.fs.sweep import BATCH_BYTES, Sweep
from ferryfs.fs.sweep_config import SweepConfig
from ferryfs.store.store import Store
from helpers.mount import cli, mounted, pid_alive, wait_for
from helpers.store import check_invariants

FAST = ("--idle-ms", "50", "--max-load", "64", "--batch-delay-ms", "0")
# Slow enough to watch: 2 files a batch, 150 ms between batches.
SLOW = ("--idle-ms", "50", "--max-load", "64", "--batch", "2", "--batch-delay-ms", "150")


def migrated(m) -> int:  # type: ignore[no-untyped-def]
    return int(m.status()["files_migrated"])


def mnt(tmp_path: Path) -> Path:
    (tmp_path / "mnt").mkdir(exist_ok=True)
    return tmp_path / "mnt"


async def until(cond: Callable[[], object], seconds: float) -> None:
    """Poll `cond()` every 10 ms in trio time until true; TooSlowError at `seconds`."""
    import trio

    with trio.fail_after(seconds):
        while not cond():
            await trio.sleep(0.01)


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_sweep_migrates_the_whole_tree_unlisted(sample_tree, tmp_path: Path) -> None:
    src = sample_tree.root
    with mounted(src, mnt(tmp_path), tmp_path / "store", args=FAST) as m:
        wait_for(lambda: m.status()["sweep_state"] == "done", 120, "the sweep to finish")
        s = m.status()
        # Nobody listed a directory, yet the sweep found every file.
        assert s["files_total"] == sample_tree.summary.files
        assert s["files_migrated"] == s["files_total"]
        assert s["dirs_listed"] == s["dirs_total"]
        assert s["sweep_files"] == s["files_total"]
        assert s["sweep_eta_seconds"] == 0.0
        for p in all_files(tmp_path / "mnt")[:50]:
            assert m.state(p) == "migrated"
        log = m.new_log()
        assert "sweep: batch 1:" in log and "sweep done:" in log
    with Store.open(str(tmp_path / "store"), readonly=True) as st:
        assert st.stats().files_legacy == 0


def test_pause_stops_and_resume_restarts(sample_tree, tmp_path: Path) -> None:
    with mounted(sample_tree.root, mnt(tmp_path), tmp_path / "store", args=SLOW) as m:
        wait_for(lambda: migrated(m) >= 2, 60, "the sweep to start")
        out = cli("pause", m.mnt)
        assert "paused" in out
        frozen = migrated(m)
        # Watch it for a while: with 150 ms batches, a running sweep would move.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert migrated(m) == frozen, "migration went on while paused"
            assert m.status()["sweep_state"] == "paused"
            time.sleep(0.05)
        cli("resume", m.mnt)
        wait_for(lambda: migrated(m) > frozen, 30, "migration to restart after resume")


def test_cancel_stops_the_sweep_but_not_first_open(sample_tree, tmp_path: Path) -> None:
    with mounted(sample_tree.root, mnt(tmp_path), tmp_path / "store", args=SLOW) as m:
        wait_for(lambda: migrated(m) >= 2, 60, "the sweep to start")
        cli("cancel", m.mnt)
        assert m.status()["sweep_state"] == "cancelled"
        frozen = migrated(m)
        legacy = next(p for p in all_files(m.mnt) if m.state(p) == "legacy")
        legacy.read_bytes()
        wait_for(lambda: m.state(legacy) == "migrated", 30, "first-open migration")
        assert migrated(m) == frozen + 1


def test_foreground_reads_preempt_the_sweep(sample_tree, tmp_path: Path) -> None:
    args = ("--idle-ms", "300", "--max-load", "64", "--batch", "2", "--batch-delay-ms", "50")
    with mounted(sample_tree.root, mnt(tmp_path), tmp_path / "store", args=args) as m:
        wait_for(lambda: m.status()["sweep_files"] >= 2, 60, "the sweep to start")
        target = next(p for p in all_files(m.mnt) if p.suffix == ".json")
        stop = threading.Event()

        def app() -> None:  # an app reading every 20 ms: never idle for 300 ms
            while not stop.is_set():
                target.read_bytes()
                time.sleep(0.02)

        t = threading.Thread(target=app)
        t.start()
        try:
            time.sleep(0.1)  # let an in-flight batch give way
            before = m.status()["sweep_files"]
            states = set()
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                s = m.status()
                states.add(s["sweep_state"])
                assert s["sweep_files"] == before, "the sweep ran while the app was busy"
                time.sleep(0.05)
            assert states == {"waiting"}
        finally:
            stop.set()
            t.join()
        wait_for(lambda: m.status()["sweep_files"] > before, 30, "the sweep to resume when idle")


def test_kill_9_mid_sweep_then_remount_finishes_without_redoing(
    sample_tree, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    total = sample_tree.summary.files
    with mounted(sample_tree.root, mnt(tmp_path), store, args=SLOW, log_ok=True) as m:
        wait_for(lambda: migrated(m) >= 4, 60, "the sweep to migrate a few files")
        pid = m.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 30, "the daemon to die")
        subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], check=True)
        with Store.open(str(store), readonly=True) as st:
            done_before = st.stats().files_migrated
        assert 0 < done_before < total
        m.args = FAST
        m.start()
        wait_for(lambda: m.status()["sweep_state"] == "done", 120, "the sweep to finish")
        s = m.status()
        assert s["files_migrated"] == total
        assert s["sweep_files"] == total - done_before, "a migrated file was migrated again"
    r = subprocess.run(
        [sys.executable, "-m", "ferryfs.tools.cli", "fsck", str(store)],
        capture_output=True,
        text=True,
    )
    if "invalid choice" not in r.stderr:  # fsck lands with its own issue
        assert r.returncode == 0, r.stdout + r.stderr


def test_only_the_owner_may_steer(sample_tree, tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    # pytest's tmp_path is private to root; another user must reach the mountpoint.
    where = Path(tempfile.mkdtemp(prefix="ferryfs-owner-"))
    os.chmod(where, 0o755)
    try:
        steer_as_nobody(sample_tree.root, where, tmp_path / "store")
    finally:
        where.rmdir()


def steer_as_nobody(src: Path, where: Path, store: Path) -> None:
    with mounted(src, where, store, args=(*SLOW, "-o", "allow_other")) as m:
        probe = (
            "import os,sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            "    os.setxattr(sys.argv[1], 'user.ferryfs.control', b'pause')\n"
            "    print('pause accepted')\n"
            "except PermissionError:\n"
            "    print('refused')\n"
            "try:\n"
            "    os.getxattr(sys.argv[1], 'user.ferryfs.status'); print('status answered')\n"
            "except PermissionError:\n"
            "    print('status refused')\n"
            "print(sorted(os.listdir(sys.argv[1]))[:1])\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, str(where)], capture_output=True, text=True, check=True
        ).stdout
        assert "refused" in out and "status refused" in out, out
        assert "pause accepted" not in out
        assert m.status()["sweep_state"] != "paused"
        # The owner (root) may.
        cli("pause", where)
        assert m.status()["sweep_state"] == "paused"
        # And the CLI says so in one line when a non-owner tries.
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                # Import first: the interpreter's stdlib under /root is private to root.
                "import os,sys,json,locale,gettext;"
                "from ferryfs.tools.cli import main, build_parser;"
                "build_parser('resume').parse_args(['resume', sys.argv[1]]);"
                "os.setgid(65534); os.setuid(65534); sys.exit(main(['resume', sys.argv[1]]))",
                str(where),
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 1
        assert r.stderr.strip().count("\n") == 0 and "owner" in r.stderr
        assert "Traceback" not in r.stderr
        assert m.status()["sweep_state"] == "paused"


async def test_a_batch_stops_taking_files_at_batch_bytes(tmp_path: Path) -> None:
    # Prepared files stay in memory until their batch commits: 64 large attachments
    # in one batch would be gigabytes.
    (tmp_path / "src").mkdir()
    store = Store.open(str(tmp_path / "store"), source=str(tmp_path / "src"), create=True)
    sweep = Sweep(store, SweepConfig(batch=64))
    try:
        sizes = [BATCH_BYTES // 2] * 5 + [10] * 100 + [BATCH_BYTES * 2]
        sweep._todo = array("Q", reversed(range(1, len(sizes) + 1)))
        sweep._sizes = array("Q", reversed(sizes))
        assert [ino for ino, _ in await sweep._next_batch()] == [1, 2]  # 2 reach BATCH_BYTES
        assert [ino for ino, _ in await sweep._next_batch()] == [3, 4]
        small = await sweep._next_batch()  # one half and 63 small ones: the count binds
        assert [ino for ino, _ in small] == list(range(5, 69))
        rest = await sweep._next_batch()
        assert rest[-1] == (len(sizes), BATCH_BYTES * 2)  # a big file still goes, alone or last
        assert await sweep._next_batch() == []
    finally:
        sweep.background.close()
        store.close()


# -- files the app deletes, and errors that no longer apply ---------------------------------


def small_tree(root: Path, sessions: int = 20, files: int = 20) -> int:
    """`sessions` directories of `files` small files each; returns the file count."""
    for s in range(sessions):
        d = root / f"s{s:03}"
        d.mkdir(parents=True)
        for f in range(files):
            (d / f"m{f:03}.json").write_bytes(os.urandom(256) * (1 + (s * files + f) % 40))
    return sessions * files


def test_files_deleted_during_the_sweep_are_not_errors(tmp_path: Path) -> None:
    # Issue #10: mount a tree in place, pause the sweep right after it starts, delete
    # 200 LEGACY files, resume. The sweep's todo list still holds them: each gave an
    # error ("cannot migrate inode N: inode N"), kept in status for ever.
    src = tmp_path / "phase3"
    total = small_tree(src)
    args = ("--idle-ms", "50", "--max-load", "64", "--batch", "4", "--batch-delay-ms", "100")
    with mounted(src, None, tmp_path / "store", args=args) as m:
        wait_for(lambda: migrated(m) >= 4, 60, "the sweep to start")
        cli("pause", m.mnt)
        legacy = [p for p in sorted(all_files(m.mnt)) if m.state(p) == "legacy"]
        assert len(legacy) > 200
        for p in legacy[:200]:
            p.unlink()
        cli("resume", m.mnt)
        wait_for(lambda: m.status()["sweep_state"] == "done", 120, "the sweep to finish")
        s = m.status()
        assert s["files_total"] == total - 200
        assert s["files_migrated"] == s["files_total"]
        assert s["errors"] == 0, s
        assert s["sweep_errors"] == 0, s
        m.remount()
        assert m.status()["errors"] == 0


def test_a_file_deleted_while_its_batch_migrates_is_dropped_not_the_batch(
    tmp_path: Path,
) -> None:
    # The committer got NotFound for the deleted inode and gave up the whole batch,
    # an error on each of its files naming another ("cannot migrate inode 510: inode 553").
    src = tmp_path / "src"
    small_tree(src, sessions=1, files=6)
    with Store.open(str(tmp_path / "store"), source=str(src), create=True) as st:
        d = st.lookup(1, b"s000")
        inos = [st.lookup(d.ino, f"m{i:03}.json".encode()).ino for i in range(6)]
        prepared = [st.prepare_migration(ino) for ino in inos]
        st.unlink(d.ino, b"m002.json")  # deleted by the app while being migrated
        st.rename(d.ino, b"m004.json", d.ino, b"renamed.json")  # renamed: still migrates
        done = st.commit_migrations([m for m in prepared if m is not None])
        assert sorted(n.ino for n in done) == sorted(inos[:2] + inos[3:])
        assert st.getattr(inos[4]).state == "migrated"
        assert st.read(inos[4], 0, 10**6) == (src / "s000" / "m004.json").read_bytes()
        assert st.errors() == [] and st.stats().errors == 0
        check_invariants(st)


def test_errors_that_no_longer_apply_leave_status(tmp_path: Path) -> None:
    # After a remount status still counted 112 errors with every file migrated: 96 for
    # inodes that no longer existed, 16 for files migrated since.
    src = tmp_path / "src"
    small_tree(src, sessions=1, files=4)
    with Store.open(str(tmp_path / "store"), source=str(src), create=True) as st:
        d = st.lookup(1, b"s000")
        a, b, c, e = (st.lookup(d.ino, f"m{i:03}.json".encode()).ino for i in range(4))
        for ino in (a, b, c, e):
            st.record_error(ino, "cannot migrate: unreadable")
        st.unlink(d.ino, b"m000.json")  # deleted: its error goes with it
        st.truncate(b, 0)  # content replaced through the mount: no longer LEGACY
        st.migrate(c)  # migrated since
        st.unlink(d.ino, b"m003.json")
        st.record_error(e, "recorded after the file was deleted")  # the sweep's late error
        assert st.errors() == []
        assert st.stats().errors == 0
        assert st.prune_errors() == 1  # b's record, kept by the truncation, is deleted
        with st.backend.read() as txn:
            assert list(txn.range("errors", b"")) == []


async def test_a_file_deleted_before_its_first_open_migration_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import trio
    from ferryfs.fs.handles import OpenFiles
    from ferryfs.fs.lazy import LazyMigrator

    src = tmp_path / "src"
    small_tree(src, sessions=1, files=2)
    st = Store.open(str(tmp_path / "store"), source=str(src), create=True)

    class Counters:
        last_request = -float("inf")
        migrated_on_open = 0

    lazy = LazyMigrator(st, OpenFiles(), Counters(), jobs=1)
    try:
        d = st.lookup(1, b"s000")
        gone = st.lookup(d.ino, b"m000.json").ino
        kept = st.lookup(d.ino, b"m001.json").ino
        lazy.request(gone)  # first read queued it; then the app deleted it
        lazy.request(kept)
        st.unlink(d.ino, b"m000.json")
        async with trio.open_nursery() as n:
            await n.start(lazy.run)
            await until(lambda: not lazy._queued, 30)
            n.cancel_scope.cancel()
        assert st.getattr(kept).state == "migrated"
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
        assert st.errors() == [] and st.stats().errors == 0
    finally:
        lazy.background.close()
        st.close()


# -- a full disk ------------------------------------------------------------------------------


class FullDisk(Store):
    """A store whose disk holds `room` more bytes of migrated files, then ENOSPC."""

    room = 0

    def commit_migrations(self, ms):  # type: ignore[no-untyped-def]
        from ferryfs.store.errors import NoSpace

        need = sum(m.size for m in ms)
        if need > self.room:
            raise NoSpace("no space left for the store")
        done = super().commit_migrations(ms)
        self.room -= sum(n.size for n in done)
        return done


async def test_a_batch_meeting_enospc_migrates_what_fits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue #11: 0 of 6 files migrated where 3 would fit, each given an error and
    # skipped for the rest of the mount.
    import trio

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}.bin").write_bytes(os.urandom(100_000))
    st = FullDisk.open(str(tmp_path / "store"), source=str(src), create=True)
    st.room = 350_000  # three of the six
    sweep = Sweep(st, SweepConfig(idle_ms=0, max_load=64, batch=6, batch_delay_ms=0))
    sweep.space_retry = 0.2

    def migrated_now() -> int:
        return st.stats().files_migrated

    try:
        async with trio.open_nursery() as n:
            await n.start(sweep.run)
            await until(lambda: sweep.state == "waiting for space", 60)
            assert migrated_now() == 3
            assert st.stats().errors == 0 and sweep.stats.errors == 0
            st.room = 10**9  # space freed: the rest goes at the next look
            await until(lambda: migrated_now() >= 6 and sweep.state == "done", 60)
            n.cancel_scope.cancel()
        assert st.stats().errors == 0
        for i in range(6):
            ino = st.lookup(1, f"f{i}.bin".encode()).ino
            assert st.read(ino, 0, 10**6) == (src / f"f{i}.bin").read_bytes()
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == 1 and "no space" in warned[0], warned
    finally:
        sweep.background.close()
        st.close()


# -- cancel ------------------------------------------------------------------------------------


def test_resume_after_cancel_is_refused_and_status_shows_no_eta(
    sample_tree, tmp_path: Path
) -> None:
    # Issue #11: `resume` after `cancel` printed "sweep cancelled" and exited 0, and
    # status after cancel still showed an ETA.
    with mounted(sample_tree.root, mnt(tmp_path), tmp_path / "store", args=SLOW) as m:
        wait_for(lambda: migrated(m) >= 2, 60, "the sweep to start")
        cli("cancel", m.mnt)
        r = subprocess.run(
            [sys.executable, "-m", "ferryfs.tools.cli", "resume", str(m.mnt)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 1
        assert r.stdout == ""
        assert r.stderr.count("\n") == 1 and "cancelled" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        s = m.status()
        assert s["sweep_state"] == "cancelled"
        assert s["sweep_eta_seconds"] is None
        out = cli("status", m.mnt)
        assert "ETA" not in out, out
        assert "cancelled" in out


class NoRoomToList(Store):
    """A store whose disk is full for listing directories until `full` is cleared."""

    full = True

    def import_step(self, queue, entries=4096):  # type: ignore[no-untyped-def]
        from ferryfs.store.errors import NoSpace

        if self.full:
            raise NoSpace("no space left for the store")
        return super().import_step(queue, entries)


async def test_listing_that_meets_enospc_goes_on_once_there_is_space(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A sibling of the batch above: listing gave up every directory not yet listed
    # for the rest of the mount, and the sweep said "done" with nothing migrated.
    import trio

    src = tmp_path / "src"
    total = small_tree(src, sessions=3, files=3)
    st = NoRoomToList.open(str(tmp_path / "store"), source=str(src), create=True)
    sweep = Sweep(st, SweepConfig(idle_ms=0, max_load=64, batch=4, batch_delay_ms=0))
    sweep.space_retry = 0.2
    try:
        async with trio.open_nursery() as n:
            await n.start(sweep.run)
            await until(lambda: sweep.state == "waiting for space", 60)
            assert st.stats().files_migrated == 0
            st.full = False
            await until(lambda: sweep.state == "done", 60)
            n.cancel_scope.cancel()
        assert st.stats().files_migrated == total
        assert sweep.stats.errors == 0
    finally:
        sweep.background.close()
        st.close()


def test_an_app_busy_beside_the_sweep_leaves_no_errors(tmp_path: Path) -> None:
    # Issue #10's load, shortened: an app appending and fsyncing, creating, renaming
    # and deleting sessions, rewriting an index and reading, while the sweep runs.
    # Nothing the app does is an error of the sweep's, and fsck is clean after.
    import random

    src = tmp_path / "phase3"
    small_tree(src, sessions=30, files=15)
    args = ("--idle-ms", "5", "--max-load", "64", "--batch", "8", "--batch-delay-ms", "0")
    rng = random.Random(3)
    with mounted(src, None, tmp_path / "store", args=args) as m:
        deadline = time.monotonic() + 10
        n = 0
        while time.monotonic() < deadline:
            sessions = sorted(p for p in m.mnt.iterdir() if p.is_dir())
            s = rng.choice(sessions)
            files = sorted(s.iterdir())
            what = rng.random()
            if what < 0.3 and files:
                rng.choice(files).unlink()
            elif what < 0.45:
                s.rename(m.mnt / f"r{n:04}")
            elif what < 0.6 and files:
                rng.choice(files).read_bytes()
            elif what < 0.8:
                with open(s / "log.jsonl", "ab") as f:
                    f.write(b'{"n": %d}\n' % n)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                (m.mnt / "index.json").write_bytes(b'{"sessions": %d}\n' % len(sessions))
            n += 1
            time.sleep(0.002)
        wait_for(lambda: m.status()["sweep_state"] == "done", 120, "the sweep to finish")
        s = m.status()
        assert s["files_migrated"] == s["files_total"], s
        assert s["errors"] == 0 and s["sweep_errors"] == 0, s
    r = subprocess.run(
        [sys.executable, "-m", "ferryfs.tools.cli", "fsck", str(tmp_path / "store")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


async def test_small_files_go_to_the_sweeps_threads_many_at_a_time(tmp_path: Path) -> None:
    """One hop to a nice-19 thread per small file cost as much as the file: the
    sweep hands them over in groups, and each still migrates byte for byte."""
    import trio
    from ferryfs.fs import sweep as sweep_module

    src = tmp_path / "src"
    n = small_tree(src, sessions=5, files=40)
    st = Store.open(str(tmp_path / "store"), source=str(src), create=True)
    sweep = Sweep(st, SweepConfig(idle_ms=0, max_load=64, batch=64, batch_delay_ms=0))
    calls: list[int] = []
    real = sweep.background.run

    async def counting(fn, *args):  # type: ignore[no-untyped-def]
        if fn is sweep_module.migration.prepare_batch:
            calls.append(len(args[1]))
        elif fn is not sweep_module.upkeep.idle:  # the idle work on packs is not a file's
            calls.append(1)
        return await real(fn, *args)

    sweep.background.run = counting  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sweep.run)
            await until(lambda: sweep.state == "done", 60)
            nursery.cancel_scope.cancel()
        assert st.stats().files_migrated == n and sweep.stats.errors == 0
        assert sum(calls) == n and len(calls) <= n // 8, calls
        check_invariants(st, deep=True)
        for p in all_files(src):
            rel = p.relative_to(src)
            ino = st.lookup(st.lookup(1, str(rel.parent).encode()).ino, p.name.encode()).ino
            assert st.read(ino, 0, 10**7) == p.read_bytes()
    finally:
        sweep.background.close()
        st.close()

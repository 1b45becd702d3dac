"""Giving disk back on a live mount: once the sweep is done, deleting files through
the mount makes the idle upkeep run again (compaction, then store/reclaim.py's
hole punching), so the store's database takes less disk; every remaining file
reads exactly, new files written after it read back exactly, and `fsck --deep`
is clean. A kill -9 of the daemon as it punches leaves a clean store."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

from ferryfs.store.store import Store
from helpers.mount import ferry, mounted, pid_alive, wait_for
from helpers.store import check_invariants

FAST = ("--idle-ms", "50", "--max-load", "64", "--batch-delay-ms", "0")
N = 200


def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    rng = random.Random(7)
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for i in range(N):
        body = rng.randbytes(rng.randrange(2000, 60_000))
        (src / f"f{i:03d}.bin").write_bytes(body)
        files[f"f{i:03d}.bin"] = body
    return src, files


def db_disk(store: Path) -> int:
    return os.stat(store / "db" / "data.mdb").st_blocks * 512


def test_deleting_half_through_the_mount_gives_the_disk_back(tmp_path: Path) -> None:
    src, files = tree(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = tmp_path / "store"
    gone = sorted(files)[::2]
    with mounted(src, mnt, store, args=FAST) as m:
        wait_for(lambda: m.status()["sweep_state"] == "done", 120, "the sweep to finish")
        full = db_disk(store)
        for name in gone:
            os.unlink(mnt / name)
        wait_for(
            lambda: db_disk(store) < 0.6 * full and m.status()["sweep_state"] == "done",
            120,
            "idle upkeep to give the deleted files' disk back",
        )
        assert m.status()["reclaimed_bytes"] > 0
        for name, body in files.items():
            if name not in gone:
                assert (mnt / name).read_bytes() == body, name
        # The punched pages are taken again by new files, which read back exactly.
        rng = random.Random(8)
        new = {f"n{i}.bin": rng.randbytes(rng.randrange(2000, 60_000)) for i in range(50)}
        for name, body in new.items():
            (mnt / name).write_bytes(body)
        m.sync()
        for name, body in new.items():
            assert (mnt / name).read_bytes() == body, name
    r = ferry("fsck", store, "--deep")
    assert r.returncode == 0, r.stdout + r.stderr
    with Store.open(str(store), readonly=True) as s:
        check_invariants(s, deep=True)


def test_a_kill_9_as_the_daemon_punches_leaves_a_clean_store(tmp_path: Path) -> None:
    src, files = tree(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = tmp_path / "store"
    gone = sorted(files)[1::2]
    with mounted(src, mnt, store, args=FAST) as m:
        wait_for(lambda: m.status()["sweep_state"] == "done", 120, "the sweep to finish")
        pid = m.pid
        assert pid is not None
        full = db_disk(store)
        for name in gone:
            os.unlink(mnt / name)
        # Kill as soon as the database's disk starts to fall: the punching has begun.
        wait_for(lambda: db_disk(store) < full, 120, "the punching to begin", interval=0.001)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 30, f"daemon {pid} to die")
        r = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        if m._watchdog is not None:
            m._watchdog.cancel()
            m._watchdog = None
        m.pid = None
        killed_at = db_disk(store)
    r = ferry("fsck", store, "--deep")
    assert r.returncode == 0, r.stdout + r.stderr
    with Store.open(str(store), readonly=True) as s:
        check_invariants(s, deep=True)
    with mounted(src, mnt, store, args=FAST) as m:
        for name, body in files.items():
            if name not in gone:
                assert (mnt / name).read_bytes() == body, name
            else:
                assert not (mnt / name).exists()
        # The new daemon's idle upkeep finishes the job.
        wait_for(lambda: db_disk(store) < 0.6 * full, 120, "the rest of the disk to go back")
        assert db_disk(store) <= killed_at
    r = ferry("fsck", store, "--deep")
    assert r.returncode == 0, r.stdout + r.stderr

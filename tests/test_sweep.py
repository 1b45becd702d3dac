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
from pathlib import Path

import pytest
from ferryfs.fs.sweep import BATCH_BYTES, Sweep
from ferryfs.fs.sweep_config import SweepConfig
from ferryfs.store.store import Store
from mountutil import cli, mounted, pid_alive, wait_for

FAST = ("--idle-ms", "50", "--max-load", "64", "--batch-delay-ms", "0")
# Slow enough to watch: 2 files a batch, 150 ms between batches.
SLOW = ("--idle-ms", "50", "--max-load", "64", "--batch", "2", "--batch-delay-ms", "150")


def migrated(m) -> int:  # type: ignore[no-untyped-def]
    return int(m.status()["files_migrated"])


def mnt(tmp_path: Path) -> Path:
    (tmp_path / "mnt").mkdir(exist_ok=True)
    return tmp_path / "mnt"


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

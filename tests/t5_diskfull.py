"""Disk full: the store on a small tmpfs of its own.

- Writes through the mount get ENOSPC (never EIO, never silent loss): what was
  fsync'ed before stays, the mount keeps answering, the store stays consistent
  (its invariants and fsck after unmount), and once space is freed by deleting a
  file through the mount, writing works again.
- The sweep filling the store migrates what fits, the rest waits for space, and
  the daemon lives; the files it could not migrate are still served, byte-exact,
  from Phase 3.

Needs root (to mount a tmpfs) and FUSE.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import NOW_NS
from ferryfs.store.store import Store
from ferryfs.tools.sampletree import generate
from helpers.mount import (
    FULL_LOG,
    ferry,
    mounted,
    pid_alive,
    small_tmpfs,
    snapshot,
    snapshot_diff,
    wait_for,
)
from helpers.store import check_invariants

MiB = 1 << 20
# What the daemon may log about a full disk.


def assert_consistent(store: Path) -> str:
    with Store.open(str(store), readonly=True) as st:
        check_invariants(st, deep=True)
    r = ferry("fsck", store, "--deep")
    assert r.returncode == 0, f"fsck after a full disk: exit {r.returncode}\n{r.stdout}{r.stderr}"
    return "fsck --deep clean"


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def sample_phase3(
    tmp_path: Path, sessions: int, seed: int, attachment_mb: float
) -> tuple[Path, dict[bytes, tuple[Any, ...]], Path]:
    """A sample Phase 3 tree, its snapshot to compare with at the end, and an empty
    mountpoint: (src, pristine, mnt)."""
    src = tmp_path / "phase3"
    generate(src, sessions, seed=seed, attachment_mb=attachment_mb, now_ns=NOW_NS)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return src, snapshot(src), mnt


def test_writes_get_enospc_then_work_again_after_deleting(tmp_path: Path) -> None:
    src, pristine, mnt = sample_phase3(tmp_path, 6, seed=3, attachment_mb=1)
    rng = random.Random(1)
    with small_tmpfs(tmp_path / "small", 24) as small:
        store = small / "store"
        with mounted(src, mnt, store, args=("--no-sweep",), log_ok=FULL_LOG) as m:
            # Fill the store with incompressible bytes, fsync'ing each MiB.
            kept = bytearray()
            fd = os.open(mnt / "filler.bin", os.O_WRONLY | os.O_CREAT, 0o644)
            err = None
            try:
                for _ in range(64):  # 64 MiB: more than the tmpfs holds
                    block = rng.randbytes(MiB)
                    os.write(fd, block)
                    try:
                        os.fsync(fd)
                    except OSError as e:
                        err = e
                        break
                    kept += block
            finally:
                with contextlib.suppress(OSError):  # its unwritable tail fails again
                    os.close(fd)
            assert err is not None, "64 MiB fitted in a 24 MiB tmpfs"
            assert err.errno == errno.ENOSPC, f"a full store gave {err!r}, not ENOSPC"
            assert kept, "not even one MiB was written before the store filled"
            assert pid_alive(m.pid or 0), "the daemon died of a full disk"

            # Small writes too: ENOSPC at the latest when they are flushed. Bigger
            # than what the failed commit above may have left allocated past the
            # store's committed end (up to its 1 MiB), which the next commit reuses.
            with pytest.raises(OSError) as e, open(mnt / "small.txt", "wb") as f:
                f.write(rng.randbytes(3 * MiB))
                f.flush()
                os.fsync(f.fileno())
            assert e.value.errno == errno.ENOSPC, e.value
            # Reads still work, and what was fsync'ed is all there.
            got = (mnt / "filler.bin").read_bytes()
            assert got[: len(kept)] == bytes(kept), "fsync'ed bytes lost when the disk filled"
            assert (mnt / "index.json").read_bytes() == (src / "index.json").read_bytes()

            # Free space the way an app would: delete a file through the mount.
            os.unlink(mnt / "filler.bin")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mnt / "small.txt")
            again = rng.randbytes(4 * MiB)
            with open(mnt / "after.bin", "wb") as f:
                f.write(again)
                f.flush()
                os.fsync(f.fileno())
            assert (mnt / "after.bin").read_bytes() == again
            m.remount()
            assert (mnt / "after.bin").read_bytes() == again
            assert not (mnt / "filler.bin").exists()
        verdict = assert_consistent(store)
        left = free_bytes(small)
    assert not snapshot_diff(pristine, snapshot(src)), "Phase 3 changed"
    print(
        f"filled a 24 MiB store after {len(kept) // MiB} MiB fsync'ed: ENOSPC (not EIO); "
        f"fsync'ed bytes intact: {len(kept)}; after deleting, 4 MiB written and read back; "
        f"{verdict}; {left // 1024} KiB free at the end"
    )


def test_sweep_on_a_full_store_waits_for_space_and_the_daemon_lives(tmp_path: Path) -> None:
    # Attachments are random bytes: about 40 MB that cannot compress into 16 MiB.
    src, pristine, mnt = sample_phase3(tmp_path, 12, seed=4, attachment_mb=40)
    sweep = ("--idle-ms", "20", "--max-load", "64", "--batch", "2", "--batch-delay-ms", "0")
    with small_tmpfs(tmp_path / "small", 16) as small:
        store = small / "store"
        with mounted(src, mnt, store, args=sweep, log_ok=FULL_LOG) as m:
            # What fits is migrated; the rest waits for space (not a per-file error:
            # the files are fine, the disk is full).
            wait_for(
                lambda: m.status()["sweep_state"] == "waiting for space",
                120,
                "the sweep to hit the full disk",
            )
            s = m.status()
            assert pid_alive(m.pid or 0), "the daemon died when the sweep filled the disk"
            assert s["sweep_waiting_for_space"] > 0, s
            assert s["files_legacy"] > 0, "everything fitted: the test did not fill the disk"
            assert s["files_migrated"] > 0, "nothing fitted: the sweep never got going"
            # Every file, migrated or not, reads as its Phase 3 bytes.
            n = 0
            for dirpath, _dirs, names in os.walk(src):
                for name in names:
                    p = Path(dirpath) / name
                    if p.is_symlink() or not p.is_file():
                        continue
                    rel = p.relative_to(src)
                    assert (mnt / rel).read_bytes() == p.read_bytes(), rel
                    n += 1
            errors = s["errors"]
            migrated = s["files_migrated"]
        verdict = assert_consistent(store)
    assert not snapshot_diff(pristine, snapshot(src)), "Phase 3 changed"
    print(
        f"sweep on a 16 MiB store: {migrated} files migrated, {errors} per-file errors "
        f"recorded, the rest waiting for space, daemon alive, {n} files read back "
        f"byte-exact; {verdict}"
    )

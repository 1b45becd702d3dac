"""Tier 3: a real mount. The app must see exactly the Phase 3 files, before and
after migration and after a remount, and the Phase 3 tree must never change."""

from __future__ import annotations

import errno
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from helpers.mount import (
    Mount,
    cli,
    diff_r,
    is_mounted,
    mounted,
    one_file_phase3,
    pid_alive,
    snapshot,
    snapshot_diff,
    wait_for,
)

# What an app can see of an entry, whichever filesystem serves it (no st_ino, st_dev, ctime).
VIEW_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_mtime_ns")


def sample(tmp_path: Path, sessions: int = 50, seed: int = 11) -> Path:
    src = tmp_path / "phase3"
    cli("sample", src, "--sessions", str(sessions), "--seed", str(seed))
    return src


def view(root: Path, content: bool = True) -> dict[bytes, tuple[object, ...]]:
    """Entry -> what an app sees of it: VIEW_FIELDS, then sha256 or link target."""
    return snapshot(root, VIEW_FIELDS, content)


def regular_files(root: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, files in os.walk(os.fsencode(root)):
        for f in files:
            p = os.path.join(dirpath, f)
            if stat.S_ISREG(os.lstat(p).st_mode):
                out.append(Path(os.fsdecode(p)))
    return out


def states(m: Mount) -> dict[str, int]:
    count: dict[str, int] = {}
    for p in regular_files(m.mnt):
        s = m.state(p)
        count[s] = count.get(s, 0) + 1
    return count


def test_sample_tree_same_before_and_after_migration_and_remount(tmp_path: Path) -> None:
    src = sample(tmp_path)
    n_files = len(regular_files(src))
    before = snapshot(src)
    src_view = view(src)
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt") as m:
        # Listing and stat-ing must not migrate anything.
        assert view(m.mnt, content=False) == view(src, content=False)
        assert states(m) == {"legacy": n_files}
        assert m.status()["files_migrated"] == 0
        diff_r(src, m.mnt)  # reads every file: lazy migration (it may finish behind)
        wait_for(lambda: states(m) == {"migrated": n_files}, 60, "every file migrated")
        st = m.status()
        assert st["files_migrated"] == n_files and st["files_legacy"] == 0, st
        diff_r(src, m.mnt)  # now served from the store
        assert view(m.mnt) == src_view, snapshot_diff(src_view, view(m.mnt))
        m.remount()
        assert states(m) == {"migrated": n_files}
        diff_r(src, m.mnt)
        assert view(m.mnt) == src_view, snapshot_diff(src_view, view(m.mnt))
        assert snapshot(src) == before, snapshot_diff(before, snapshot(src))
    assert snapshot(src) == before, snapshot_diff(before, snapshot(src))


def _change_everything(mnt: Path) -> None:
    """Writes, truncates, deletes, renames, chmod, utime, xattrs: all through the mount."""
    files = sorted(regular_files(mnt), key=os.fsencode)
    big = max(files, key=lambda p: p.stat().st_size)
    with open(big, "r+b") as f:  # overwrite in the middle of a LEGACY file
        f.seek(big.stat().st_size // 2)
        f.write(b"CHANGED THROUGH THE MOUNT")
    with open(files[0], "ab") as f:
        f.write(b"appended\n")
    os.truncate(files[1], 3)
    os.truncate(files[2], 0)
    os.unlink(files[3])
    os.rename(files[4], mnt / "renamed-out-of-place")
    os.rename(files[5], files[6])  # over another file
    os.chmod(files[7], 0o600)
    os.utime(files[8], ns=(1, 2))
    os.setxattr(files[9], "user.note", b"store only")
    sessions = mnt / "sessions"
    os.rename(sessions, mnt / "sessions-moved")  # a whole subtree
    (mnt / "new-dir" / "deeper").mkdir(parents=True)
    (mnt / "new-dir" / "deeper" / "new.txt").write_bytes(b"new\n" * 1000)
    os.symlink("index.json", mnt / "new-link")
    os.link(mnt / "index.json", mnt / "index-hardlink.json")
    attachments = mnt / "attachments"
    victim = sorted(p for p in attachments.iterdir() if p.is_dir())[0]
    for p in sorted(victim.rglob("*"), key=lambda p: -len(p.parts)):
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        else:
            p.unlink()
    victim.rmdir()
    os.sync()


def test_src_unchanged_by_writes_deletes_renames_through_the_mount(tmp_path: Path) -> None:
    src = sample(tmp_path, seed=12)
    before = snapshot(src)
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt") as m:
        _change_everything(m.mnt)
        assert snapshot(src) == before, snapshot_diff(before, snapshot(src))
        assert not (m.mnt / "sessions").exists()
        assert (m.mnt / "sessions-moved").is_dir()
        m.remount()
        assert (m.mnt / "new-dir" / "deeper" / "new.txt").read_bytes() == b"new\n" * 1000
        assert not (m.mnt / "sessions").exists()
    after = snapshot(src)
    assert after == before, snapshot_diff(before, after)
    for p in regular_files(src):
        assert os.listxattr(p) == [], p


def test_in_place_mount_shows_the_tree_and_leaves_it_untouched(tmp_path: Path) -> None:
    src = sample(tmp_path, seed=13)
    before = snapshot(src)
    src_view = view(src)
    with mounted(src) as m:  # MNT == SRC: the mount shadows the tree it serves
        assert m.mnt == src
        assert os.stat(src).st_dev != before[b""][2]  # st_dev: really the mount now
        assert view(src) == src_view, snapshot_diff(src_view, view(src))
        wait_for(lambda: set(states(m)) == {"migrated"}, 60, "every file migrated")
        _change_everything(src)
        assert view(src) != src_view
        m.remount()
        assert (src / "new-dir" / "deeper" / "new.txt").read_bytes() == b"new\n" * 1000
    after = snapshot(src)
    assert after == before, snapshot_diff(before, after)
    assert not (src / "new-dir").exists()


def test_write_survives_remount(tmp_path: Path) -> None:
    src = sample(tmp_path, sessions=5, seed=14)
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt") as m:
        idx = m.mnt / "index.json"
        old = idx.read_bytes()
        with open(idx, "r+b") as f:
            f.seek(10)
            f.write(b"XYZ")
        (m.mnt / "fresh.bin").write_bytes(bytes(range(256)) * 4096)
        m.remount()
        assert idx.read_bytes() == old[:10] + b"XYZ" + old[13:]
        assert (m.mnt / "fresh.bin").read_bytes() == bytes(range(256)) * 4096
        assert m.state(idx) == "migrated"
    assert (src / "index.json").read_bytes() == old


def _errno_of(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        return e.errno or 0
    raise AssertionError(f"{fn}{args} did not fail")


def test_names_over_255_bytes_are_enametoolong(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt") as m:
        ok = m.mnt / ("é" * 127 + "a")  # 255 bytes
        assert len(os.fsencode(ok.name)) == 255
        ok.write_bytes(b"fits")
        assert ok.read_bytes() == b"fits"
        for long in ("a" * 256, "é" * 128, "b" * 1000):
            p = m.mnt / long
            assert len(os.fsencode(long)) > 255
            assert _errno_of(os.open, p, os.O_CREAT | os.O_WRONLY, 0o644) == errno.ENAMETOOLONG
            assert _errno_of(os.mkdir, p) == errno.ENAMETOOLONG
            assert _errno_of(os.symlink, "f", p) == errno.ENAMETOOLONG
            assert _errno_of(os.link, m.mnt / "f", p) == errno.ENAMETOOLONG
            assert _errno_of(os.rename, m.mnt / "f", p) == errno.ENAMETOOLONG
            assert _errno_of(os.mkfifo, p) == errno.ENAMETOOLONG
            assert _errno_of(os.lstat, p) == errno.ENAMETOOLONG
        assert sorted(os.listdir(m.mnt)) == sorted(["f", ok.name])


def test_symlinks_pointing_out_are_links_never_followed_by_ferryfs(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"S" * 12345  # a size no real file here has
    (outside / "secret").write_bytes(secret)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "real.txt").write_bytes(b"real\n")
    (src / "d" / "also-real").write_bytes(b"also real\n" * 10)
    (src / "swapped").write_bytes(b"was a file when listed\n")
    links = {
        "abs": str(outside / "secret"),
        "rel": "../outside/secret",  # resolves the same from src and from mnt
        "d/deep-rel": "../../outside/secret",
        "dirlink": str(outside),
        "dangling": "/nonexistent/ferryfs-test",
        "inside": "real.txt",
        "dotdot": "..",
    }
    for name, target in links.items():
        os.symlink(target, src / name)
    n_real, real_bytes = 3, 5 + 100 + len(b"was a file when listed\n")
    before = snapshot(src)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(src, mnt, log_ok=r"cannot migrate inode \d+") as m:
        for name, target in links.items():
            p = m.mnt / name
            assert stat.S_ISLNK(os.lstat(p).st_mode), name
            assert os.readlink(p) == target, name
        # Following a link is the kernel's job, from the mount's side.
        assert (m.mnt / "abs").read_bytes() == secret
        assert (m.mnt / "rel").read_bytes() == secret
        assert (m.mnt / "d" / "deep-rel").read_bytes() == secret
        assert (m.mnt / "dirlink" / "secret").read_bytes() == secret
        assert (m.mnt / "inside").read_bytes() == b"real\n"
        assert not (m.mnt / "dangling").exists()
        st = m.status()
        assert st["files_total"] == n_real, st
        assert st["bytes_logical"] == real_bytes, st
        # A file swapped for a link after its directory was listed: ferryfs must refuse
        # to migrate through the link (O_NOFOLLOW), never serve the outside bytes.
        os.unlink(src / "swapped")
        os.symlink(outside / "secret", src / "swapped")
        try:
            got = (m.mnt / "swapped").read_bytes()
        except OSError as e:
            assert e.errno == errno.EIO, e
        else:
            raise AssertionError(f"read through a swapped-in link gave {got[:40]!r}")
        for p in ("real.txt", "d/also-real"):
            (m.mnt / p).read_bytes()
        # First-open migration may finish behind the read.
        wait_for(lambda: m.status()["files_migrated"] == 2, 30, "two files migrated")
        st = m.status()
        assert st["bytes_migrated"] == 5 + 100, st
        assert st["bytes_logical"] == real_bytes, st
        assert st["errors"] == 1, st
    assert (outside / "secret").read_bytes() == secret
    after = snapshot(src)
    for changed_by_this_test in (b"", b"swapped"):
        del before[changed_by_this_test], after[changed_by_this_test]
    assert after == before, snapshot_diff(before, after)


def test_fifo_in_the_tree_is_a_fifo(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe", 0o640)
    (src / "f").write_bytes(b"x")
    before = snapshot(src)
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt") as m:
        for p in (m.mnt / "pipe",):
            st = os.lstat(p)
            assert stat.S_ISFIFO(st.st_mode), oct(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o640
        os.mkfifo(m.mnt / "made-here")
        assert stat.S_ISFIFO(os.lstat(m.mnt / "made-here").st_mode)
        # A FIFO in the mount is a pipe (the kernel's), not a file ferryfs stores.
        r = os.open(m.mnt / "pipe", os.O_RDONLY | os.O_NONBLOCK)
        try:
            w = os.open(m.mnt / "pipe", os.O_WRONLY | os.O_NONBLOCK)
            os.write(w, b"through the pipe")
            os.close(w)
            assert os.read(r, 100) == b"through the pipe"
        finally:
            os.close(r)
        st = m.status()
        assert st["files_total"] == 1 and st["files_migrated"] == 0, st
        m.remount()
        assert stat.S_ISFIFO(os.lstat(m.mnt / "made-here").st_mode)
        assert stat.S_ISFIFO(os.lstat(m.mnt / "pipe").st_mode)
    assert snapshot(src) == before


def test_user_xattrs_round_trip_and_survive_remount(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "legacy.txt").write_bytes(b"legacy\n")
    before = snapshot(src)
    (tmp_path / "mnt").mkdir()
    values = {
        "user.empty": b"",
        "user.binary": bytes(range(256)),
        "user.big": os.urandom(3000),
        "user.ünïcode": "välue".encode(),
    }
    with mounted(src, tmp_path / "mnt") as m:
        new = m.mnt / "new.txt"
        new.write_bytes(b"new\n")
        targets = [m.mnt / "legacy.txt", new, m.mnt / "dir", m.mnt]
        assert m.state(m.mnt / "legacy.txt") == "legacy"
        for t in targets:
            for k, v in values.items():
                os.setxattr(t, k, v)
        assert m.state(m.mnt / "legacy.txt") == "legacy"  # xattrs do not migrate content
        for t in targets:
            for k, v in values.items():
                assert os.getxattr(t, k) == v, (t, k)
            assert set(values) <= set(os.listxattr(t)), t
        leg = m.mnt / "legacy.txt"
        assert _errno_of(os.setxattr, leg, "user.big", b"x", os.XATTR_CREATE) == errno.EEXIST
        assert _errno_of(os.setxattr, leg, "user.nope", b"x", os.XATTR_REPLACE) == errno.ENODATA
        os.setxattr(leg, "user.big", b"replaced", os.XATTR_REPLACE)
        os.removexattr(leg, "user.empty")
        assert _errno_of(os.getxattr, leg, "user.empty") == errno.ENODATA
        assert _errno_of(os.removexattr, leg, "user.empty") == errno.ENODATA
        m.remount()
        for t in targets:
            for k, v in values.items():
                if t == leg and k == "user.empty":
                    assert k not in os.listxattr(t)
                elif t == leg and k == "user.big":
                    assert os.getxattr(t, k) == b"replaced"
                else:
                    assert os.getxattr(t, k) == v, (t, k)
        assert (m.mnt / "legacy.txt").read_bytes() == b"legacy\n"
    assert snapshot(src) == before
    assert os.listxattr(src / "legacy.txt") == []


def test_state_xattr_is_read_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 100_000)
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt") as m:
        a = m.mnt / "a"
        assert m.state(a) == "legacy"
        assert _errno_of(os.setxattr, a, "user.ferryfs.state", b"migrated") == errno.EPERM
        assert _errno_of(os.removexattr, a, "user.ferryfs.state") == errno.EPERM
        assert m.state(a) == "legacy"
        assert a.read_bytes() == b"a" * 100_000
        wait_for(lambda: m.state(a) == "migrated", 30, "the file migrated after its read")
        assert _errno_of(os.setxattr, a, "user.ferryfs.state", b"legacy") == errno.EPERM
        assert m.state(a) == "migrated"


def test_first_open_close_does_not_wait_for_the_migration(tmp_path: Path) -> None:
    # close() sends FLUSH; it once waited on the file's lock, which the first-open
    # migration holds until the whole file is in the store (15 s for 1 GiB). 96 MB
    # of incompressible bytes take far longer to migrate than open+read+close.
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(1 << 20) * 96
    (src / "big").write_bytes(data)
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt") as m:
        big = m.mnt / "big"
        fd = os.open(big, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 50 << 20) == data[50 << 20 : (50 << 20) + 4096]
            dup = os.dup(fd)
            os.close(dup)  # a FLUSH while the migration runs
        finally:
            os.close(fd)
        assert m.state(big) == "legacy", "close waited for the migration"
        wait_for(lambda: m.state(big) == "migrated", 60, "the file migrated after its read")
        assert big.read_bytes() == data


def test_an_app_that_never_pauses_still_gets_its_files_migrated(tmp_path: Path) -> None:
    # First-open migrations wait for 50 ms without a request, but only so long:
    # an app polling every 10 ms once kept every file it read LEGACY for ever.
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(os.urandom(64 << 10))
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt") as m:
        files = sorted(m.mnt.iterdir())
        for f in files:
            f.read_bytes()
        deadline = time.monotonic() + 20
        while any(m.state(f) != "migrated" for f in files):
            os.listdir(m.mnt)  # a request (opendir, readdir) every ~10 ms
            assert time.monotonic() < deadline, "a busy app kept its files unmigrated"
            time.sleep(0.01)
        for f in files:
            assert f.read_bytes() == (src / f.name).read_bytes()


def test_mount_reads_ahead_1_mib(tmp_path: Path) -> None:
    # FUSE mounts start with 128 KiB of kernel read-ahead; the daemon (as root)
    # raises its own mount's, so large files are read 1 MiB per request.
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt") as m:
        dev = os.stat(m.mnt).st_dev
        knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        if os.geteuid() != 0:
            pytest.skip("only root may raise read-ahead")
        wait_for(lambda: knob.read_text().strip() == "1024", 10, "read-ahead raised to 1 MiB")


@pytest.mark.parametrize("where", ["phase3", "created"])
def test_readdir_of_5000_entries_lists_each_once(tmp_path: Path, where: str) -> None:
    src = tmp_path / "src"
    big = src / "big"
    big.mkdir(parents=True)
    names = [f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(5000)]
    if where == "phase3":
        for n in names:
            (big / n).touch()
    (tmp_path / "mnt").mkdir()
    with mounted(src, tmp_path / "mnt") as m:
        mbig = m.mnt / "big"
        if where == "created":
            for n in names:
                os.close(os.open(mbig / n, os.O_CREAT | os.O_WRONLY, 0o644))
        for _ in range(2):  # cold, then with the directory imported / cached
            listed = os.listdir(mbig)
            assert len(listed) == len(set(listed)) == 5000
            assert sorted(listed) == names
            with os.scandir(mbig) as it:
                assert sorted(e.name for e in it if e.is_file(follow_symlinks=False)) == names
        m.remount()
        listed = os.listdir(mbig)
        assert len(listed) == 5000 and sorted(listed) == names


# -- the live-mount helper itself: it must never leave a mount behind ---------------------


def _tiny(tmp_path: Path) -> tuple[Path, Path]:
    return one_file_phase3(tmp_path, "f", b"f\n")


def test_mountutil_unmounts_after_a_failing_body(tmp_path: Path) -> None:
    src, mnt = _tiny(tmp_path)
    pid = 0
    with pytest.raises(ZeroDivisionError), mounted(src, mnt) as m:
        assert m.pid is not None
        pid = m.pid
        _ = 1 / 0
    assert pid and not pid_alive(pid)
    assert not is_mounted(mnt)


def test_mountutil_fails_a_test_whose_daemon_logged_a_warning(tmp_path: Path) -> None:
    src, mnt = _tiny(tmp_path)
    with (
        pytest.raises(pytest.fail.Exception, match="warning/error line"),
        mounted(src, mnt) as m,
    ):
        os.listdir(m.mnt)
        os.unlink(src / "f")  # gone from Phase 3 after its directory was listed
        assert _errno_of((m.mnt / "f").read_bytes) == errno.EIO
    assert not is_mounted(mnt)


def test_mountutil_cleans_up_after_a_dead_daemon(tmp_path: Path) -> None:
    src, mnt = _tiny(tmp_path)
    with pytest.raises(pytest.fail.Exception, match="umount"), mounted(src, mnt) as m:
        assert m.pid is not None
        os.kill(m.pid, signal.SIGKILL)  # only the daemon this test started
        wait_for(lambda: not pid_alive(m.pid or 0), 10, "the daemon to die")
    assert not is_mounted(mnt)

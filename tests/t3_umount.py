"""`ferryfs umount` never loses what an app wrote without saying so:

- while a process has a file open (or its cwd) on the mount it refuses, exit 1,
  naming the process, and the mount keeps serving; `--lazy` detaches and the
  daemon finishes (saving the app's later writes) when the last file closes;
  `--force` unmounts now and the app gets ENOTCONN;
- while the daemon holds written bytes the store cannot take (disk full) it
  refuses naming the file, and `--force` says what was lost (so does daemon.log);
- a mount whose daemon was killed is recognised and cleaned up by `umount`, and by
  `mount` before it mounts again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.mount import (
    FULL_LOG,
    Mount,
    ferry,
    is_mounted,
    mounted,
    pid_alive,
    small_tmpfs,
    wait_for,
)

MiB = 1 << 20


def tiny(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "phase3"
    (src / "sessions").mkdir(parents=True)
    (src / "sessions" / "a.jsonl").write_text('{"n": 1}\n')
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return src, mnt


def one_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert r.returncode == code, f"exit {r.returncode}, want {code}: {r.stdout}{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


def forget_daemon(m: Mount) -> None:
    """Our daemon is gone (by design): teardown and the watchdog must not look for it."""
    m.pid = None
    if m._watchdog is not None:
        m._watchdog.cancel()
        m._watchdog = None


@contextlib.contextmanager
def unmounted_at_the_end(mnt: Path) -> Iterator[None]:
    """A test that forgets its dead daemon must still not leave its dead mount behind."""
    try:
        yield
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)


def gone(m: Mount) -> None:
    """The daemon has exited and the mount is gone: teardown has nothing to stop."""
    pid = m.pid or 0
    wait_for(lambda: not pid_alive(pid), 60, f"daemon {pid} to exit")
    wait_for(lambda: not is_mounted(m.mnt), 30, "the mount to go")
    forget_daemon(m)


@contextlib.contextmanager
def open_fd(path: Path, flags: int = os.O_WRONLY | os.O_APPEND) -> Iterator[int]:
    fd = os.open(path, flags, 0o644)
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN once forced off
            os.close(fd)


def test_umount_refuses_an_open_file_and_lazy_finishes_when_it_closes(tmp_path: Path) -> None:
    src, mnt = tiny(tmp_path)
    with mounted(src, mnt) as m, open_fd(mnt / "sessions" / "a.jsonl") as fd:
        os.write(fd, b'{"n": 2}\n')
        one_line(ferry("umount", mnt), 1, "busy", f"pid {os.getpid()}", "a.jsonl", "--lazy")
        assert is_mounted(mnt) and pid_alive(m.pid or 0), "a refused umount unmounted"
        os.write(fd, b'{"n": 3}\n')  # the app goes on as if nothing happened

        r = ferry("umount", mnt, "--lazy")
        assert r.returncode == 0 and "detached" in r.stdout, r.stdout + r.stderr
        assert not is_mounted(mnt)
        assert pid_alive(m.pid or 0), "the daemon stopped under an open file"
        os.write(fd, b'{"n": 4}\n')  # still served after the detach
        os.close(fd)
        gone(m)  # the last close lets the daemon finish
        m.start()
        assert (mnt / "sessions" / "a.jsonl").read_text() == "".join(
            f'{{"n": {i}}}\n' for i in (1, 2, 3, 4)
        )


def test_umount_force_cuts_an_open_file_off_and_keeps_what_it_wrote(tmp_path: Path) -> None:
    src, mnt = tiny(tmp_path)
    with mounted(src, mnt) as m, open_fd(mnt / "sessions" / "a.jsonl") as fd:
        os.write(fd, b'{"n": 2}\n')
        r = ferry("umount", mnt, "--force")
        assert r.returncode == 0, r.stderr
        assert f"pid {os.getpid()}" in r.stderr and "unmounted" in r.stdout
        assert not is_mounted(mnt)
        with pytest.raises(OSError) as e:
            os.write(fd, b"late\n")
        assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV), e.value
        gone(m)
        m.start()
        assert (mnt / "sessions" / "a.jsonl").read_text() == '{"n": 1}\n{"n": 2}\n'


def test_umount_refuses_while_a_process_has_its_cwd_on_the_mount(tmp_path: Path) -> None:
    src, mnt = tiny(tmp_path)
    with mounted(src, mnt):
        p = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
            cwd=mnt / "sessions",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            one_line(ferry("umount", mnt), 1, f"pid {p.pid}", "cwd")
            assert is_mounted(mnt)
        finally:
            p.kill()  # the process this test started
            p.wait(timeout=30)


def test_umount_refuses_to_drop_writes_a_full_store_cannot_take(tmp_path: Path) -> None:
    """Issue 10, item 9: 3.5 MB an app wrote and has not closed, the store full."""
    src, mnt = tiny(tmp_path)
    rng = random.Random(5)
    with small_tmpfs(tmp_path / "small", 24) as small:
        store = small / "store"
        with mounted(src, mnt, store, log_ok=FULL_LOG) as m:
            with open_fd(mnt / "filler.bin", os.O_WRONLY | os.O_CREAT) as filler:
                for _ in range(64):  # more than the tmpfs holds
                    os.write(filler, rng.randbytes(MiB))
                    try:
                        os.fsync(filler)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC, e
                        break
                else:
                    raise AssertionError("64 MiB fitted in a 24 MiB tmpfs")
            unsaved = rng.randbytes(3_500_000)
            with open_fd(mnt / "big.bin", os.O_WRONLY | os.O_CREAT) as fd:
                os.write(fd, unsaved)  # buffered in the daemon, not yet flushed
                # `sync` through the control channel fails too, not a silent success.
                with pytest.raises(OSError) as e:
                    os.setxattr(mnt, "user.ferryfs.control", b"sync")
                assert e.value.errno == errno.ENOSPC, e.value

                line = one_line(ferry("umount", mnt), 1, "big.bin", "3500000", "no space left")
                assert is_mounted(mnt) and pid_alive(m.pid or 0), line
                os.write(fd, b"more")  # the daemon keeps serving the app

                r = ferry("umount", mnt, "--force")
                assert r.returncode == 0, r.stderr
                assert "LOST" in r.stdout and "big.bin" in r.stdout, r.stdout
                assert "3500004 bytes" in r.stdout, r.stdout
                gone(m)
            assert "lost 3500004 buffered bytes" in m.new_log(), m.new_log()


def test_umount_cleans_up_after_a_killed_daemon(tmp_path: Path) -> None:
    src, mnt = tiny(tmp_path)
    with unmounted_at_the_end(mnt), mounted(src, mnt) as m:
        os.kill(m.pid or 0, signal.SIGKILL)  # the daemon this test started
        wait_for(lambda: not pid_alive(m.pid or 0), 30, "the daemon to die")
        forget_daemon(m)
        assert is_mounted(mnt)
        # Other commands say what is wrong and what to do.
        one_line(ferry("status", mnt), 1, "dead ferryfs mount", "ferryfs umount")
        r = ferry("umount", mnt)
        assert r.returncode == 0, r.stderr
        assert "cleaned up the dead ferryfs mount" in r.stdout, r.stdout
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []


def test_mount_over_a_killed_daemons_mount_cleans_it_up_and_mounts(tmp_path: Path) -> None:
    src, _mnt = tiny(tmp_path)
    with unmounted_at_the_end(src), mounted(src) as m:  # in place: SRC is the dead mount
        os.kill(m.pid or 0, signal.SIGKILL)  # the daemon this test started
        wait_for(lambda: not pid_alive(m.pid or 0), 30, "the daemon to die")
        forget_daemon(m)
        r = ferry("mount", src, src, "--store", m.store, "--no-sweep")
        assert r.returncode == 0, r.stderr
        assert "cleaned up a dead ferryfs mount" in r.stdout, r.stdout
        m.pid = int(r.stdout.rsplit("pid ", 1)[1].rstrip(")\n"))  # teardown stops it
        assert is_mounted(src)
        assert (src / "sessions" / "a.jsonl").read_text() == '{"n": 1}\n'

"""Group commit and kill -9: closes that happen together share one commit (and one
sync) on the writer, and each of them still returns only once that commit is done.
So after the daemon is killed with SIGKILL, every append whose close() returned is
in the store, and no append is there in part."""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from helpers.mount import mounted, pid_alive, wait_for

WRITERS = 8
ROUNDS = 3
# Errors an app gets from a mount whose daemon died.
GONE = {errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV, errno.EIO}


def record(who: int, n: int) -> bytes:
    """One JSON line of 40 B to 12 KiB, unique to (writer, number)."""
    return f'{{"w":{who},"n":{n},"pad":"{"x" * (n * 997 % 12_000)}"}}\n'.encode()


class Appender:
    """Appends records to its file, each by open(O_APPEND), write, close."""

    def __init__(self, who: int, path: Path) -> None:
        self.who, self.path = who, path
        self.closed = 0  # the last record whose close() returned
        self.started = 0  # the last record whose open was issued
        self.error: BaseException | None = None

    def run(self, mnt: Path, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                n = self.started + 1
                self.started = n
                fd = os.open(mnt / self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, record(self.who, n))
                finally:
                    os.close(fd)
                self.closed = n
        except OSError as e:
            if e.errno not in GONE:
                self.error = e
        except BaseException as e:
            self.error = e

    def versions(self, base: bytes) -> list[bytes]:
        """Every content the file may have after the crash: closed <= k <= started."""
        body = base + b"".join(record(self.who, n) for n in range(1, self.closed + 1))
        out = [body]
        for n in range(self.closed + 1, self.started + 1):
            body += record(self.who, n)
            out.append(body)
        return out


def busy(writers: list[Appender], n: int) -> Callable[[], bool]:
    return lambda: all(w.closed >= n or w.error is not None for w in writers)


def dead(pid: int) -> bool:
    return not pid_alive(pid)


def test_every_close_that_returned_survives_a_kill_9(tmp_path: Path) -> None:
    src, mnt, store = tmp_path / "src", tmp_path / "mnt", tmp_path / "store"
    (src / "sessions").mkdir(parents=True)
    mnt.mkdir()
    # Half the writers append to Phase 3 files (migrated by their first write), half
    # to files they create.
    base: dict[Path, bytes] = {}
    for i in range(WRITERS // 2):
        p = Path("sessions") / f"old{i}.jsonl"
        base[p] = f'{{"phase3":{i}}}\n'.encode() * (50 + 40 * i)
        (src / p).write_bytes(base[p])
    paths = [Path("sessions") / f"old{i}.jsonl" for i in range(WRITERS // 2)]
    paths += [Path("sessions") / f"new{i}.jsonl" for i in range(WRITERS - WRITERS // 2)]
    with mounted(src, mnt, store, args=("--no-sweep",)) as m:
        for rnd in range(ROUNDS):
            writers = [Appender(i, p) for i, p in enumerate(paths)]
            stop = threading.Event()
            threads = [threading.Thread(target=w.run, args=(mnt, stop)) for w in writers]
            for t in threads:
                t.start()
            try:
                # Killed while every writer is busy closing: some closes in a group.
                wait_for(busy(writers, 10 * (rnd + 1)), 120, "every writer to close ten appends")
                pid = m.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                wait_for(functools.partial(dead, pid), 30, f"daemon {pid} to die")
            finally:
                stop.set()
                for t in threads:
                    t.join(60)
            assert not any(t.is_alive() for t in threads), "a writer hung on the dead mount"
            r = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            assert r.returncode == 0, r.stderr
            if m._watchdog is not None:
                m._watchdog.cancel()
                m._watchdog = None
            m.pid = None
            m.start()
            for w in writers:
                assert w.error is None, f"writer {w.who}: {w.error!r}"
                got = (mnt / w.path).read_bytes()
                ok = w.versions(base.get(w.path, b""))
                assert got in ok, (
                    f"round {rnd}: {w.path} holds {len(got)} bytes; closed {w.closed} appends"
                    f" (a version of {len(ok[0])} bytes) and started {w.started}"
                )
                base[w.path] = got  # the next round appends to what survived

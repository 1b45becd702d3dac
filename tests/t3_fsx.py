"""Tier 3: a random-operation exerciser in the spirit of fsx, on one file in a live mount.

Reads, writes (also past EOF, leaving holes), truncates (shrink and extend), and
mmap reads and writes, each checked against an in-memory model right after it
(the touched range and the size; the whole file every few steps). Reopening the
file now and then drops the kernel's page cache, so reads reach ferryfs; a
remount in the middle and at the end checks what the store kept.

Seeded: the seed is printed, and FERRYFS_FSX_SEED=N reruns one seed.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
from collections import deque
from pathlib import Path

import pytest
from helpers.mount import Mount, mounted

MAX_LEN = 1_500_000  # a few CDC chunks (64 KiB average)
OPS = 700  # per seed: ~2000 in all with the two seeds and the two-fd run
WEIGHTS = {  # operation -> how often, as in fsx's defaults: reads and writes dominate
    "read": 20,
    "write": 25,
    "truncate": 10,
    "mapread": 10,
    "mapwrite": 12,
    "fsync": 4,
    "reopen": 6,
}


def seeds(default: list[int]) -> list[int]:
    env = os.environ.get("FERRYFS_FSX_SEED")
    return [int(env)] if env else default


class Fsx:
    """One file, its model and a history of the last operations for the failure message."""

    def __init__(self, m: Mount, name: str, rng: random.Random, model: bytes, nfds: int = 1):
        self.m = m
        self.path = m.mnt / name
        self.rng = rng
        self.model = bytearray(model)
        self.nfds = nfds
        self.fds: list[int] = []
        self.history: deque[str] = deque(maxlen=25)
        self.step = 0
        self.open()

    # -- plumbing ----------------------------------------------------------------------

    def open(self) -> None:
        self.fds = [os.open(self.path, os.O_RDWR) for _ in range(self.nfds)]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def fd(self) -> int:
        return self.rng.choice(self.fds)

    def fail(self, what: str) -> None:
        hist = "\n  ".join(self.history)
        raise AssertionError(f"step {self.step}: {what}\nlast operations:\n  {hist}")

    def pread_all(self, fd: int, n: int, off: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = os.pread(fd, n - len(out), off + len(out))
            if not b:
                break
            out += b
        return bytes(out)

    def check_range(self, off: int, n: int) -> None:
        for fd in self.fds:
            size = os.fstat(fd).st_size
            if size != len(self.model):
                self.fail(f"size {size}, model {len(self.model)}")
            got = self.pread_all(fd, n, off)
            want = bytes(self.model[off : off + n])
            if got != want:
                first = next(
                    (i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                    min(len(got), len(want)),
                )
                self.fail(
                    f"read [{off}, +{n}) differs at offset {off + first}: "
                    f"got {len(got)} bytes {got[first : first + 16]!r}, "
                    f"want {len(want)} bytes {want[first : first + 16]!r}"
                )

    def check_all(self) -> None:
        self.check_range(0, len(self.model) + 4096)

    def data(self, n: int) -> bytes:
        # Mix compressible text and random bytes, as session files and attachments do.
        if self.rng.random() < 0.5:
            return self.rng.randbytes(n)
        word = self.rng.choice([b"session ", b"chunk ", b"\x00\x00\x00\x00", b'{"k": 1}\n'])
        return (word * (n // len(word) + 1))[:n]

    def length(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randint(1, 4096)
        if r < 0.95:
            return self.rng.randint(1, 70_000)
        return self.rng.randint(70_000, 300_000)

    # -- operations ------------------------------------------------------------------

    def op_read(self) -> tuple[int, int]:
        size = len(self.model)
        off = self.rng.randint(0, size + 100) if size else 0
        n = self.length()
        self.history.append(f"read {off} +{n}")
        fd = self.fd()
        got = self.pread_all(fd, n, off)
        if got != bytes(self.model[off : off + n]):
            self.fail(f"read {off} +{n} returned {len(got)} bytes that differ from the model")
        return off, n

    def op_write(self) -> tuple[int, int]:
        size = len(self.model)
        n = self.length()
        if self.rng.random() < 0.15:  # past EOF: a hole
            off = size + self.rng.randint(1, 200_000)
        else:
            off = self.rng.randint(0, max(size, 1))
        if off + n > MAX_LEN:
            off = max(0, MAX_LEN - n - self.rng.randint(0, 1000))
        buf = self.data(n)
        self.history.append(f"write {off} +{n} (size {size})")
        if os.pwrite(self.fd(), buf, off) != n:
            self.fail("short write")
        if off > size:
            self.model.extend(bytes(off - size))
        self.model[off : off + n] = buf
        return max(0, min(off, size) - 10), n + (off - min(off, size)) + 20

    def op_truncate(self) -> tuple[int, int]:
        size = len(self.model)
        if self.rng.random() < 0.5:
            new = self.rng.randint(0, size)
        else:
            new = self.rng.randint(size, min(MAX_LEN, size + 300_000))
        self.history.append(f"truncate {size} -> {new}")
        if self.rng.random() < 0.5:
            os.ftruncate(self.fd(), new)
        else:
            os.truncate(self.path, new)
        if new < size:
            del self.model[new:]
        else:
            self.model.extend(bytes(new - size))
        lo = min(size, new)
        return max(0, lo - 100), abs(new - size) + 200

    def _map_span(self) -> tuple[mmap.mmap, int, int] | None:
        """The file mapped whole, and a random span of it: (map, offset, length);
        None when the file is empty (a zero-length map is refused)."""
        size = len(self.model)
        if size == 0:
            return None
        mm = mmap.mmap(self.fd(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        off = self.rng.randrange(size)
        return mm, off, min(self.length(), size - off)

    def op_mapread(self) -> tuple[int, int]:
        span = self._map_span()
        if span is None:
            return self.op_write()
        mm, off, n = span
        self.history.append(f"mapread {off} +{n}")
        with mm:
            got = mm[off : off + n]
        if got != bytes(self.model[off : off + n]):
            self.fail(f"mapread {off} +{n} differs from the model")
        return off, n

    def op_mapwrite(self) -> tuple[int, int]:
        span = self._map_span()
        if span is None:
            return self.op_write()
        mm, off, n = span
        buf = self.data(n)
        self.history.append(f"mapwrite {off} +{n}")
        with mm:
            mm[off : off + n] = buf
            mm.flush()
        self.model[off : off + n] = buf
        return off, n

    def op_fsync(self) -> tuple[int, int]:
        self.history.append("fsync")
        os.fsync(self.fd())
        return 0, 0

    def op_reopen(self) -> tuple[int, int]:
        # A new open of a changed file gets no keep_cache: the reads reach ferryfs.
        self.history.append("close and reopen")
        self.close()
        self.open()
        self.check_all()
        return 0, 0

    def run(self, ops: int) -> None:
        names = list(WEIGHTS)
        weights = list(WEIGHTS.values())
        for _ in range(ops):
            self.step += 1
            name = self.rng.choices(names, weights)[0]
            off, n = getattr(self, f"op_{name}")()
            self.check_range(off, n)
            if self.step % 50 == 0:
                self.check_all()

    def remount(self) -> None:
        self.history.append("remount")
        self.close()
        self.m.remount()
        self.open()
        self.check_all()
        if os.getxattr(self.path, "user.ferryfs.state") != b"migrated":
            self.fail("not migrated after being written")


def _phase3(tmp_path: Path, seed: int) -> tuple[Path, Path, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    initial = random.Random(seed).randbytes(400_000) + b"tail of a Phase 3 file\n" * 5000
    (src / "legacy.bin").write_bytes(initial)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return src, mnt, initial


@pytest.mark.parametrize("seed", seeds([20260101, 4242]))
def test_fsx_one_file(tmp_path: Path, seed: int) -> None:
    print(f"fsx seed {seed} (rerun with FERRYFS_FSX_SEED={seed})")
    src, mnt, initial = _phase3(tmp_path, seed)
    rng = random.Random(seed)
    with mounted(src, mnt) as m:
        # One seed starts from a LEGACY Phase 3 file, the other from a new empty one.
        if seed % 2 == 0:
            name, model = "new.bin", b""
            (m.mnt / name).touch()
        else:
            name, model = "legacy.bin", initial
            assert m.state(m.mnt / name) == "legacy"
        fsx = Fsx(m, name, rng, model)
        try:
            fsx.check_all()
            fsx.run(OPS // 2)
            fsx.remount()
            fsx.run(OPS - OPS // 2)
            fsx.check_all()
            fsx.remount()
        finally:
            fsx.close()
    assert (src / "legacy.bin").read_bytes() == initial


def test_fsx_two_fds_on_one_file(tmp_path: Path) -> None:
    (seed,) = seeds([777])
    print(f"fsx seed {seed} (rerun with FERRYFS_FSX_SEED={seed})")
    src, mnt, initial = _phase3(tmp_path, seed)
    rng = random.Random(seed)
    with mounted(src, mnt) as m:
        fsx = Fsx(m, "legacy.bin", rng, initial, nfds=2)
        try:
            fsx.run(300)
            fsx.remount()
            fsx.run(300)
            fsx.remount()
        finally:
            fsx.close()
    assert (src / "legacy.bin").read_bytes() == initial


def test_size_seen_by_stat_never_goes_back_during_a_flush(tmp_path: Path) -> None:
    """stat from other threads while big writes are flushed: the size a completed
    write made must never be answered smaller (the kernel would believe it)."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    with mounted(src, mnt) as m:
        path = m.mnt / "growing.bin"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        stop = threading.Event()

        def stat_forever() -> None:
            while not stop.is_set():
                os.stat(path)

        threads = [threading.Thread(target=stat_forever) for _ in range(2)]
        for t in threads:
            t.start()
        size, wrong = 0, []
        block = random.Random(5).randbytes(4_000_001)  # big: flushed in a worker thread
        try:
            for i in range(16):
                os.write(fd, block)
                size += len(block)
                if i % 2:
                    os.pread(fd, 100, size - 50)  # a read of the partial last page flushes
                else:
                    os.fsync(fd)
                seen = (os.fstat(fd).st_size, os.stat(path).st_size)
                if seen != (size, size):
                    wrong.append((i, size, seen))
        finally:
            stop.set()
            for t in threads:
                t.join()
            os.close(fd)
        assert not wrong, f"(step, size written, sizes seen): {wrong}"

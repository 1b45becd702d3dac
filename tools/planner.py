"""The migration estimate behind `ferryfs plan`: walk a Phase 3 tree, sample its
content, and predict what `ferryfs migrate` would store, take and need, writing
nothing anywhere.

Owns three things:

- the walk: `os.scandir` on directory fds opened with `O_NOFOLLOW` relative to
  their parent, so no symlink (even one swapped in mid-walk) is ever followed;
  symlinks, FIFOs/sockets/devices and unreadable entries are counted, never opened;
- the sample: a deterministic, evenly spread set of whole files chosen in one pass
  with bounded memory (see `_Sampler`);
- the measurement: the sample goes through the same `Chunker`, `digest` and
  `codec.encode` as migration, on as many threads as `migrate` uses by default,
  which gives the dedup and compression ratios and a throughput.

Nothing is written: no cache, no store, and files are opened with `O_NOATIME`
where the kernel allows it so that even access times stay put.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import BinaryIO, cast

from ferryfs.store import codec
from ferryfs.store.chunker import Chunker, digest
from ferryfs.store.errors import FerryError

DEFAULT_SAMPLE_BYTES = 64 * 10**6

# "Disk needed" is the compressed chunk bytes plus what LMDB adds around them:
# - 10%: B+tree pages split half full, and MVCC keeps freed pages on its
#   freelist until no reader needs them;
# - half a 4 KiB page per chunk too big for a leaf page (a node over
#   (4096 - 16) / 2 - 2 bytes, with its 8-byte header and 32-byte key: a record
#   over about 2 KB, so nearly every compressed 16-256 KiB chunk). Such a value
#   lives in whole overflow pages, wasting half of the last one on average;
#   smaller records (tiny files) share leaf pages;
# - about 1 KiB per file, directory or link for its inode, dirent, extent and
#   Phase 3 records (8,000 tiny files made an 8.8 MB store around 0.8 MB of
#   chunks), which dominates for trees of small files.
LMDB_OVERHEAD = 0.10
PER_ENTRY = 1024
PAGE_SIZE = 4096
OVERFLOW_OVER = (PAGE_SIZE - 16) // 2 - 2 - 8 - 32
WASTE_PER_CHUNK = PAGE_SIZE // 2

# What the sample cannot measure without writing: starting the command and
# opening the store, the LMDB records and commit share of each file, and
# writing the stored bytes out. Calibrated on a 2-CPU VM (ext4 on a virtio disk)
# (`python -m ferryfs.tools.bench` prints plan's estimate beside the measured
# time, so a drift shows); a slow disk makes the last one optimistic.
STARTUP_SECONDS = 0.3
STORE_SECONDS_PER_FILE = 0.2e-3
STORE_WRITE_RATE = 150e6  # stored bytes per second

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NOATIME = getattr(os, "O_NOATIME", 0)


class SourceNotDirectory(FerryError):
    """SRC is missing, not a directory, or cannot be listed."""

    exit_code = 2


class BadSampleSize(FerryError):
    exit_code = 2


@dataclass
class Plan:
    """The estimate. Byte counts are logical (what the app sees) unless named stored.

    `files`/`bytes` count regular files the planner could read; hard links count
    once per name. `dirs` includes SRC itself, as `ferryfs stats` does. When only
    part of the tree is sampled, dedup between sampled and unsampled files is not
    seen, so the ratios are lower bounds and `est_stored_bytes` an upper bound.
    """

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    symlinks: int = 0
    special: int = 0
    unreadable: int = 0
    # Mount points of other filesystems inside SRC: not crossed (`find -xdev`);
    # the mount shows each as an empty directory.
    other_filesystems: list[str] = field(default_factory=list)
    sampled_files: int = 0
    sampled_bytes: int = 0
    dedup_ratio: float = 1.0
    compression_ratio: float = 1.0
    est_stored_bytes: int = 0
    est_chunks: int = 0
    est_overflow_chunks: int = 0  # those in overflow pages (see OVERFLOW_OVER)
    est_seconds: float = 0.0
    disk_needed: int = 0
    disk_free: int = 0
    fits: bool = True
    store: str = ""
    jobs: int = 1

    def as_json(self) -> dict[str, object]:
        d: dict[str, object] = asdict(self)
        d["dedup_ratio"] = round(self.dedup_ratio, 4)
        d["compression_ratio"] = round(self.compression_ratio, 4)
        d["est_seconds"] = round(self.est_seconds, 2)
        return d


@dataclass
class _Counts:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    symlinks: int = 0
    special: int = 0
    unreadable: int = 0
    other_filesystems: list[str] = field(default_factory=list)


class _Sampler:
    """A systematic sample of files in walk order, chosen in one pass.

    The stream of file bytes is cut into cells of `cell` bytes; a file belongs to
    the cell where it starts, and the files of every `stride`-th cell are kept.
    Whenever the kept bytes exceed the budget the stride doubles, which keeps a
    subset of what was kept, so memory stays bounded by the budget and the result
    does not depend on when the doubling happened. Every file is kept with the
    same chance whatever its size, and kept files come in runs of neighbours
    (same session directory, same month), where resumed copies of a session
    usually sit, so their shared chunks show up as dedup. A tree within the
    budget is sampled whole.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.cell = max(budget // 64, 16 * 1024)  # 32 to 64 runs
        self.stride = 1
        self.pos = 0
        self.kept: list[tuple[int, bytes, int, int]] = []  # (cell, path, size, bytes to read)
        self.kept_bytes = 0

    def offer(self, path: bytes, size: int) -> None:
        cell = self.pos // self.cell
        self.pos += size
        if cell % self.stride:
            return
        # A file larger than the whole budget is read up to the budget only.
        take = min(size, self.budget)
        self.kept.append((cell, path, size, take))
        self.kept_bytes += take
        while self.kept_bytes > self.budget and len(self.kept) > 1:
            self.stride *= 2
            self.kept = [k for k in self.kept if k[0] % self.stride == 0]
            self.kept_bytes = sum(k[3] for k in self.kept)

    def files(self) -> list[tuple[bytes, int, int]]:
        """(path, size, bytes to read) of each kept file, in walk order."""
        return [(p, n, take) for _, p, n, take in self.kept]


def plan(
    src: str,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    store: str | None = None,
    jobs: int | None = None,
) -> Plan:
    """Walk `src`, sample up to `sample_bytes` of it, and estimate the migration into
    `store` (default: `SRC.ferry` beside SRC, as `ferryfs migrate` does)."""
    if sample_bytes <= 0:
        raise BadSampleSize("--sample-mb must be more than 0")
    jobs = jobs or os.cpu_count() or 2
    root_fd = _open_root(src)
    try:
        t0 = time.monotonic()
        counts = _Counts()
        sampler = _Sampler(sample_bytes)
        _walk(root_fd, counts, sampler)
        walk_seconds = time.monotonic() - t0
        sample = _measure(root_fd, sampler.files(), jobs)
    finally:
        os.close(root_fd)

    p = Plan(**asdict(counts))
    p.jobs = jobs
    p.files -= sample.failed
    p.bytes -= sample.failed_bytes
    p.unreadable += sample.failed
    p.sampled_files = sample.files
    p.sampled_bytes = sample.total
    if sample.total:
        p.dedup_ratio = sample.total / sample.unique if sample.unique else 1.0
        p.compression_ratio = sample.unique / sample.stored if sample.stored else 1.0
        scale = p.bytes / sample.total
        p.est_stored_bytes = round(sample.stored * scale)
        p.est_chunks = round(sample.chunks * scale)
        p.est_overflow_chunks = round(sample.overflow * scale)
        # Migration does the sampled work for every byte.
        p.est_seconds = sample.seconds * scale
    # It walks the tree too (importing every entry), and the store adds its share.
    p.est_seconds += (
        walk_seconds
        + STARTUP_SECONDS
        + p.files * STORE_SECONDS_PER_FILE
        + p.est_stored_bytes / STORE_WRITE_RATE
    )
    entries = p.files + p.dirs + p.symlinks
    p.disk_needed = (
        round(p.est_stored_bytes * (1 + LMDB_OVERHEAD))
        + p.est_overflow_chunks * WASTE_PER_CHUNK
        + entries * PER_ENTRY
    )
    p.store = os.path.abspath(store) if store else os.path.abspath(src).rstrip("/") + ".ferry"
    p.disk_free = free_bytes(p.store)
    p.fits = p.disk_needed <= p.disk_free
    return p


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem that would hold
    `path` (its nearest existing ancestor: the store does not exist yet)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def _open_root(src: str) -> int:
    try:
        return os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceNotDirectory(f"source {src} does not exist") from None
    except NotADirectoryError:
        raise SourceNotDirectory(f"source {src} is not a directory") from None
    except PermissionError:
        raise SourceNotDirectory(f"source {src} is not readable (permission denied)") from None


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _walk(root_fd: int, counts: _Counts, sampler: _Sampler) -> None:
    """Depth first, names in byte order (so the sample is the same on every run),
    a directory's files before its subdirectories. Holds one fd per level. Does
    not cross into other filesystems mounted inside (as `find -xdev`)."""
    stack: list[tuple[int, bytes, Iterator[bytes]]] = []
    dev = os.fstat(root_fd).st_dev
    fd = os.dup(root_fd)
    counts.dirs += 1
    stack.append((fd, b"", iter(_list(fd, b"", counts, sampler))))
    while stack:
        fd, rel, subdirs = stack[-1]
        name = next(subdirs, None)
        if name is None:
            os.close(fd)
            stack.pop()
            continue
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a symlink since the listing
                counts.symlinks += 1
            elif e.errno not in (errno.ENOENT, errno.ENOTDIR):
                counts.unreadable += 1  # EACCES, EMFILE from a very deep tree, ...
            continue
        counts.dirs += 1
        path = _join(rel, name)
        if os.fstat(child).st_dev != dev:
            os.close(child)
            counts.other_filesystems.append(os.fsdecode(path))
            continue
        stack.append((child, path, iter(_list(child, path, counts, sampler))))


def _list(fd: int, rel: bytes, counts: _Counts, sampler: _Sampler) -> list[bytes]:
    """Count the entries of the directory at `fd` and offer its files to the
    sampler; return its subdirectory names, sorted."""
    try:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
    except OSError:
        counts.unreadable += 1
        return []
    subdirs: list[bytes] = []
    for e in entries:
        name = os.fsencode(e.name)
        try:
            if e.is_symlink():
                counts.symlinks += 1
            elif e.is_dir(follow_symlinks=False):
                subdirs.append(name)
            elif e.is_file(follow_symlinks=False):
                size = e.stat(follow_symlinks=False).st_size
                if not _readable(name, fd):
                    counts.unreadable += 1
                    continue
                counts.files += 1
                counts.bytes += size
                sampler.offer(_join(rel, name), size)
            else:
                counts.special += 1
        except FileNotFoundError:
            continue  # vanished since the listing
        except OSError:
            counts.unreadable += 1
    return subdirs


def _readable(name: bytes, dir_fd: int) -> bool:
    # faccessat with the effective ids: a permission check without opening.
    try:
        return os.access(
            name,
            os.R_OK,
            dir_fd=dir_fd,
            effective_ids=os.access in os.supports_effective_ids,
            follow_symlinks=False,
        )
    except (NotImplementedError, OSError):
        return True  # cannot tell here; opening it when sampled will say


@dataclass
class _Sample:
    files: int = 0
    total: int = 0  # plain bytes of every chunk
    unique: int = 0  # plain bytes of distinct chunks
    stored: int = 0  # record bytes of distinct chunks (codec.encode)
    chunks: int = 0  # distinct chunks
    overflow: int = 0  # distinct chunks whose record needs LMDB overflow pages
    seconds: float = 0.0
    failed: int = 0  # sampled files that could not be opened or read
    failed_bytes: int = 0
    seen: set[bytes] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _measure(root_fd: int, files: list[tuple[bytes, int, int]], jobs: int) -> _Sample:
    """Chunk, hash and compress `files` on `jobs` threads, as migration does."""
    s = _Sample()
    chunker = Chunker()

    def one(path: bytes, size: int, limit: int) -> None:
        try:
            fd = _open_beneath(root_fd, path)
        except OSError:
            with s.lock:
                s.failed += 1
                s.failed_bytes += size
            return
        total = unique = stored = chunks = overflow = 0
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                for piece in chunker.stream(cast(BinaryIO, _Limited(f, limit))):
                    d = digest(piece)
                    total += len(piece)
                    with s.lock:
                        new = d not in s.seen
                        s.seen.add(d)
                    if new:
                        record = len(codec.encode(piece))
                        unique += len(piece)
                        stored += record
                        chunks += 1
                        overflow += record > OVERFLOW_OVER
        except OSError:
            with s.lock:
                s.failed += 1
                s.failed_bytes += size
            return
        with s.lock:
            s.files += 1
            s.total += total
            s.unique += unique
            s.stored += stored
            s.chunks += chunks
            s.overflow += overflow

    t0 = time.monotonic()
    with ThreadPoolExecutor(jobs) as pool:
        for fut in [pool.submit(one, p, n, take) for p, n, take in files]:
            fut.result()
    s.seconds = time.monotonic() - t0
    s.seen.clear()
    return s


def _open_beneath(root_fd: int, path: bytes) -> int:
    """A read fd of the regular file at `path` under `root_fd`, opened component by
    component with O_NOFOLLOW: a symlink anywhere raises ELOOP instead of leading
    out of the tree, and O_NONBLOCK keeps a FIFO swapped in from hanging us."""
    parts = path.split(b"/")
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        try:
            ffd = os.open(parts[-1], _FILE_FLAGS | _NOATIME, dir_fd=fd)
        except PermissionError:
            # O_NOATIME needs the file's owner (or CAP_FOWNER); read without it.
            ffd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return ffd


class _Limited:
    """A raw file whose `readinto` stops after `limit` bytes."""

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self.f = f
        self.left = limit

    def readinto(self, b: memoryview) -> int:
        if self.left <= 0:
            return 0
        view = b[: self.left] if len(b) > self.left else b
        n: int | None = self.f.readinto(view)  # type: ignore[attr-defined]
        self.left -= n or 0
        return n or 0

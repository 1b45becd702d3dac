"""Helpers shared by the store tests: writing and snapshotting Phase 3 trees, a walk of a store's
namespace, and a checker of the store's invariants read straight from the
backend (independent of the code that maintains them)."""

from __future__ import annotations

import os
import signal
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ferryfs.store import cas
from ferryfs.store import namespace as ns
from ferryfs.store.kv import Txn
from ferryfs.store.records import HOLE, ROOT_INO, STORED, U64, Inode, unpack_extent
from ferryfs.store.store import Store

from helpers.damage import chunk_damaged

T = TypeVar("T")
StatRow = tuple[int, int, int, int, int, int, int, int, int]


def write_files(top: bytes, files: dict[bytes, bytes], hard: tuple[bytes, bytes]) -> None:
    """Write `files` (path relative to `top` -> content) under `top`, making the
    directories they need, then hard-link `hard[0]` to the file `hard[1]`."""
    for rel, data in files.items():
        p = os.path.join(top, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.link(os.path.join(top, hard[1]), os.path.join(top, hard[0]))


def stat_row(st: os.stat_result) -> StatRow:
    """What must not change in a Phase 3 entry (atime aside: reading moves it)."""
    return (
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
        st.st_nlink,
        st.st_rdev,
    )


def preorder(first: T, children: Callable[[T], Iterator[T]]) -> None:
    """Visit `first`, then depth first what `children(node)` yields, in that order,
    with an explicit stack: trees deeper than Python's recursion limit (a chain of
    1,500 directories is in these tests) walk as any other. `children` runs lazily,
    so it may do its own work on a node before yielding that node's children."""
    stack = [children(first)]
    while stack:
        nxt = next(stack[-1], None)
        if nxt is None:
            stack.pop()
        else:
            stack.append(children(nxt))


def tree_rows(
    root: Path | str | bytes, row: Callable[[bytes, os.stat_result], T]
) -> dict[bytes, T]:
    """`row(path, lstat)` of every entry under `root` (root included, as b""), by
    path relative to `root`, in name order; never follows a link. The one walk of a
    plain tree behind both snapshots (here and in mountutil)."""
    top = os.fsencode(root)
    out: dict[bytes, T] = {}

    def visit(rel: bytes) -> Iterator[bytes]:
        path = os.path.join(top, rel) if rel else top
        st = os.lstat(path)
        out[rel] = row(path, st)
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                yield os.path.join(rel, name) if rel else name

    preorder(b"", visit)
    return out


def snapshot(root: Path | str) -> dict[bytes, tuple[StatRow, bytes]]:
    """Every entry under `root` (root included, as b"") with its stat and its content
    (regular files), target (symlinks) or nothing; never follows a link or opens a FIFO."""

    def row(path: bytes, st: os.stat_result) -> tuple[StatRow, bytes]:
        body = b""
        if stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                body = f.read()
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(path)
        return stat_row(st), body

    return tree_rows(root, row)


@dataclass(frozen=True)
class Entry:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    nlink: int
    body: bytes  # content (files) or target (symlinks)


def walk_store(store: Store, read: bool = True) -> dict[bytes, Entry]:
    """Every entry reachable from the root by path, with its content if `read`."""
    out: dict[bytes, Entry] = {}

    def visit(dir_: tuple[int, bytes]) -> Iterator[tuple[int, bytes]]:
        ino, rel = dir_
        after = 0
        while batch := store.readdir(ino, after, limit=100):
            for cookie, name, node in batch:
                path = rel + b"/" + name if rel else name
                body = b""
                if node.is_reg and read:
                    body = store.read(node.ino, 0, node.size + 1)
                    node = store.getattr(node.ino)
                elif node.is_link:
                    body = store.readlink(node.ino)
                out[path] = Entry(
                    node.ino,
                    node.mode,
                    node.uid,
                    node.gid,
                    node.size,
                    node.mtime_ns,
                    node.nlink,
                    body,
                )
                if node.is_dir:
                    yield node.ino, path
                after = cookie

    preorder((ROOT_INO, b""), visit)
    return out


def store_entries(txn: Txn) -> list[tuple[str, Inode]]:
    """(path relative to the root, inode) of every entry the namespace tables list,
    depth first, read in one transaction without the store's own walks (an UNLISTED
    directory is yielded, and lists nothing)."""
    out: list[tuple[str, Inode]] = []

    def visit(dir_: tuple[int, str]) -> Iterator[tuple[int, str]]:
        ino, rel = dir_
        for _cookie, name, c in ns.entries(txn, ino):
            node = ns.get(txn, c)
            path = f"{rel}/{os.fsdecode(name)}" if rel else os.fsdecode(name)
            out.append((path, node))
            if node.is_dir:
                yield c, path

    preorder((ROOT_INO, ""), visit)
    return out


@dataclass
class Raw:
    """The store's databases as plain Python values."""

    inodes: dict[int, Inode]
    dirents: list[tuple[int, bytes, int]]
    extents: dict[int, list[tuple[int, bytes, int]]]
    refs: dict[bytes, int]
    chunks: dict[bytes, bytes]
    pending: set[bytes]
    orphans: set[int]


def raw(store: Store) -> Raw:
    with store.backend.read() as txn:
        inodes = {
            U64.unpack(k)[0]: Inode.unpack(U64.unpack(k)[0], v) for k, v in txn.range("inodes", b"")
        }
        dirents = [
            (U64.unpack_from(k, 0)[0], bytes(k[16:]), U64.unpack(v)[0])
            for k, v in txn.range("dirents", b"")
        ]
        extents: dict[int, list[tuple[int, bytes, int]]] = {}
        for k, v in txn.range("extents", b""):
            extents.setdefault(U64.unpack_from(k, 0)[0], []).append(unpack_extent(k, v))
        refs = {bytes(k): U64.unpack(v)[0] for k, v in txn.range("refs", b"")}
        chunks = {bytes(k): bytes(cas.record(txn, k) or b"") for k, _ in txn.range("chunks", b"")}
        pending = {bytes(k) for k, _ in txn.range("pending", b"")}
        orphans = {U64.unpack_from(k, 7)[0] for k, _ in txn.range("meta", b"orphan:", b"orphan;")}
    return Raw(inodes, dirents, extents, refs, chunks, pending, orphans)


def check_invariants(store: Store, deep: bool = False) -> Raw:
    """Assert the store's invariants 1-3 (and 4 if `deep`); returns what it read.

    Link counts are checked only where every entry is known: a file's nlink
    against the dirents naming it, a LISTED directory's against its subdirectories.
    """
    r = raw(store)
    problems: list[str] = []
    names = Counter(c for _, _, c in r.dirents)
    subdirs: Counter[int] = Counter()
    for parent, name, c in r.dirents:
        if parent not in r.inodes or not r.inodes[parent].is_dir:
            problems.append(f"dirent {name!r} in non-directory {parent}")
        if c not in r.inodes:
            problems.append(f"dirent {name!r} -> missing inode {c}")
            continue
        if r.inodes[c].is_dir:
            subdirs[parent] += 1
            if r.inodes[c].parent != parent:
                problems.append(f"dir {c} has parent {r.inodes[c].parent}, listed in {parent}")
    for ino, node in r.inodes.items():
        if ino != ROOT_INO and names[ino] == 0 and ino not in r.orphans:
            problems.append(f"inode {ino} unreachable")
        if node.is_dir:
            if node.flags & STORED and node.nlink != 2 + subdirs[ino]:
                problems.append(f"dir {ino} nlink {node.nlink} != {2 + subdirs[ino]}")
        elif node.nlink != names[ino]:
            problems.append(f"inode {ino} nlink {node.nlink} != {names[ino]} dirents")
    named: Counter[bytes] = Counter()
    for ino, exts in r.extents.items():
        node = r.inodes.get(ino)
        if node is None or not node.is_reg or not node.stored:
            problems.append(f"extents for inode {ino} which has no stored content")
            continue
        pos = 0
        for off, d, n in exts:
            if off != pos or n <= 0:
                problems.append(f"inode {ino}: extent at {off} (len {n}), expected {pos}")
            pos = off + n
            if d != HOLE:
                named[d] += 1
        if pos != node.size:
            problems.append(f"inode {ino}: extents end at {pos}, size {node.size}")
    for ino, node in r.inodes.items():
        if node.is_reg and node.stored and node.size and ino not in r.extents:
            problems.append(f"inode {ino}: size {node.size} without extents")
    if dict(named) != r.refs:
        diff = {
            d.hex()[:12]: (named.get(d), r.refs.get(d))
            for d in set(named) | set(r.refs)
            if named.get(d) != r.refs.get(d)
        }
        problems.append(f"refs differ from extents (named, refs): {diff}")
    for d in r.refs:
        if d not in r.chunks:
            problems.append(f"ref to missing chunk {d.hex()[:12]}")
    for d in r.chunks:
        if d not in r.refs and d not in r.pending:
            problems.append(f"orphan chunk {d.hex()[:12]}")
    if deep:
        problems += [
            f"damaged chunk {d.hex()[:12]}" for d, rec in r.chunks.items() if chunk_damaged(d, rec)
        ]
    assert not problems, "\n".join(problems)
    return r


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (rather than hang) if the block takes longer than `seconds`."""

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def free_last_pages(env_dir: Path) -> tuple[int, int]:
    """Write and free two large values so the last pages of the LMDB environment in
    `env_dir` are on the freelist, never written (LMDB leaves pages unwritten that
    the transaction which allocated them freed), so data.mdb ends before the meta
    page's last page. Through LMDB alone (LmdbBackend would extend the file after the
    commit). Returns the file's size and the size the meta page names."""
    import lmdb
    from ferryfs.store.kv import DBS

    env = lmdb.open(str(env_dir), max_dbs=len(DBS) + 1, map_size=1 << 30)
    try:
        refs = env.open_db(b"refs", create=False)
        with env.begin(write=True) as txn:
            txn.put(b"\xff-first", b"x" * (1 << 20), db=refs)
        with env.begin(write=True) as txn:
            txn.put(b"\xff-second", b"y" * (1 << 20), db=refs)
            txn.delete(b"\xff-first", db=refs)
            txn.delete(b"\xff-second", db=refs)
        need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
        env.close()
    return (Path(env_dir) / "data.mdb").stat().st_size, need


def make_chain(root: Path, depth: int, file_every: int = 0) -> list[bytes]:
    """Directories `d` nested `depth` deep under `root`, made through directory fds
    (a path that long would pass PATH_MAX), with a file `f` holding b"level N\\n" at
    every `file_every`th level N counted from 0 (none if 0). The chain's components."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            if file_every and level % file_every == 0:
                f = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(f, b"level %d\n" % level)
                os.close(f)
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    return [b"d"] * depth


class SparseFile:
    """A file's expected content: its size and its pages holding written bytes
    (everything else is zeros), so a hole of 100 GiB costs nothing."""

    PAGE = 4096

    def __init__(self, data: bytes = b"") -> None:
        self.size = 0
        self.pages: dict[int, bytearray] = {}
        self.write(0, data)

    def write(self, off: int, data: bytes) -> None:
        page = self.PAGE
        pos = off
        while pos < off + len(data):
            p, at = divmod(pos, page)
            n = min(page - at, off + len(data) - pos)
            self.pages.setdefault(p, bytearray(page))[at : at + n] = data[pos - off : pos - off + n]
            pos += n
        if data:
            self.size = max(self.size, off + len(data))

    def truncate(self, size: int) -> None:
        page = self.PAGE
        if size < self.size:
            for p in [p for p in self.pages if p * page >= size]:
                del self.pages[p]
            last = self.pages.get(size // page)
            if last is not None:
                last[size % page :] = bytes(page - size % page)
        self.size = size

    def read(self, off: int, n: int) -> bytes:
        page = self.PAGE
        end = min(self.size, off + n)
        if off >= end:
            return b""
        out = bytearray(end - off)
        for p in range(off // page, (end - 1) // page + 1):
            got = self.pages.get(p)
            if got is not None:
                a, b = max(off, p * page), min(end, (p + 1) * page)
                out[a - off : b - off] = got[a - p * page : b - p * page]
        return bytes(out)

    def zeros_in(self, off: int, n: int) -> bool:
        """Whether [off, off+n) holds only zeros (without building it)."""
        page = self.PAGE
        for p, got in self.pages.items():
            a, b = max(off, p * page), min(off + n, (p + 1) * page)
            if a < b and any(got[a - p * page : b - p * page]):
                return False
        return True

    def written(self) -> int:
        return len(self.pages) * self.PAGE


DATA = Path(__file__).parent.parent / "data"


def migrate_everything(s: Store) -> None:
    """Import the whole Phase 3 tree and migrate every LEGACY file, one by one."""
    s.import_all()
    with s.backend.read() as txn:
        inos = [U64.unpack(k)[0] for k, _v in txn.range("inodes", b"")]
    for ino in inos:
        if s.getattr(ino).is_legacy:
            s.migrate(ino)


def schema1_store(tmp_path: Path) -> tuple[Path, Path]:
    """The store written before packs (schema 1, by a3f786f's code) unpacked from
    tests/data: (its Phase 3 tree, its store)."""
    with tarfile.open(DATA / "store-a3f786f.tar.xz") as t:
        # The "data" filter where this Python has it (3.11.4 on; Debian 12 has 3.11.2).
        t.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    for root, _dirs, files in os.walk(tmp_path / "store"):
        os.chmod(root, 0o700)
        for f in files:
            os.chmod(os.path.join(root, f), 0o600)
    return tmp_path / "src", tmp_path / "store"

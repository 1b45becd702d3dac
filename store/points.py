"""Rollback points: what the Phase 3 tree was when the store began, and how long
that promise is kept.

A point is a header and a manifest, both in the `points` db under three key
prefixes (so listing points never walks a manifest):

    b"N"                                next point id (U64; ids are never reused)
    b"P" + U64(id)                      header, JSON: created_ns, retention_days,
                                        complete, entries, files, bytes, name
    b"M" + U64(id) + b"/" + path        one manifest row per Phase 3 entry; `path`
                                        is relative to the tree's root (b"" the root)
    b"M" + U64(id) + b"#" + blake2b(path)   the same for a path too long for an
                                        LMDB key (511 bytes); the value then ends
                                        with the path

A row is the entry's lstat when the point was made: size, mtime_ns, ctime_ns,
st_ino, st_mode. A million-file tree is a million small rows, written about
4096 to a transaction. The rows do not hold blake3: a file's hash is known once
it is migrated and lives in its `legacy` record, which names the same path;
verify joins the two by path and uses the hash only when the legacy stat (what
the migration read) equals the row (what the point recorded).

Recording walks the whole tree once, through `Phase3Tree` (never following a
symlink). A point is `complete` only when the walk finished; a crash leaves it
incomplete and the next `ensure_first_point` records it again from scratch.
Cost: about 80,000 entries a second on the bench machine, paid once, by the
first `migrate` or `mount`.

`create_point` records another point on demand (`ferryfs points create`, the
report's `createRollbackPoint(name, retentionDays)`), with its own name and
retention. The Phase 3 tree is frozen, so a later point records the same tree:
what it adds is a promise kept longer, since the Phase 3 data is released only
once every point has expired.

`release.py` deletes the Phase 3 data once every point has expired.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import blake2b

from .errors import NotFound, PointRefused, SourceError, UsageError
from .kv import Txn, delete_first
from .phase3 import Phase3Tree, hash_fd, join, split
from .records import U64, Legacy
from .store import Store

DAY_NS = 86_400 * 10**9
DEFAULT_RETENTION_DAYS = 30
MAX_RETENTION_DAYS = 36_500
MAX_NAME = 100
FIRST_POINT_NAME = "initial"
ROWS_PER_TXN = 4096
LONG_PATH = 400  # longer paths are keyed by their hash (LMDB keys stop at 511 bytes)

_ROW = struct.Struct(">QqqQI")
_NEXT = b"N"
_HEAD = b"P"
_ROWS = b"M"


@dataclass
class Point:
    id: int
    created_ns: int
    retention_days: int
    complete: bool = True
    entries: int = 0
    files: int = 0
    nbytes: int = 0
    name: str = ""

    @property
    def expires_ns(self) -> int:
        return self.created_ns + self.retention_days * DAY_NS

    def expired(self, now_ns: int | None = None) -> bool:
        return (now_ns if now_ns is not None else time.time_ns()) >= self.expires_ns

    def header(self) -> bytes:
        return json.dumps(
            {
                "created_ns": self.created_ns,
                "retention_days": self.retention_days,
                "complete": self.complete,
                "entries": self.entries,
                "files": self.files,
                "bytes": self.nbytes,
                "name": self.name,
            }
        ).encode()


@dataclass(frozen=True)
class Row:
    """One Phase 3 entry as the point recorded it."""

    size: int
    mtime_ns: int
    ctime_ns: int
    st_ino: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> Row:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode)


@dataclass
class Drift:
    path: bytes  # relative to the tree's root
    how: str

    @property
    def shown(self) -> str:
        return "/" + os.fsdecode(self.path)


# -- keys and rows ------------------------------------------------------------------------


def head_key(pid: int) -> bytes:
    return _HEAD + U64.pack(pid)


def rows_prefix(pid: int) -> bytes:
    return _ROWS + U64.pack(pid)


def row_key(pid: int, path: bytes) -> bytes:
    if len(path) > LONG_PATH:
        return rows_prefix(pid) + b"#" + blake2b(path, digest_size=32).digest()
    return rows_prefix(pid) + b"/" + path


def _row_value(path: bytes, r: Row) -> bytes:
    v = _ROW.pack(r.size, r.mtime_ns, r.ctime_ns, r.st_ino, r.mode)
    return v + path if len(path) > LONG_PATH else v


def unpack_row(key: bytes, value: bytes | memoryview) -> tuple[bytes, Row]:
    r = Row(*_ROW.unpack_from(value, 0))
    path = bytes(value[_ROW.size :]) if key[9:10] == b"#" else key[10:]
    return path, r


def rows(txn: Txn, pid: int, start: bytes | None = None) -> Iterator[tuple[bytes, bytes, Row]]:
    """(key, path, row) of point `pid`'s manifest in key order, from key `start` on."""
    lo = start if start is not None else rows_prefix(pid)
    for k, v in txn.range("points", lo, rows_prefix(pid + 1)):
        path, r = unpack_row(k, v)
        yield k, path, r


def row_of(txn: Txn, pid: int, path: bytes) -> Row | None:
    v = txn.get("points", row_key(pid, path))
    return None if v is None else unpack_row(row_key(pid, path), v)[1]


# -- points -------------------------------------------------------------------------------


def read_points(txn: Txn) -> list[Point]:
    out = []
    for k, v in txn.range("points", _HEAD, _HEAD[:-1] + bytes([_HEAD[-1] + 1])):
        d = json.loads(bytes(v))
        out.append(
            Point(
                U64.unpack_from(k, 1)[0],
                d["created_ns"],
                d["retention_days"],
                d.get("complete", False),
                d.get("entries", 0),
                d.get("files", 0),
                d.get("bytes", 0),
                d.get("name", ""),
            )
        )
    return out


def list_points(store: Store) -> list[Point]:
    with store.backend.read() as txn:
        return read_points(txn)


def current(txn: Txn) -> Point | None:
    """The point the Phase 3 tree is checked against: the newest complete one."""
    done = [p for p in read_points(txn) if p.complete]
    return done[-1] if done else None


def get_point(store: Store, pid: int) -> Point:
    for p in list_points(store):
        if p.id == pid:
            return p
    raise PointRefused(f"no rollback point {pid} (see ferryfs points list)")


def ensure_first_point(store: Store, retention_days: int = DEFAULT_RETENTION_DAYS) -> Point:
    """The store's rollback point, recorded now (a walk of the whole Phase 3 tree) if
    it has no complete one. Called by `migrate` and `mount` before anything can be
    imported or changed; cheap when the point exists."""
    pts = list_points(store)
    done = [p for p in pts if p.complete]
    if done:
        return done[0]
    if store.tree is None:
        raise PointRefused("the Phase 3 tree cannot be reached to record a rollback point")
    if pts:  # a walk that did not finish (a crash): record it again from scratch
        p = pts[0]
        _drop_rows(store, p.id)
        p.created_ns = time.time_ns()
        p.entries = p.files = p.nbytes = 0
    else:
        p = _new_point(store, FIRST_POINT_NAME, retention_days)
    return _finish(store, store.tree, p)


def check_point_args(name: str, retention_days: int) -> None:
    """Refuse (UsageError, exit 2) a name or retention `points create` cannot keep."""
    if not 1 <= retention_days <= MAX_RETENTION_DAYS:
        raise UsageError(f"--keep-days must be 1 to {MAX_RETENTION_DAYS}, not {retention_days}")
    if not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise UsageError(f"a point's name is 1 to {MAX_NAME} printable characters")


def create_point(
    store: Store, tree: Phase3Tree, name: str, retention_days: int = DEFAULT_RETENTION_DAYS
) -> Point:
    """Record a new rollback point of the Phase 3 tree now, kept `retention_days`.
    Refused (nothing written) for a bad name or retention, a name another point
    has, a store whose Phase 3 data was released, or a tree that drifted from the
    current point: a new point would record the drift as the truth."""
    check_point_args(name, retention_days)
    if released(store):
        raise PointRefused("the Phase 3 data was released by points expire: no point to record")
    pts = list_points(store)
    if any(p.name == name for p in pts):
        raise UsageError(f"a rollback point named {name!r} exists (see ferryfs points list)")
    with store.backend.read() as txn:
        cur = current(txn)
    if cur is None:
        raise PointRefused("the store has no complete rollback point yet: mount or migrate first")
    drift, _ = verify(store, tree, cur.id, deep=False)
    if drift:
        raise PointRefused(
            f"the Phase 3 tree drifted from rollback point {cur.id} ({len(drift)} entries, "
            f"first {drift[0].shown}); see ferryfs points verify; no point recorded"
        )
    return _finish(store, tree, _new_point(store, name, retention_days))


def _new_point(store: Store, name: str, retention_days: int) -> Point:
    """The header of an incomplete point, under a fresh id."""

    def new(txn: Txn) -> Point:
        v = txn.get("points", _NEXT)
        pid = U64.unpack(v)[0] if v is not None else 1
        txn.put("points", _NEXT, U64.pack(pid + 1))
        pt = Point(pid, time.time_ns(), retention_days, complete=False, name=name)
        txn.put("points", head_key(pid), pt.header())
        return pt

    return store.transact(new)


def _finish(store: Store, tree: Phase3Tree, p: Point) -> Point:
    """Walk the tree into `p`'s manifest, then mark it complete."""
    _record_manifest(store, tree, p)
    p.complete = True
    store.transact(lambda txn: txn.put("points", head_key(p.id), p.header()))
    return p


def _record_manifest(store: Store, tree: Phase3Tree, p: Point) -> None:
    """Walk the tree breadth first, ROWS_PER_TXN rows to a transaction."""
    batch: list[tuple[bytes, Row]] = [(b"", Row.of(tree.lstat(b"")))]
    queue: deque[bytes] = deque([b""])

    def flush() -> None:
        rows = sorted((row_key(p.id, path), _row_value(path, r)) for path, r in batch)

        def op(txn: Txn) -> None:
            # In key order, though LMDB still splits pages in the middle here (the rows
            # are not the last keys of the db: its header follows): half full pages,
            # until migrate rewrites the database at its end (kv.copy_compact).
            for k, v in rows:
                txn.put("points", k, v)

        store.transact(op)
        batch.clear()

    with tree.cached_walks():  # a deep chain: each directory opened once, not per level
        _walk_manifest(tree, p, queue, batch, flush)
    p.entries += len(batch)
    flush()


def _walk_manifest(
    tree: Phase3Tree,
    p: Point,
    queue: deque[bytes],
    batch: list[tuple[bytes, Row]],
    flush: Callable[[], None],
) -> None:
    while queue:
        d = queue.popleft()
        try:
            entries = list(tree.listdir(d))
        except SourceError:
            continue  # unreadable: its row is there, its entries are not
        for entry in entries:
            path = join(d, entry.name)
            r = Row.of(entry.st)
            batch.append((path, r))
            # Another filesystem mounted inside (proc, say) is not crossed.
            if stat.S_ISDIR(r.mode) and not tree.other_fs(entry.st):
                queue.append(path)
            elif stat.S_ISREG(r.mode):
                p.files += 1
                p.nbytes += r.size
            if len(batch) >= ROWS_PER_TXN:
                p.entries += len(batch)
                flush()


def _drop_rows(store: Store, pid: int) -> None:
    lo, hi = rows_prefix(pid), rows_prefix(pid + 1)
    dropped = ROWS_PER_TXN
    while dropped == ROWS_PER_TXN:
        dropped = store.transact(lambda txn: delete_first(txn, "points", lo, hi, ROWS_PER_TXN))


def delete_point(store: Store, pid: int) -> None:
    """Forget point `pid` (the Phase 3 tree is not touched)."""
    get_point(store, pid)
    _drop_rows(store, pid)
    store.transact(lambda txn: txn.delete("points", head_key(pid)))


def released(store: Store) -> bool:
    """Whether `points expire --yes` has deleted the Phase 3 data."""
    with store.backend.read() as txn:
        return is_released(txn)


def is_released(txn: Txn) -> bool:
    return txn.get("meta", b"phase3_released") is not None


# -- comparing the tree with a point --------------------------------------------------------


def compare(r: Row, st: os.stat_result) -> str:
    """How the entry `st` differs from its row ('' if it does not)."""
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(r.mode):
        return f"was a {_kind(r.mode)}, is now a {_kind(st.st_mode)}"
    if st.st_ino != r.st_ino:
        return "replaced by another file (inode changed)"
    if stat.S_ISDIR(r.mode):
        if st.st_mtime_ns != r.mtime_ns:
            return "entries added, removed or renamed (mtime changed)"
    elif st.st_size != r.size:
        return f"size changed ({r.size} -> {st.st_size} bytes)"
    elif st.st_mtime_ns != r.mtime_ns:
        return "modified (mtime changed, same size)"
    if st.st_mode != r.mode:
        return f"mode changed ({stat.filemode(r.mode)} -> {stat.filemode(st.st_mode)})"
    if st.st_ctime_ns != r.ctime_ns:
        return "changed (ctime changed: content or metadata)"
    return ""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return name
    return "special file"


class DirFds:
    """A few open directory fds of the tree, so checking rows in key order (siblings
    together) opens each directory once rather than once per entry."""

    def __init__(self, tree: Phase3Tree, keep: int = 64) -> None:
        self.tree = tree
        self.keep = keep
        self._fds: OrderedDict[bytes, int] = OrderedDict()

    def lstat(self, path: bytes) -> os.stat_result:
        parts = split(path)
        if not parts:
            return self.tree.lstat(b"")
        parent = b"/".join(parts[:-1])
        fd = self._fds.get(parent)
        if fd is None:
            fd = self.tree.walk_to(parts[:-1])
            self._fds[parent] = fd
            if len(self._fds) > self.keep:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(parent)
        try:
            return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            raise NotFound(os.fsdecode(path)) from None
        except OSError as e:
            raise SourceError(os.strerror(e.errno or 5).lower()) from e

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def stat_drift(
    txn: Txn, tree: Phase3Tree, fds: DirFds, pid: int, path: bytes, r: Row
) -> list[Drift]:
    """The drift of one manifest entry by lstat; for a directory whose entries changed,
    also each entry that is new since the point."""
    try:
        st = fds.lstat(path)
    except NotFound:
        return [Drift(path, "gone")]
    except SourceError as e:
        return [Drift(path, f"cannot be reached ({e})")]
    if stat.S_ISDIR(r.mode) and stat.S_ISDIR(st.st_mode) and tree.other_fs(st):
        return []  # another filesystem's root: not crossed, so not the tree's to drift
    how = compare(r, st)
    if not how:
        return []
    out = [Drift(path, how)]
    if stat.S_ISDIR(r.mode) and stat.S_ISDIR(st.st_mode) and st.st_ino == r.st_ino:
        try:
            for entry in tree.listdir(path):
                child = join(path, entry.name)
                if row_of(txn, pid, child) is None:
                    out.append(Drift(child, "new since the rollback point"))
        except SourceError:
            pass
    return out


def expected_hash(txn: Txn, pid: int, leg: Legacy) -> Row | None:
    """The manifest row whose content `leg.blake3` describes, or None: the legacy stat
    (what the migration read) must be the row's (what the point recorded)."""
    if not leg.hashed:
        return None
    r = row_of(txn, pid, leg.path)
    if r is None or not stat.S_ISREG(r.mode):
        return None
    if (r.size, r.mtime_ns, r.st_ino) != (leg.size, leg.mtime_ns, leg.st_ino):
        return None
    return r


def content_drift(tree: Phase3Tree, path: bytes, r: Row, want: bytes) -> tuple[str, int]:
    """(how, bytes read): '' when the Phase 3 file still hashes to `want`. A file whose
    stat no longer matches is left to the stat check (''), not read."""
    try:
        fd = tree.open_file(path)
    except SourceError:
        return "", 0
    n = 0
    try:
        st = os.fstat(fd)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != (r.st_ino, r.size, r.mtime_ns):
            return "", 0
        got, n = hash_fd(fd)
    finally:
        os.close(fd)
    if got != want:
        return "content changed (same size and mtime)", n
    return "", n


def verify(
    store: Store,
    tree: Phase3Tree,
    pid: int,
    deep: bool,
    jobs: int = os.cpu_count() or 2,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Drift], int]:
    """(drifted entries, entries checked) of the tree against point `pid`: every row
    by lstat, and with `deep` every file whose hash is known by content. One read
    snapshot of the store; contents hashed on `jobs` threads."""
    drifts: list[Drift] = []
    fds = DirFds(tree)
    checked = 0
    with store.backend.read() as txn:
        try:
            for _k, path, r in rows(txn, pid):
                drifts.extend(stat_drift(txn, tree, fds, pid, path, r))
                checked += 1
        finally:
            fds.close()
        if deep:
            stat_drifted = {d.path for d in drifts}
            todo: list[tuple[bytes, Row, bytes]] = []
            for _k, v in txn.range("legacy", b""):
                leg = Legacy.unpack(v)
                known = expected_hash(txn, pid, leg)
                if known is not None and leg.path not in stat_drifted:
                    todo.append((leg.path, known, leg.blake3))
    if deep:
        with ThreadPoolExecutor(jobs) as pool:
            for (path, _r, _w), (how, n) in zip(
                todo, pool.map(lambda t: content_drift(tree, *t), todo), strict=True
            ):
                if progress is not None:
                    progress(n)
                if how:
                    drifts.append(Drift(path, how))
    drifts.sort(key=lambda d: d.path)
    return drifts, checked

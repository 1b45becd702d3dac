"""What a search reads besides its index: the store, opened for a search
(SearchStore: its directory and LMDB only, the whole Store made on the first
file read), and the files themselves (a Reader: the store and its Phase 3
tree, or a live mount's files at their paths).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from .errors import FerryError, SchemaMismatch, StoreMissing
from .kv import Backend, LmdbBackend
from .records import SCHEMA_VERSION, U64, Inode, ino_key
from .storedir import StoreDir

if TYPE_CHECKING:  # reading files needs the whole store, imported only then
    from .phase3 import Phase3File, Phase3Tree
    from .store import Store


class Source(Protocol):
    """What a search reads its snapshot from: a Store, or a SearchStore."""

    @property
    def backend(self) -> Backend: ...

    @property
    def path(self) -> str | None: ...


class SearchStore:
    """A store opened read-only for a search: its directory and its LMDB
    environment, and no more. Most queries read no file, and the whole Store
    (its chunk cache, codecs, migration and Phase 3 code) costs a search's start
    some tens of milliseconds to import; `store()` makes it, on the same
    environment, for the queries that read files."""

    def __init__(self, path: str) -> None:
        self.path: str | None = path
        self.dir = StoreDir.open(path)
        try:
            self.backend: Backend = LmdbBackend(
                self.dir.db_path,
                readonly=True,
                shown=os.path.join(self.dir.path, "db"),
                readahead=False,  # a query touches a few pages here and there
            )
        except BaseException:
            self.dir.close()
            raise
        self._store: Store | None = None
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def _check(self) -> None:
        # As Store.open checks a store before reading it.
        assert isinstance(self.backend, LmdbBackend)
        if not self.backend.has_db("meta"):
            raise StoreMissing("the store is empty (never initialised)")
        with self.backend.read() as txn:
            v = txn.get("meta", b"schema")
        if v is None:
            raise StoreMissing("the store is empty (never initialised)")
        if U64.unpack(v)[0] != SCHEMA_VERSION:
            raise SchemaMismatch(
                f"store has schema version {U64.unpack(v)[0]}; this ferryfs reads version "
                f"{SCHEMA_VERSION} only"
            )

    def source_path(self) -> str | None:
        with self.backend.read() as txn:
            v = txn.get("meta", b"source")
            return os.fsdecode(bytes(v)) if v is not None else None

    def store(self) -> Store:
        """The whole Store on this environment (made once), with its Phase 3 tree
        attached if that is there: an unmounted store reads its LEGACY files from it."""
        if self._store is None:
            from .phase3 import Phase3Tree
            from .store import Store

            s = Store(self.backend, path=self.path, readonly=True)
            src = self.source_path()
            if src is not None and os.path.isdir(src):
                try:
                    s.tree = Phase3Tree.open(src)
                except FerryError:
                    s.tree = None
            self._store = s
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()  # the backend with it
        else:
            self.backend.close()
        self.dir.close()

    def __enter__(self) -> SearchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reader(Protocol):
    def read(self, ino: int, path: bytes, node: Inode) -> bytes | None: ...

    def walk(self, ino: int, path: bytes) -> Iterator[tuple[bytes, int, int, Callable[[], bytes]]]:
        """(path, size, mtime ns, read) of each regular file under an UNLISTED directory."""
        ...


class StoreReader:
    """Reads from the store itself, and LEGACY files from its Phase 3 tree (a
    SearchStore's whole Store is made on the first read)."""

    def __init__(self, store: Store | SearchStore) -> None:
        self._source = store

    @property
    def store(self) -> Store:
        if isinstance(self._source, SearchStore):
            return self._source.store()
        return self._source

    def read(self, ino: int, path: bytes, node: Inode) -> bytes | None:
        if node.stored:
            data = self.store.read_stored(ino, 0, node.size)
            if data is not None:
                return bytes(data)
            # LEGACY in the read's own snapshot: read from Phase 3 below, never
            # taken for a file with no text.
        f = self.store.open_legacy(ino)
        try:
            return _read_legacy(f)
        finally:
            f.close()

    def walk(self, ino: int, path: bytes) -> Iterator[tuple[bytes, int, int, Callable[[], bytes]]]:
        tree = self.store.tree
        with self.store.backend.read() as txn:
            leg = txn.get("legacy", ino_key(ino))
        if tree is None or leg is None:
            return
        from .records import Legacy

        stack = [(Legacy.unpack(leg).path, path)]
        while stack:
            rel, shown = stack.pop()
            for e in tree.listdir(rel):
                if len(e.name) > 255:
                    continue  # never imported (namespace.NAME_MAX)
                r, s = join(rel, e.name), join(shown, e.name)
                if stat.S_ISDIR(e.st.st_mode):
                    stack.append((r, s))
                elif stat.S_ISREG(e.st.st_mode):
                    yield s, e.st.st_size, e.st.st_mtime_ns, _opener(tree, r)


class MountReader:
    """Reads a live mount's files at their paths: what the app sees, including
    LEGACY files (a read through the mount may migrate them) and directories
    the mount has not listed yet."""

    def __init__(self, root: str) -> None:
        self.root = os.fsencode(os.path.abspath(root))

    def read(self, ino: int, path: bytes, node: Inode) -> bytes | None:
        fd = os.open(os.path.join(self.root, path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return _read_all(fd)
        finally:
            os.close(fd)

    def walk(self, ino: int, path: bytes) -> Iterator[tuple[bytes, int, int, Callable[[], bytes]]]:
        base = os.path.join(self.root, path) if path else self.root
        for d, _, files in os.walk(base):
            rel = os.path.relpath(d, self.root)
            rel = b"" if rel == b"." else rel
            for f in files:
                p = os.path.join(d, f)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    shown = join(rel, f)
                    yield shown, st.st_size, st.st_mtime_ns, _path_opener(p)


def join(parent: bytes, name: bytes) -> bytes:
    """A path below `parent` (b"" for the root), as phase3.join."""
    return parent + b"/" + name if parent else name


def _opener(tree: Phase3Tree, rel: bytes) -> Callable[[], bytes]:
    def read() -> bytes:
        fd = tree.open_file(rel)
        try:
            return _read_all(fd)
        finally:
            os.close(fd)

    return read


def _path_opener(p: bytes) -> Callable[[], bytes]:
    def read() -> bytes:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return _read_all(fd)
        finally:
            os.close(fd)

    return read


def _read_legacy(f: Phase3File) -> bytes:
    """A LEGACY file's Phase 3 copy, whole (SourceError if it changed there)."""
    parts: list[bytes] = []
    got = 0
    while True:
        b = f.pread(1 << 20, got)
        if not b:
            return b"".join(parts)
        parts.append(b)
        got += len(b)


def _read_all(fd: int) -> bytes:
    parts: list[bytes] = []
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            return b"".join(parts)
        parts.append(b)

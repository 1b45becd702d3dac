"""Answering a query exactly: the index's candidates for the files it is
trusted for, and a read at query time of every other file (index.py says which).

The steps, in one read transaction of the store: the marked inodes are looked
at first (each is either still trusted for its current names, or read now);
then tantivy's candidates are taken for the trusted files; UNLISTED
directories (whose files are not in the store yet) are walked and their files
read. Phrases, and words longer than the index's terms, are checked on the
words of each candidate file. The tantivy searcher is opened after the store's
snapshot: the index is then at or ahead of what the snapshot says it holds,
never behind it.

Reading goes through a `Reader`: the store itself (an unmounted store, with
its Phase 3 tree for LEGACY files), or the live mount's files at their paths.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import index, text
from .errors import FerryError, SchemaMismatch, StoreMissing, UsageError
from .kv import Backend, LmdbBackend, Txn
from .records import ROOT_INO, SCHEMA_VERSION, U64, Inode, ino_key
from .storedir import StoreDir

if TYPE_CHECKING:  # reading files needs the whole store, imported only then
    from .phase3 import Phase3File, Phase3Tree
    from .store import Store

BM25_K1 = 1.2  # tantivy's
_QUOTED = re.compile(r'"([^"]*)"|([^"]+)|"')


@dataclass
class Query:
    elements: list[list[str]]  # each a word ([w]) or a phrase ([w1, w2, ...])
    any: bool = False
    # BM25's idf of each word in the index, so that a file read at query time is
    # scored as the index scores the files it holds (as if of average length).
    idf: dict[str, float] = field(default_factory=dict)

    @property
    def needs_check(self) -> bool:
        """Whether the index's candidates must be checked against the file's words."""
        return any(len(e) > 1 for e in self.elements)

    @property
    def indexable(self) -> bool:
        """Whether the index can answer for every word (see text.MAX_TERM)."""
        return all(len(w) <= text.MAX_TERM for e in self.elements for w in e)

    def wanted(self) -> set[str]:
        return {w for e in self.elements for w in e}

    def match(self, ws: list[str] | None) -> float | None:
        """The score of a file with words `ws` (None: no text), or None if no match."""
        if ws is None:
            return None
        counts = Counter(ws)
        score = 0.0
        hit = 0
        for e in self.elements:
            if len(e) == 1:
                tf = counts.get(e[0], 0)
            else:
                tf = int(all(w in counts for w in e) and text.has_phrase(ws, e))
            if tf:
                hit += 1
                weight = sum(self.idf.get(w, 1.0) for w in e)
                score += weight * tf * (BM25_K1 + 1) / (tf + BM25_K1)
            elif not self.any:
                return None
        return score if hit else None


def parse_query(args: list[str], any_: bool = False) -> Query:
    """Words and "quoted phrases" of the command line; UsageError if none."""
    elements: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for m in _QUOTED.finditer(" ".join(args)):
        if m.group(1) is not None:
            ws = text.words(m.group(1))
            groups = [ws] if ws else []
        else:
            groups = [[w] for w in text.words(m.group(2) or "")]
        for g in groups:
            if tuple(g) not in seen:
                seen.add(tuple(g))
                elements.append(g)
    if not elements:
        raise UsageError("the query has no words (a word is letters, digits or _)")
    return Query(elements, any_)


@dataclass
class Filters:
    since_ns: int | None = None
    until_ns: int | None = None
    glob: str | None = None

    def keep(self, path: bytes, mtime_ns: int) -> bool:
        if self.since_ns is not None and mtime_ns < self.since_ns:
            return False
        if self.until_ns is not None and mtime_ns >= self.until_ns:
            return False
        return self.keep_path(path)

    def keep_path(self, path: bytes) -> bool:
        return self.glob is None or fnmatch.fnmatchcase(os.fsdecode(path), self.glob)


@dataclass
class Hit:
    path: bytes
    ino: int
    score: float
    size: int  # size and mtime: -1 when search() was not asked for them (stat_hits)
    mtime_ns: int
    kind: int
    opener: Callable[[], bytes] | None = None  # files of UNLISTED directories (ino 0)


@dataclass
class Result:
    hits: list[Hit] = field(default_factory=list)
    read_now: int = 0  # files read at query time because the index does not hold them
    checked: int = 0  # candidates read to check a phrase or a long word
    indexed: bool = False  # whether the index was used at all
    errors: list[str] = field(default_factory=list)


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
            return None if data is None else bytes(data)
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


class Paths:
    """Paths of inodes from the `N` rows of one snapshot, directories cached."""

    def __init__(self, txn: Txn) -> None:
        self.txn = txn
        self.dirs: dict[int, bytes | None] = {ROOT_INO: b""}

    def of_dir(self, ino: int) -> bytes | None:
        if ino in self.dirs:
            return self.dirs[ino]
        chain = []
        p: bytes | None = None
        cur = ino
        for _ in range(4096):
            if cur in self.dirs:
                p = self.dirs[cur]
                break
            ns = index.names(self.txn, cur)
            if not ns:
                break
            chain.append((cur, ns[0]))
            cur = ns[0][0]
        for d, (_, name) in reversed(chain):
            p = None if p is None else join(p, name)
            self.dirs[d] = p
        return self.dirs.get(ino)

    def of_file(self, ino: int) -> list[tuple[bytes, bytes]]:
        """(path, name) of each name of a file."""
        out = []
        for parent, name in index.names(self.txn, ino):
            d = self.of_dir(parent)
            if d is not None:
                out.append((join(d, name), name))
        return out


class FullPaths(Paths):
    """Paths from a walk of every directory entry: for a store whose names are
    not recorded yet."""

    def __init__(self, txn: Txn) -> None:
        super().__init__(txn)
        self.files: dict[int, list[tuple[bytes, bytes]]] = {}
        stack = [(ROOT_INO, b"")]
        while stack:
            d, p = stack.pop()
            for k, v in txn.range("dirents", ino_key(d), ino_key(d + 1)):
                c, name = U64.unpack(v)[0], bytes(k[16:])
                cv = txn.get("inodes", ino_key(c))
                if cv is None:
                    continue
                node = Inode.unpack(c, cv)
                if node.is_dir:
                    self.dirs[c] = join(p, name)
                    stack.append((c, join(p, name)))
                else:
                    self.files.setdefault(c, []).append((join(p, name), name))

    def of_dir(self, ino: int) -> bytes | None:
        return self.dirs.get(ino)

    def of_file(self, ino: int) -> list[tuple[bytes, bytes]]:
        return self.files.get(ino, [])


def search(
    store: Source, q: Query, reader: Reader, filters: Filters | None = None, stat_hits: bool = True
) -> Result:
    """Every file holding the query now, scored; see the module docstring.

    `stat_hits`: give each hit its size and mtime. Without it (and with no date
    filter), a hit the index vouches for costs no look at its inode: a query's
    cost on a cold cache is the pages it touches, so the fewer the better."""
    f = filters or Filters()
    stat_hits = stat_hits or f.since_ns is not None or f.until_ns is not None
    res = Result()
    got: dict[bytes, Hit] = {}
    to_read: dict[bytes, tuple[int, int, Inode, bool]] = {}  # path: ino, kind, node, checking
    walks: list[tuple[int, bytes]] = []
    assert store.path is not None
    with store.backend.read() as txn:
        ix = _trusted_index(txn, store.path) if q.indexable else None
        if ix is None:
            full = FullPaths(txn)
            for ino in full.files:
                _look(txn, ino, full, f, False, to_read, walks)
            for key, val in txn.range("inodes", b""):
                d = Inode.unpack(U64.unpack(key)[0], val)
                if d.is_dir and not d.stored:
                    dp = full.of_dir(d.ino)
                    if dp is not None:
                        walks.append((d.ino, dp))
        else:
            res.indexed = True
            paths = Paths(txn)
            marked = set()
            for ino in index.dirty(txn):
                marked.add(ino)
                _look(txn, ino, paths, f, True, to_read, walks)
            # In inode order: the rows each looks at lie in key order, so a cold
            # cache reads neighbouring pages rather than a page a hit.
            for score, ino, ver, kind in sorted(_candidates(ix, q), key=lambda c: c[1]):
                if ino not in marked and index.indexed(txn, ino) == (ver, kind):
                    # Not marked: the `V` row vouches for the file's current
                    # version and for every name's kind (a change of either marks
                    # it in its own transaction; fsck's invariant 7), so neither
                    # its inode nor its content is looked at.
                    _vouched(txn, ino, score, kind, paths, f, q, stat_hits, got, to_read)
                    continue
                rec = txn.get("inodes", ino_key(ino))
                if rec is None:
                    continue
                node = Inode.unpack(ino, rec)
                trusted = node.is_reg and ver == node.version
                trusted = trusted and index.indexed(txn, ino) == (ver, kind)
                for p, name in paths.of_file(ino):
                    if p in to_read or not f.keep(p, node.mtime_ns):
                        continue
                    if not trusted or text.kind(name) != kind:
                        to_read[p] = (ino, text.kind(name), node, False)
                    elif q.needs_check:
                        to_read[p] = (ino, kind, node, True)
                    else:
                        got[p] = Hit(p, ino, score, node.size, node.mtime_ns, kind)
    # The reads happen outside the transaction (each read is a snapshot of its own).
    for p, (ino, kind, node, checking) in to_read.items():
        try:
            data = reader.read(ino, p, node)
        except FileNotFoundError:
            continue  # renamed or deleted since the snapshot: not there now
        except (OSError, FerryError) as e:
            res.errors.append(f"{os.fsdecode(p)}: {e}")
            continue
        if checking:
            res.checked += 1
        else:
            res.read_now += 1
        matched = q.match(None if data is None else text.file_words(data, kind))
        if matched is not None:
            got[p] = Hit(p, ino, matched, node.size, node.mtime_ns, kind)
    for ino, p in walks:
        try:
            for fp, size, mtime, read in reader.walk(ino, p):
                if not f.keep(fp, mtime):
                    continue
                fkind = text.kind(fp.rsplit(b"/", 1)[-1])
                res.read_now += 1
                try:
                    fdata = read()
                except (OSError, FerryError) as e:
                    res.errors.append(f"{os.fsdecode(fp)}: {e}")
                    continue
                fscore = q.match(text.file_words(fdata, fkind))
                if fscore is not None:
                    got[fp] = Hit(fp, 0, fscore, size, mtime, fkind, read)
        except (OSError, FerryError) as e:
            res.errors.append(f"{os.fsdecode(p)}: {e}")
    res.hits = list(got.values())
    return res


def _vouched(
    txn: Txn,
    ino: int,
    score: float,
    kind: int,
    paths: Paths,
    f: Filters,
    q: Query,
    stat_hits: bool,
    got: dict[bytes, Hit],
    to_read: dict[bytes, tuple[int, int, Inode, bool]],
) -> None:
    """A candidate whose document is its text: a hit at each of its names, its
    inode looked at only for a size and mtime that are asked for, or a phrase
    to check on its words."""
    node: Inode | None = None
    for p, name in paths.of_file(ino):
        if p in to_read or not f.keep_path(p):
            continue
        other = text.kind(name) != kind  # never, by the invariant; cheap to make sure
        if node is None and (stat_hits or q.needs_check or other):
            rec = txn.get("inodes", ino_key(ino))
            if rec is None:
                return
            node = Inode.unpack(ino, rec)
        if node is not None and not f.keep(p, node.mtime_ns):
            continue
        if other or q.needs_check:
            assert node is not None
            to_read[p] = (ino, text.kind(name), node, not other)
        elif node is not None:
            got[p] = Hit(p, ino, score, node.size, node.mtime_ns, kind)
        else:
            got[p] = Hit(p, ino, score, -1, -1, kind)


def _look(
    txn: Txn,
    ino: int,
    paths: Paths,
    f: Filters,
    use_index: bool,
    to_read: dict[bytes, tuple[int, int, Inode, bool]],
    walks: list[tuple[int, bytes]],
) -> None:
    """A marked inode (or, with no index, every file): queue for reading each of
    its names whose (version, kind) the index does not hold; an UNLISTED
    directory is walked. Names the index holds are left to its candidates."""
    v = txn.get("inodes", ino_key(ino))
    if v is None:
        return
    node = Inode.unpack(ino, v)
    if node.is_dir:
        if not node.stored:
            p = paths.of_dir(ino)
            if p is not None:
                walks.append((ino, p))
        return
    if not node.is_reg:
        return
    have = index.indexed(txn, ino) if use_index else None
    for p, name in paths.of_file(ino):
        k = text.kind(name)
        if have != (node.version, k) and f.keep(p, node.mtime_ns):
            to_read[p] = (ino, k, node, False)


def _trusted_index(txn: Txn, store_path: str) -> Any:
    want = index.ident(txn)
    if want is None or want != index.disk_ident(store_path):
        return None
    try:
        return index.open_index(store_path)
    except (OSError, ValueError):
        return None


def _candidates(ix: Any, q: Query) -> list[tuple[float, int, int, int]]:
    """(score, ino, version, kind) of each document the index gives for `q`."""
    import tantivy

    schema = ix.schema

    def tq(w: str) -> Any:
        return tantivy.Query.term_query(schema, "text", w, index_option="freq")

    parts = []
    for e in q.elements:
        if len(e) == 1:
            parts.append(tq(e[0]))
        else:
            parts.append(tantivy.Query.boolean_query([(tantivy.Occur.Must, tq(w)) for w in e]))
    occur = tantivy.Occur.Should if q.any else tantivy.Occur.Must
    query = tantivy.Query.boolean_query([(occur, p) for p in parts])
    last: Exception | None = None
    for _ in range(3):  # the daemon's writer may drop a segment file under us: retry
        try:
            ix.reload()
            s = ix.searcher()
            total = s.num_docs
            for w in q.wanted():
                df = s.doc_freq("text", w)
                q.idf[w] = math.log(1 + (total - df + 0.5) / (df + 0.5))
            n = s.search(query, limit=1, count=True).count
            if not n:
                return []
            hits = s.search(query, limit=n, count=False).hits
            addrs = [a for _, a in hits]
            inos = s.fast_field_values("ino", addrs)
            vers = s.fast_field_values("ver", addrs)
            kinds = s.fast_field_values("kind", addrs)
            return [
                (float(sc), int(i), int(v), int(k))
                for (sc, _), i, v, k in zip(hits, inos, vers, kinds, strict=True)
                if i is not None and v is not None and k is not None
            ]
        except (OSError, ValueError) as e:
            last = e
    raise FerryError(f"the search index cannot be read: {last}")

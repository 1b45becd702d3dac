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

Reading goes through a `Reader` (search_io.py): the store itself (an
unmounted store, with its Phase 3 tree for LEGACY files), or the live mount's
files at their paths.

Speed: a query's cost on a cold page cache is the pages it touches, each a
read from disk. So a hit the index vouches for costs its `V` row and its
names (no inode, no content, unless asked for), the rows are looked up in key
order, and neither LMDB nor tantivy's maps read ahead (see _random_access).
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import index, text
from .errors import FerryError, UsageError
from .kv import Txn
from .records import ROOT_INO, U64, Inode, ino_key
from .search_io import MountReader, Reader, SearchStore, Source, StoreReader, join

__all__ = [
    "Filters",
    "Hit",
    "MountReader",
    "Query",
    "Reader",
    "Result",
    "SearchStore",
    "StoreReader",
    "parse_query",
    "search",
]

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
            found = _candidates(ix, q, index.index_dir(store.path))
            for score, ino, ver, kind in sorted(found, key=lambda c: c[1]):
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
        _read_tails(index.index_dir(store_path))
        return index.open_index(store_path)
    except (OSError, ValueError):
        return None


# A query reads a few pages of tantivy's files, through its memory maps. On a
# cold cache each page it touches first is read from disk with the kernel's
# read-around, as much as the disk's read_ahead_kb (8 MB on the benchmark's
# virtual disk): measured, one query on the 10x tree read all 18 MB of its
# biggest segment's postings and terms to use 72 KB of them. Hence these two.
TAIL = 16 << 10
_MADV_RANDOM = 1


def _read_tails(d: str) -> None:
    """Read the end of each index file (its footer, which opening the index
    reads) with read-ahead off: those pages are then cached, and opening reads
    no megabytes around them."""
    with os.scandir(d) as it:
        for e in it:
            try:
                fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    os.pread(fd, TAIL, max(0, st.st_size - TAIL))
            except OSError:
                pass
            finally:
                os.close(fd)


def _random_access(d: str) -> None:
    """MADV_RANDOM on this process's maps of the files in `d` (tantivy's open
    segments): a page the query touches is then read alone. Best effort: a map
    that went meanwhile is skipped."""
    import ctypes

    prefix = os.path.realpath(d) + "/"
    try:
        with open("/proc/self/maps") as f:
            spans = []
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(prefix):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((lo, hi - lo))
    except OSError:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for lo, n in spans:
        madvise(lo, n, _MADV_RANDOM)


def _candidates(
    ix: Any, q: Query, index_dir: str | None = None
) -> list[tuple[float, int, int, int]]:
    """(score, ino, version, kind) of each document the index gives for `q`
    (`index_dir`: where its files are, to read them page by page)."""
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
            if index_dir is not None:
                _random_access(index_dir)
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

"""Random sequences of namespace and content operations against an LMDB store and
a plain dict model, checked after every step (contents, listings, and the store's
invariants), with a rule that closes and reopens the store.

Small chunks, a small clustering gap and a small staging threshold make a few KiB
of data exercise what megabytes would: many extents per file, writes re-chunked
as several regions, large files staged before their commit.

The model keeps a file as its size and its written pages, so a rule may grow a
file by gibibytes of hole: the store must answer every range with zeros there,
keep the hole a hole (its data runs stay the size of what was written), and
nothing here may build a buffer as long as the file.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import hypothesis.strategies as st
from ferryfs.store import content
from ferryfs.store import migration as ingest
from ferryfs.store.chunker import Chunker
from ferryfs.store.errors import Exists, IsADir, NotEmpty, NotFound
from ferryfs.store.namespace import RENAME_NOREPLACE
from ferryfs.store.records import HOLE, ROOT_INO
from ferryfs.store.store import Store
from helpers.store import SparseFile, check_invariants, deadline, raw, write_files
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

SMALL = Chunker(min_size=64, avg_size=256, max_size=1024)
GiB = 1 << 30
PAGE = SparseFile.PAGE
WHOLE = 4 << 20  # files up to this size are also compared by one read of all of them
NAMES = [b"a", b"b", b"\xff\xfe", b"n" * 255]
DIRS = [b"", b"d", b"d/e", b"f"]  # the places a directory may be; b"" is the root
PHASE3 = {
    b"a": bytes(range(256)) * 40,
    b"d/b": b"phase three " * 3000,
    b"d/e/a": b"",
}
PHASE3_LINK = (b"d/a", b"a")  # a hard link in Phase 3

offsets = st.one_of(
    st.integers(0, 12_000),
    st.sampled_from([0, 255, 256, 1023, 1024, 10_240, 50_000, 200_000]),
)
payloads = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=3), st.integers(1, 2000)),
    st.sampled_from([b"phase three " * 50, bytes(range(256)) * 4]),  # dedup with Phase 3
)


def parent_of(path: bytes) -> tuple[bytes, bytes]:
    head, _, tail = path.rpartition(b"/")
    return head, tail


def join(d: bytes, name: bytes) -> bytes:
    return d + b"/" + name if d else name


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.saved = (content.CLUSTER_GAP, ingest.STAGE_BYTES)
        content.CLUSTER_GAP = 4096
        ingest.STAGE_BYTES = 8192
        self.tmp = tempfile.mkdtemp(prefix="ferryfs-stateful-")
        self.src = os.path.join(self.tmp, "phase3")
        write_files(os.fsencode(self.src), PHASE3, PHASE3_LINK)
        self.path = os.path.join(self.tmp, "store")
        self.store = Store.open(self.path, source=self.src, create=True)
        self.store.chunker = SMALL
        # The model: directories by path, file names by path -> file id, file contents.
        self.dirs: set[bytes] = {b"", b"d", b"d/e"}
        self.names: dict[bytes, int] = {}
        self.data: dict[int, SparseFile] = {}
        self.ino: dict[int, int] = {}
        for i, (rel, data) in enumerate(PHASE3.items()):
            self.names[rel] = i
            self.data[i] = SparseFile(data)
        self.names[PHASE3_LINK[0]] = self.names[PHASE3_LINK[1]]
        self.store.import_all()
        for rel, fid in self.names.items():
            self.ino[fid] = self.resolve(rel)
        self.next_fid = len(PHASE3)

    def teardown(self) -> None:
        content.CLUSTER_GAP, ingest.STAGE_BYTES = self.saved
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------

    def resolve(self, path: bytes) -> int:
        ino = ROOT_INO
        if path:
            for part in path.split(b"/"):
                ino = self.store.lookup(ino, part).ino
        return ino

    def dir_ino(self, d: bytes) -> int:
        return self.resolve(d)

    def drop_name(self, path: bytes) -> None:
        fid = self.names.pop(path)
        if fid not in self.names.values():
            del self.data[fid]
            del self.ino[fid]

    def exists(self, path: bytes) -> bool:
        return path in self.names or path in self.dirs

    def pick_file(self, data: st.DataObject) -> bytes:
        return data.draw(st.sampled_from(sorted(self.names)))

    # -- rules ---------------------------------------------------------------------

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def create(self, data: st.DataObject, name: bytes) -> None:
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        path = join(d, name)
        if self.exists(path):
            try:
                self.store.create(self.dir_ino(d), name, 0o644, 0, 0)
            except Exists:
                return
            raise AssertionError(f"create over {path!r} did not fail")
        node = self.store.create(self.dir_ino(d), name, 0o644, 0, 0)
        fid = self.next_fid
        self.next_fid += 1
        self.names[path] = fid
        self.data[fid] = SparseFile()
        self.ino[fid] = node.ino

    @precondition(lambda self: self.names)
    @rule(data=st.data(), off=offsets, payload=payloads)
    def write(self, data: st.DataObject, off: int, payload: bytes) -> None:
        path = self.pick_file(data)
        fid = self.names[path]
        with deadline(10):  # a commit that keeps retrying must fail, not hang
            self.store.write(self.ino[fid], off, payload)
        self.apply(fid, [(off, payload)])

    @precondition(lambda self: self.names)
    @rule(
        data=st.data(),
        pieces=st.lists(st.tuples(st.integers(0, 30_000), payloads), min_size=1, max_size=4),
    )
    def write_spans(self, data: st.DataObject, pieces: list[tuple[int, bytes]]) -> None:
        path = self.pick_file(data)
        fid = self.names[path]
        spans: list[tuple[int, bytes]] = []
        pos = data.draw(offsets)
        for gap, payload in pieces:  # sorted and disjoint, gaps small and large
            if not payload:
                continue
            spans.append((pos + gap, payload))
            pos += gap + len(payload)
        with deadline(10):  # a commit that keeps retrying must fail, not hang
            self.store.write_spans(self.ino[fid], spans)
        self.apply(fid, spans)

    @precondition(lambda self: self.names)
    @rule(
        data=st.data(),
        hole=st.integers(10_000, 100_000),
        spots=st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True),
    )
    def fill_a_hole(self, data: st.DataObject, hole: int, spots: list[int]) -> None:
        """Extend a file by a hole, then write a few spans into it, far apart."""
        fid = self.names[self.pick_file(data)]
        end = self.data[fid].size
        self.store.truncate(self.ino[fid], end + hole)
        self.data[fid].truncate(end + hole)
        spans = [(end + hole * i // 10, data.draw(payloads) or b"x") for i in sorted(spots)]
        spans = [(o, p[: hole // 10]) for o, p in spans]
        with deadline(10):
            self.store.write_spans(self.ino[fid], spans)
        self.apply(fid, spans)

    @precondition(lambda self: self.names)
    @rule(data=st.data())
    def move_a_chunk(self, data: st.DataObject) -> None:
        """Rewrite one chunk-aligned range and copy its old bytes far along the
        file, in one commit: the second span recreates the chunk the first frees."""
        fid = self.names[self.pick_file(data)]
        exts = raw(self.store).extents.get(self.ino[fid], [])
        pairs = [
            (a, b)
            for i, a in enumerate(exts)
            for b in exts[i + 1 :]
            if b[0] - (a[0] + a[2]) > content.CLUSTER_GAP and a[1] != HOLE
        ]
        if not pairs:
            return
        (aoff, _, alen), (boff, _, _) = data.draw(st.sampled_from(pairs))
        old = self.data[fid].read(aoff, alen)
        spans = [(aoff, data.draw(st.binary(min_size=alen, max_size=alen))), (boff, old)]
        with deadline(10):  # a commit that keeps retrying must fail, not hang
            self.store.write_spans(self.ino[fid], spans)
        self.apply(fid, spans)

    def apply(self, fid: int, spans: list[tuple[int, bytes]]) -> None:
        for off, payload in spans:
            self.data[fid].write(off, payload)

    @precondition(lambda self: self.names)
    @rule(data=st.data(), gib=st.integers(1, 100), by_write=st.booleans(), tail=payloads)
    def grow_by_gibibytes(self, data: st.DataObject, gib: int, by_write: bool, tail: bytes) -> None:
        """Grow a file by a hole of gibibytes: truncate, or a write that far past the end."""
        fid = self.names[self.pick_file(data)]
        at = self.data[fid].size + gib * GiB
        with deadline(10):
            if by_write:
                self.store.write(self.ino[fid], at, tail or b"x")
                self.data[fid].write(at, tail or b"x")
            else:
                self.store.truncate(self.ino[fid], at)
                self.data[fid].truncate(at)

    @precondition(lambda self: self.names)
    @rule(data=st.data(), back=st.integers(-5000, 5000), payload=payloads)
    def write_near_the_end(self, data: st.DataObject, back: int, payload: bytes) -> None:
        """A write around the end of a file (after a huge hole: across its edge)."""
        fid = self.names[self.pick_file(data)]
        off = max(0, self.data[fid].size - back)
        with deadline(10):
            self.store.write(self.ino[fid], off, payload)
        self.apply(fid, [(off, payload)])

    @precondition(lambda self: self.names)
    @rule(data=st.data(), size=st.one_of(offsets, st.just(2_500_000)))
    def truncate(self, data: st.DataObject, size: int) -> None:
        path = self.pick_file(data)
        fid = self.names[path]
        self.store.truncate(self.ino[fid], size)
        self.data[fid].truncate(size)

    @precondition(lambda self: self.names)
    @rule(data=st.data(), name=st.sampled_from(NAMES), noreplace=st.booleans())
    def rename(self, data: st.DataObject, name: bytes, noreplace: bool) -> None:
        src = self.pick_file(data)
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        dst = join(d, name)
        sd, sn = parent_of(src)
        args = (self.dir_ino(sd), sn, self.dir_ino(d), name, RENAME_NOREPLACE if noreplace else 0)
        if dst in self.dirs:
            expect: type[Exception] | None = Exists if noreplace else IsADir
        elif dst in self.names and self.names[dst] != self.names[src]:
            expect = Exists if noreplace else None
        else:
            expect = None
        if expect is not None:
            try:
                self.store.rename(*args)
            except expect:
                return
            raise AssertionError(f"rename {src!r} -> {dst!r} did not raise {expect.__name__}")
        self.store.rename(*args)
        if dst in self.names and self.names[dst] == self.names[src]:
            return  # two names of one file: POSIX says nothing happens
        if dst in self.names:
            self.drop_name(dst)
        self.names[dst] = self.names.pop(src)

    @precondition(lambda self: self.names)
    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def link(self, data: st.DataObject, name: bytes) -> None:
        src = self.pick_file(data)
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        dst = join(d, name)
        fid = self.names[src]
        if self.exists(dst):
            try:
                self.store.link(self.ino[fid], self.dir_ino(d), name)
            except Exists:
                return
            raise AssertionError(f"link to existing {dst!r} did not fail")
        node = self.store.link(self.ino[fid], self.dir_ino(d), name)
        self.names[dst] = fid
        assert node.nlink == list(self.names.values()).count(fid)

    @precondition(lambda self: self.names)
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self.pick_file(data)
        d, name = parent_of(path)
        self.store.unlink(self.dir_ino(d), name)
        self.drop_name(path)

    @rule(d=st.sampled_from(DIRS[1:]))
    def mkdir(self, d: bytes) -> None:
        parent, name = parent_of(d)
        if parent not in self.dirs or self.exists(d):
            try:
                self.store.mkdir(self.dir_ino(parent), name, 0o755, 0, 0)
            except (Exists, NotFound):
                return
            raise AssertionError(f"mkdir {d!r} did not fail")
        self.store.mkdir(self.dir_ino(parent), name, 0o755, 0, 0)
        self.dirs.add(d)

    @rule(d=st.sampled_from(DIRS[1:]))
    def rmdir(self, d: bytes) -> None:
        parent, name = parent_of(d)
        if d not in self.dirs:
            return
        empty = not any(p.startswith(d + b"/") for p in list(self.names) + list(self.dirs))
        if not empty:
            try:
                self.store.rmdir(self.dir_ino(parent), name)
            except NotEmpty:
                return
            raise AssertionError(f"rmdir of non-empty {d!r} did not fail")
        self.store.rmdir(self.dir_ino(parent), name)
        self.dirs.discard(d)

    @precondition(lambda self: self.names)
    @rule(data=st.data(), off=offsets, n=st.integers(0, 70_000))
    def read(self, data: st.DataObject, off: int, n: int) -> None:
        fid = self.names[self.pick_file(data)]
        assert self.store.read(self.ino[fid], off, n) == self.data[fid].read(off, n)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store.open(self.path)
        self.store.chunker = SMALL

    # -- checks after every step -----------------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        for path, fid in self.names.items():
            assert self.resolve(path) == self.ino[fid], path
            node = self.store.getattr(self.ino[fid])
            want = self.data[fid]
            assert node.size == want.size, path
            assert node.nlink == list(self.names.values()).count(fid), path
            self.same_content(self.ino[fid], want, path)
        for d in self.dirs:
            listed = {n for _, n, _ in self.store.readdir(self.dir_ino(d), limit=10**6)}
            want_names = {
                parent_of(p)[1]
                for p in list(self.names) + list(self.dirs)
                if p and parent_of(p)[0] == d
            }
            assert listed == want_names, d
        check_invariants(self.store)

    def same_content(self, ino: int, want: SparseFile, path: bytes) -> None:
        """The file's data runs hold the model's bytes, its holes only zeros (read at
        their edges), and holes stay holes: data runs grow with what was written."""
        if want.size <= WHOLE:
            assert self.store.read(ino, 0, want.size + 1) == want.read(0, want.size + 1), path
        if not self.store.getattr(ino).stored:
            return  # LEGACY: its bytes are Phase 3's, read whole above
        runs = self.store.data_ranges(ino)
        assert sum(n for _, n, _ in runs) == want.size, path
        data = 0
        for off, n, hole in runs:
            if hole:
                assert want.zeros_in(off, n), (path, off, n)
                for at in {off, off + max(0, n - PAGE)}:
                    assert self.store.read(ino, at, PAGE) == want.read(at, PAGE), (path, at)
            else:
                data += n
                assert self.store.read(ino, off, n) == want.read(off, n), (path, off)
        assert data <= 2 * want.written() + WHOLE, (path, data)

    @invariant()
    def phase3_untouched(self) -> None:
        top = os.fsencode(self.src)
        for rel, data in PHASE3.items():
            with open(os.path.join(top, rel), "rb") as f:
                assert f.read() == data


StoreMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStoreStateful = StoreMachine.TestCase

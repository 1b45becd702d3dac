"""Repairing what fsck found (`repair`), and taking the store's writer lock for
it before the database is opened (`hold_writer_lock`, `defuse_orphan_marks`)."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from functools import partial

from . import cas, codec, content, fsck_packs, index_writer
from . import namespace as ns
from .errors import (
    CorruptChunk,
    NotFound,
    OpError,
    SourceError,
    StoreMissing,
)
from .fsck import Checker
from .fsck_report import PACKS, REFS, REIMPORT, STRAY_EXTENTS, Problem, Report
from .kv import LmdbBackend, Txn
from .phase3 import hash_fd
from .records import (
    CHANGED,
    HOLE,
    READABLE_SCHEMAS,
    STORED,
    U64,
    dirent_key,
    extent_key,
)
from .store import Store
from .storedir import StoreDir


def repair(store: Store, report: Report) -> list[str]:
    """Fix what `report` found; return the paths of the files it could not save.

    The store must be open for writing (so not mounted), `store.tree` its Phase 3
    tree. In order, each step its own short transactions:
    1. entries and marks: drop dirents naming missing inodes or under non-directories,
       rewrite misplaced dirent keys, drop stale orphan marks, fix parent pointers,
       drop extents of missing inodes, non-files and unmodified LEGACY files;
    2. link counts, from a fresh structure check (step 1 changes them);
    3. pack accounting rebuilt from the packs and the chunks in them (and a chunk
       overlapping another copied apart); reference counts rebuilt from the
       extents; orphan chunks freed;
    4. each damaged or missing chunk rewritten from the Phase 3 copy of an
       unmodified file holding it (the heal a mount does at read time), which
       saves every file holding it; if none can, its holders are lost;
    5. an unmodified file whose extents or content are wrong is re-imported:
       reset to LEGACY with its extents dropped, then migrated again, when its
       Phase 3 copy still hashes to what was migrated;
    6. the search index, if it is wrong (or files were re-imported), is built
       again from the files (index_writer.rebuild).
    Files changed through the mount cannot be rebuilt from anywhere: lost."""
    by: dict[str, list[Problem]] = defaultdict(list)
    for p in report.problems:
        by[p.kind].append(p)
    lost: set[str] = set()

    # 1
    for p in by["dangling-dirent"] + by["dirent-in-non-directory"]:
        assert p.key is not None
        store.transact(partial(_delete, db="dirents", key=p.key))
    for p in by["bad-dirent-key"]:
        store.transact(partial(_rekey_dirent, key=p.key))
    for p in by["stale-orphan-mark"]:
        store.transact(partial(_delete, db="meta", key=p.key))
    for p in by["bad-parent"]:
        if p.repairable and p.ino is not None and p.key is not None:
            store.transact(partial(_set_parent, ino=p.ino, parent=U64.unpack(p.key)[0]))
    stray = sorted({p.ino for k in STRAY_EXTENTS for p in by[k] if p.repairable and p.ino})
    for ino in stray:
        store.transact(partial(_drop_extents, ino=ino))

    # 2
    fresh = Checker(store, resume=False).run(structure_only=True)
    for p in fresh.problems:
        if p.kind == "bad-nlink" and p.ino is not None and p.key is not None:
            store.transact(partial(_set_nlink, ino=p.ino, nlink=U64.unpack(p.key)[0]))

    # 3: pack accounting first: freeing a chunk trusts it
    if any(by[k] for k in PACKS):
        store.transact(fsck_packs.rebuild_accounting)
        for p in by["chunks-overlap"]:
            if p.digest is not None:
                store.transact(partial(_relocate, d=p.digest))
    if stray or any(by[k] for k in REFS):
        store.transact(_rebuild_refs)

    # 4
    bad = {p.digest for p in by["corrupt-chunk"] + by["missing-chunk"] if p.digest is not None}
    holders = _holders(store, bad)
    for d in sorted(bad):
        inos = sorted(holders.get(d, ()))
        if not inos:
            continue  # no file names it: freed in step 3, or by the next writer's open
        if not any(_try_heal(store, ino, d) for ino in inos):
            lost.update(p.path for p in report.problems if p.digest == d and p.path)

    # 5
    redo = sorted({p.ino for k in REIMPORT for p in by[k] if p.ino is not None})
    for ino in redo:
        if not _reimport(store, ino):
            lost.update(p.path for p in report.problems if p.ino == ino and p.kind in REIMPORT)

    # 6: the search index is a cache: rebuilt whole from the (repaired) files
    if any(p.kind.startswith("index-") for p in report.problems) or redo:
        index_writer.rebuild(store)
    return sorted(lost)


def hold_writer_lock(path: str) -> StoreDir | None:
    """Take the store's writer lock (the one `Store.open` takes) without opening the
    database, so a read-only check and the repair that follows see the same store.
    The locked StoreDir to close when done; None if `path` is not a store (opening
    it will say so)."""
    try:
        sd = StoreDir.open(path)
    except StoreMissing:
        return None
    try:
        sd.lock(
            f"store {path} is in use (mounted or migrating): --repair needs it unmounted; "
            "fsck without --repair checks it live"
        )
    except BaseException:
        sd.close()
        raise
    return sd


def defuse_orphan_marks(sd: StoreDir) -> int:
    """Drop orphan marks on inodes that directory entries still name. Opening a store
    for writing purges every marked inode, so such a mark would delete a live file
    before a repair could look at it. `sd` holds the writer lock (see
    `hold_writer_lock`). Returns how many marks were dropped."""
    be = LmdbBackend(sd.db_path, shown=os.path.join(sd.path, "db"))
    try:
        with be.write() as txn:
            v = txn.get("meta", b"schema")
            if v is None or U64.unpack(v)[0] not in READABLE_SCHEMAS:
                return 0  # not ours to touch: the open that follows refuses it
            marked = {
                U64.unpack_from(k, 7)[0]: k for k, _ in txn.range("meta", b"orphan:", b"orphan;")
            }
            named = {c for _k, v in txn.range("dirents", b"") if (c := U64.unpack(v)[0]) in marked}
            for ino in named:
                txn.delete("meta", marked[ino])
            return len(named)
    finally:
        be.close()


def _delete(txn: Txn, db: str, key: bytes | None) -> None:
    if key is not None:
        txn.delete(db, key)


def _rekey_dirent(txn: Txn, key: bytes | None) -> None:
    if key is None:
        return
    v = txn.get("dirents", key)
    if v is None:
        return
    child = bytes(v)
    parent, name = U64.unpack_from(key, 0)[0], key[16:]
    txn.delete("dirents", key)
    if txn.get("dirents", dirent_key(parent, name)) is None:
        txn.put("dirents", dirent_key(parent, name), child)


def _set_parent(txn: Txn, ino: int, parent: int) -> None:
    node = ns.get(txn, ino)
    node.parent = parent
    ns.put(txn, node)


def _set_nlink(txn: Txn, ino: int, nlink: int) -> None:
    node = ns.get(txn, ino)
    node.nlink = nlink
    ns.put(txn, node)


def _drop_extents(txn: Txn, ino: int) -> None:
    for k, _ in list(txn.range("extents", extent_key(ino, 0), extent_key(ino + 1, 0))):
        txn.delete("extents", k)


def _rebuild_refs(txn: Txn) -> None:
    counted: Counter[bytes] = Counter()
    for _k, v in txn.range("extents", b""):
        d = bytes(v[:32])
        if d != HOLE:
            counted[d] += 1
    for k, v in list(txn.range("refs", b"")):
        if k not in counted:
            txn.delete("refs", k)
        elif U64.unpack(v)[0] != counted[k]:
            txn.put("refs", k, U64.pack(counted[k]))
    for d, n in counted.items():
        if txn.get("refs", d) is None:
            txn.put("refs", d, U64.pack(n))
    pending = {k for k, _ in txn.range("pending", b"")}
    for k, _ in list(txn.range("chunks", b"")):
        if k not in counted and k not in pending:
            cas.free(txn, k)


def _relocate(txn: Txn, d: bytes) -> None:
    """Copy a chunk that overlaps another to a place of its own, if it decodes (if
    not, it is a damaged chunk: healed from Phase 3 in step 4)."""
    rec = cas.record(txn, d)
    if rec is None:
        return
    try:
        codec.decode(rec, d)
    except CorruptChunk:
        return
    cas.put(txn, d, bytes(rec))


def _holders(store: Store, digests: set[bytes]) -> dict[bytes, set[int]]:
    out: dict[bytes, set[int]] = defaultdict(set)
    if digests:
        with store.backend.read() as txn:
            for k, v in txn.range("extents", b""):
                d = bytes(v[:32])
                if d in digests:
                    out[d].add(U64.unpack_from(k, 0)[0])
    return out


def _try_heal(store: Store, ino: int, d: bytes) -> bool:
    try:
        return store.heal(ino, d)
    except (OpError, OSError):
        return False


def _reimport(store: Store, ino: int) -> bool:
    """Migrate an unmodified file again from Phase 3, if Phase 3 still holds exactly
    the bytes it was migrated from (else nothing is changed)."""
    with store.backend.read() as txn:
        try:
            node = ns.get(txn, ino)
        except NotFound:
            return False
        leg = ns.get_legacy(txn, ino)
    if node.changed or not node.is_reg or leg is None or not leg.hashed or store.tree is None:
        return False
    want = leg.blake3
    try:
        fd = store.tree.open_file(leg.path)
    except SourceError:
        return False
    try:
        st = os.fstat(fd)
        if (st.st_ino, st.st_dev) != (leg.st_ino, leg.st_dev):
            return False
        got, _n = hash_fd(fd)
    finally:
        os.close(fd)
    if got != want:
        return False

    def reset(txn: Txn) -> bool:
        n = ns.get(txn, ino)
        if n.flags & CHANGED:
            return False
        content.delete_all(txn, ino)
        n.flags &= ~STORED
        n.version += 1
        ns.put(txn, n)
        return True

    if not store.transact(reset):
        return False
    try:
        store.migrate(ino)
    except (OpError, OSError):
        return False
    with store.backend.read() as txn:
        after = ns.get_legacy(txn, ino)
        done = ns.get(txn, ino).stored
    return done and after is not None and after.blake3 == want

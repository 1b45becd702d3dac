"""Tier 2: the FUSE adapter called directly, with no kernel and no mount.

Each test builds `Operations(Store.memory(SRC), uid)` over a small Phase 3 tree
(and again over an LMDB store, as the daemon opens it), runs its first-open
migrator in a nursery as the daemon does, and awaits the handlers with a fake
request context (as S3QL's t3_fs_api.py does): the paths
a real mount reaches only through the kernel (lazy open, heal and failsafe, the
release error path, atomic O_TRUNC, setattr ordering), fast and without FUSE.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pyfuse3
import pytest
import trio
from ferryfs.fs.operations import Operations
from ferryfs.store import content
from ferryfs.store.errors import NoSpace
from ferryfs.store.records import HOLE, ROOT_INO
from ferryfs.store.store import Store
from helpers.damage import chunk_damaged, damage_chunk, stored_chunk
from helpers.store import check_invariants, raw

T_NS = 1_600_000_000_123_456_789  # a time no clock gives: set by the test, not by a commit


@dataclass
class Ctx:
    """What a handler reads of pyfuse3.RequestContext (which Python cannot build)."""

    uid: int = os.getuid()
    gid: int = os.getgid()
    pid: int = os.getpid()
    umask: int = 0o022


@dataclass
class Fields:
    """pyfuse3.SetattrFields, whose attributes Python cannot set."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


CTX = cast(pyfuse3.RequestContext, Ctx())


def session_bytes(n: int, seed: int) -> bytes:
    """JSON-ish lines, compressible (zstd) but not uniform: several chunks per file."""
    r = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += b'{"turn": %d, "text": "%s"}\n' % (len(out), r.randbytes(40).hex().encode())
    return bytes(out[:n])


FILES = {
    b"s.json": session_bytes(700_000, 1),
    b"other.json": session_bytes(300_000, 2),
    b"small.txt": b"hello, phase 3\n",
}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "phase3"
    root.mkdir()
    for name, data in FILES.items():
        (root / os.fsdecode(name)).write_bytes(data)
    return root


@pytest.fixture(params=["memory", "lmdb"])
async def ops(request: pytest.FixtureRequest, src: Path) -> AsyncIterator[Operations]:
    """The adapter over a store of `src` (in memory, or in LMDB as the daemon opens
    it), its first-open migrator running."""
    if request.param == "memory":
        store = Store.memory(str(src), keep_orphans=True)
    else:
        path = str(src.with_name("store"))
        store = Store.open(path, source=str(src), create=True, keep_orphans=True)
    o = Operations(store, os.getuid())
    try:
        async with trio.open_nursery() as n:
            await n.start(o.lazy.run)
            yield o
            n.cancel_scope.cancel()
    finally:
        o.lazy.background.close()
        store.close()


async def ino_of(ops: Operations, name: bytes) -> int:
    return (await ops.lookup(ROOT_INO, name, CTX)).st_ino


async def state(ops: Operations, ino: int) -> str:
    return (await ops.getxattr(ino, b"user.ferryfs.state", CTX)).decode()


async def read_all(ops: Operations, fh: int, step: int = 128 << 10) -> bytes:
    out = bytearray()
    while chunk := await ops.read(fh, len(out), step):
        out += chunk
    return bytes(out)


async def contents(ops: Operations, ino: int) -> bytes:
    """The file's bytes through a fresh read-only handle."""
    fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh
    try:
        return await read_all(ops, fh)
    finally:
        await ops.release(fh)


def chunks_of(store: Store, ino: int) -> list[bytes]:
    with store.backend.read() as txn:
        return [d for _off, d, _n in content.all_extents(txn, ino) if d != HOLE]


async def wait_until(cond: Callable[[], Awaitable[bool]], what: str, seconds: float = 20) -> None:
    """Await `cond()` until true, failing at the deadline."""
    with trio.move_on_after(seconds):
        while not await cond():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


# -- first open ------------------------------------------------------------------------------


async def test_a_legacy_file_is_served_from_phase3_then_migrated_behind(ops: Operations) -> None:
    ino = await ino_of(ops, b"s.json")
    assert await state(ops, ino) == "legacy"
    fh = (await ops.open(ino, os.O_RDONLY, CTX)).fh
    assert await state(ops, ino) == "legacy", "a read-only open waited for the migration"
    # Read at once, before the migrator's quiet period: these bytes come from Phase 3.
    first = await ops.read(fh, 0, 1 << 20)
    assert await state(ops, ino) == "legacy"
    assert bytes(first) == FILES[b"s.json"][: 1 << 20]

    async def migrated() -> bool:
        # The counter moves on this thread once the commit (on a worker) returns.
        return ops.counters.migrated_on_open == 1

    await wait_until(migrated, "the first-open migration")
    assert await state(ops, ino) == "migrated"
    # The handle opened on the Phase 3 copy, and a new one on the store, read the same.
    assert await read_all(ops, fh) == FILES[b"s.json"]
    await ops.release(fh)
    assert await contents(ops, ino) == FILES[b"s.json"]
    assert ops.store.read_stored(ino, 0, 10) == FILES[b"s.json"][:10]


async def test_a_legacy_file_opened_for_writing_is_migrated_before_the_open_returns(
    ops: Operations,
) -> None:
    ino = await ino_of(ops, b"other.json")
    fh = (await ops.open(ino, os.O_WRONLY, CTX)).fh
    assert await state(ops, ino) == "migrated"
    assert ops.store.read_stored(ino, 0, 1 << 20) == FILES[b"other.json"]
    await ops.release(fh)


async def test_a_legacy_file_changed_in_phase3_is_eio_never_a_mix(
    ops: Operations, src: Path
) -> None:
    ino = await ino_of(ops, b"s.json")  # its Phase 3 stat is recorded here
    with open(src / "s.json", "ab") as f:
        f.write(b"appended in Phase 3 behind the mount's back\n")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(ino, os.O_RDONLY, CTX)
    assert e.value.errno == errno.EIO
    assert await state(ops, ino) == "legacy"
    assert [i for i, _msg in ops.store.errors()] == [ino]  # status says why


async def test_a_handle_on_the_phase3_copy_reads_what_another_handle_wrote(
    ops: Operations,
) -> None:
    ino = await ino_of(ops, b"s.json")
    reader = (await ops.open(ino, os.O_RDONLY, CTX)).fh  # served from Phase 3
    assert bytes(await ops.read(reader, 0, 5)) == FILES[b"s.json"][:5]
    writer = (await ops.open(ino, os.O_WRONLY, CTX)).fh
    await ops.write(writer, 0, b"EDIT!")
    await ops.flush(writer)
    assert bytes(await ops.read(reader, 0, 8)) == b"EDIT!" + FILES[b"s.json"][5:8]
    await ops.release(writer)
    await ops.release(reader)


# -- heal and failsafe -----------------------------------------------------------------------


async def test_a_damaged_chunk_of_an_unmodified_file_is_healed_from_phase3(
    ops: Operations, rng: random.Random
) -> None:
    ino = await ino_of(ops, b"s.json")
    ops.store.migrate(ino)
    digests = chunks_of(ops.store, ino)
    assert len(digests) > 2
    bad = rng.choice(digests)
    damage_chunk(ops.store, bad, rng)
    assert await contents(ops, ino) == FILES[b"s.json"]
    assert (ops.counters.corrupt_reads, ops.counters.healed) == (1, 1)
    assert not chunk_damaged(bad, stored_chunk(ops.store, bad)), "the record was not rewritten"
    assert ops.store.failsafe is None
    # Writes still work.
    fh = (await ops.open(ino, os.O_WRONLY, CTX)).fh
    assert await ops.write(fh, 0, b"{") == 1
    await ops.release(fh)


async def test_damage_that_cannot_be_healed_is_eio_then_writes_are_erofs(
    ops: Operations, rng: random.Random
) -> None:
    ino = await ino_of(ops, b"s.json")
    fh = (await ops.open(ino, os.O_WRONLY, CTX)).fh
    await ops.write(fh, 0, b"[")  # changed through the mount: Phase 3 no longer has it
    await ops.flush(fh)
    await ops.release(fh)
    other = await ino_of(ops, b"other.json")
    open_before = (await ops.open(other, os.O_RDWR, CTX)).fh  # migrates it
    bad = rng.choice(chunks_of(ops.store, ino))
    damage_chunk(ops.store, bad, rng)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await contents(ops, ino)
    assert e.value.errno == errno.EIO
    assert (ops.counters.corrupt_reads, ops.counters.healed) == (1, 0)
    assert ops.store.failsafe is not None and bad.hex()[:16] in ops.store.failsafe
    # Failsafe: a write is refused where the app sees it, not at a later flush...
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.write(open_before, 0, b"x")
    assert e.value.errno == errno.EROFS
    assert await read_all(ops, open_before) == FILES[b"other.json"]  # undamaged: still read
    await ops.release(open_before)
    # ...and so is an open for writing that would have to migrate a LEGACY file.
    small = await ino_of(ops, b"small.txt")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(small, os.O_WRONLY, CTX)
    assert e.value.errno == errno.EROFS
    assert await contents(ops, small) == FILES[b"small.txt"]


# -- release ---------------------------------------------------------------------------------


async def test_a_flush_that_fails_keeps_the_bytes_until_the_last_handle_goes(
    ops: Operations, monkeypatch: pytest.MonkeyPatch
) -> None:
    ino = await ino_of(ops, b"small.txt")
    a = (await ops.open(ino, os.O_WRONLY, CTX)).fh
    b = (await ops.open(ino, os.O_WRONLY, CTX)).fh
    commit = ops.store.commit

    def full(rw: object) -> None:
        raise NoSpace("no space left in the store")

    monkeypatch.setattr(ops.store, "commit", full)
    await ops.write(a, 0, b"HELLO")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.flush(a)  # what close() returns to the app
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.release(a)  # another handle is open: the bytes stay buffered
    assert e.value.errno == errno.ENOSPC
    assert ops.counters.errors == []
    monkeypatch.setattr(ops.store, "commit", commit)
    await ops.flush(b)  # space again: the other handle writes them
    assert ops.store.read(ino, 0, 100) == b"HELLO, phase 3\n"

    monkeypatch.setattr(ops.store, "commit", full)
    await ops.write(b, 0, b"JELLO")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.release(b)  # the last handle: the unwritable bytes are dropped, said so
    assert e.value.errno == errno.ENOSPC
    assert len(ops.counters.errors) == 1 and "dropped 5 unwritable" in ops.counters.errors[0]
    assert ino not in ops.files.by_ino
    monkeypatch.setattr(ops.store, "commit", commit)
    assert await contents(ops, ino) == b"HELLO, phase 3\n"  # the last version that landed


async def test_an_unlinked_open_file_reads_until_the_kernel_forgets_it(ops: Operations) -> None:
    ino = await ino_of(ops, b"other.json")  # the kernel now holds one lookup of it
    fh = (await ops.open(ino, os.O_RDWR, CTX)).fh
    await ops.unlink(ROOT_INO, b"other.json", CTX)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(ROOT_INO, b"other.json", CTX)
    assert e.value.errno == errno.ENOENT
    await ops.write(fh, 0, b"still here")
    await ops.flush(fh)
    assert (await read_all(ops, fh))[:10] == b"still here"
    await ops.release(fh)
    assert (await ops.getattr(ino, CTX)).st_nlink == 0  # the kernel may still ask
    await ops.forget([(ino, 1)])
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(ino, CTX)
    assert e.value.errno == errno.ENOENT
    assert raw(ops.store).inodes.get(ino) is None  # and its extents and chunks with it
    check_invariants(ops.store)


# -- O_TRUNC -----------------------------------------------------------------------------------


async def test_open_with_o_trunc_empties_the_file_and_what_was_buffered(ops: Operations) -> None:
    ino = await ino_of(ops, b"other.json")
    a = (await ops.open(ino, os.O_WRONLY, CTX)).fh  # migrates it
    await ops.write(a, 10, b"buffered, not flushed")
    b = (await ops.open(ino, os.O_WRONLY | os.O_TRUNC, CTX)).fh
    # Atomic: the open's answer already sees the empty file (the kernel sends no setattr).
    assert (await ops.getattr(ino, CTX)).st_size == 0
    await ops.flush(a)  # written before the truncation: must not come back after it
    await ops.release(a)
    await ops.write(b, 0, b"new")
    await ops.release(b)
    assert await contents(ops, ino) == b"new"


async def test_open_with_o_trunc_of_a_legacy_file_reads_nothing_from_phase3(
    ops: Operations, src: Path
) -> None:
    ino = await ino_of(ops, b"s.json")
    fh = (await ops.open(ino, os.O_WRONLY | os.O_TRUNC, CTX)).fh
    assert (await ops.getattr(ino, CTX)).st_size == 0
    assert await state(ops, ino) == "migrated"
    assert ops.counters.migrated_on_open == 0  # no migration of bytes about to go
    await ops.release(fh)
    assert await contents(ops, ino) == b""
    assert (src / "s.json").read_bytes() == FILES[b"s.json"]  # Phase 3 untouched


# -- setattr -----------------------------------------------------------------------------------


async def test_setattr_lands_after_the_writes_buffered_before_it(ops: Operations) -> None:
    # tar -p: write, futimens, close. The commit of the writes must not reset the time.
    ino = await ino_of(ops, b"small.txt")
    fh = (await ops.open(ino, os.O_WRONLY, CTX)).fh
    size = len(FILES[b"small.txt"])
    await ops.write(fh, size, b"tail")
    attr = pyfuse3.EntryAttributes()
    attr.st_mtime_ns = T_NS
    fields = cast(pyfuse3.SetattrFields, Fields(update_mtime=True))
    got = await ops.setattr(ino, attr, fields, fh, CTX)
    assert (got.st_mtime_ns, got.st_size) == (T_NS, size + 4)
    await ops.release(fh)
    after = await ops.getattr(ino, CTX)
    assert (after.st_mtime_ns, after.st_size) == (T_NS, size + 4)
    assert await contents(ops, ino) == FILES[b"small.txt"] + b"tail"


async def test_setattr_of_size_mode_and_time_is_one_answer(ops: Operations, src: Path) -> None:
    ino = await ino_of(ops, b"s.json")  # LEGACY: a truncation to 3 migrates it first
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 3
    attr.st_mode = stat.S_IFREG | 0o600
    attr.st_mtime_ns = T_NS
    fields = cast(
        pyfuse3.SetattrFields, Fields(update_size=True, update_mode=True, update_mtime=True)
    )
    got = await ops.setattr(ino, attr, fields, None, CTX)
    assert (got.st_size, got.st_mode, got.st_mtime_ns) == (3, stat.S_IFREG | 0o600, T_NS)
    again = await ops.getattr(ino, CTX)
    assert (again.st_size, again.st_mode, again.st_mtime_ns) == (3, stat.S_IFREG | 0o600, T_NS)
    assert await contents(ops, ino) == FILES[b"s.json"][:3]
    assert (src / "s.json").read_bytes() == FILES[b"s.json"]

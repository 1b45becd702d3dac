"""Where chunk records live: alone in `chunks`, or side by side in a pack.

LMDB keeps a value of more than about 2 KB in whole 4 KiB overflow pages, so a
small record alone wastes about half a page. A record of at most `PACK_MAX`
bytes is therefore appended to a pack (`packs`: pack id -> the records end to
end, at most `PACK_TARGET` bytes), and its `chunks` value is a pointer:

    0xFF, codec byte, dictionary id (u32), pack id (u64), offset (u32), length (u32)

(no record starts with 0xFF: its first byte is a codec byte, codec.py). The
codec and dictionary are the record's own, repeated so that checks and stats
need not read the pack. Records larger than `PACK_MAX` stay alone, as every
record did in schema version 1; both kinds are read alike (`record`), a packed
one as a view of the pack inside the read transaction, never a copy.

Accounting: `packinfo` holds, per pack, its size and its live bytes and chunks;
freeing a packed chunk lowers them, and a pack with no live chunk goes. The
dead bytes (size - live) of the others are taken back by `compact_step`, which
copies a mostly dead pack's live records into the pack being filled and drops
it, one pack per transaction (a few milliseconds: a pack is at most 512 KiB).
Each step is one transaction, so a crash leaves every chunk in exactly one place.

Within a write transaction the pack being filled is a buffer (`_Fill` in the
transaction's `local`): records are appended to it, their pointers written at
once, and the buffer is written as the pack's value just before the commit
(Txn.on_commit), so a transaction adding a thousand small chunks writes each
pack once. The pack being filled carries on in the next transaction (meta
`packs.open`) while it is under `CARRY_MAX`: a small commit rewrites little.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from . import codec
from .kv import Buf, Txn
from .records import U64

PACK_TARGET = 512 << 10
PACK_MAX = 256 << 10
# A transaction carries on the open pack only while it is smaller than this: the
# pack is rewritten whole at each commit, and a close through the mount that adds
# one small chunk must not rewrite (and sync) half a megabyte. A transaction that
# adds much (a migration batch) still fills its packs to PACK_TARGET.
CARRY_MAX = 64 << 10
# A pack is compacted once this fraction of it is dead.
DEAD_RATIO = 0.25

POINTER = 0xFF
_PTR = struct.Struct(">BBIQII")
_HEAD = struct.Struct(">BI")  # a record's codec byte and dictionary id (codec.py)
_INFO = struct.Struct(">QQQ")  # size, live bytes, live chunks
OPEN_KEY = b"packs.open"
NEXT_KEY = b"packs.next"
UPGRADE_CURSOR = b"packs.upgrade"  # the next key of `chunks` to look at for v1 records
UPGRADED = b"packs.upgraded"  # set once no small record is stored alone
_FILL = "packs.fill"


@dataclass(frozen=True)
class Location:
    pack: int
    offset: int
    length: int
    codec: int
    dict_id: int


@dataclass
class Info:
    size: int
    live_bytes: int
    live_chunks: int

    @property
    def dead_bytes(self) -> int:
        return self.size - self.live_bytes


def is_pointer(value: Buf) -> bool:
    return len(value) == _PTR.size and value[0] == POINTER


def locate(value: Buf) -> Location:
    """The location a pointer value names (is_pointer(value) must hold)."""
    _m, codec, dict_id, pack, off, n = _PTR.unpack_from(value, 0)
    return Location(pack, off, n, codec, dict_id)


def pointer(loc: Location) -> bytes:
    return _PTR.pack(POINTER, loc.codec, loc.dict_id, loc.pack, loc.offset, loc.length)


def pack_key(pack: int) -> bytes:
    return U64.pack(pack)


def info(txn: Txn, pack: int) -> Info | None:
    v = txn.get("packinfo", pack_key(pack))
    return None if v is None else Info(*_INFO.unpack_from(v, 0))


def put_info(txn: Txn, pack: int, i: Info) -> None:
    txn.put("packinfo", pack_key(pack), _INFO.pack(i.size, i.live_bytes, i.live_chunks))


def all_info(txn: Txn) -> Iterator[tuple[int, Info | None]]:
    """(pack id, its accounting or None if malformed) of every pack accounted."""
    for k, v in txn.range("packinfo", b""):
        pack = U64.unpack(k)[0] if len(k) == U64.size else -1
        yield pack, Info(*_INFO.unpack_from(v, 0)) if len(v) == _INFO.size else None


def open_pack(txn: Txn) -> int | None:
    """The pack new records are appended to, if any."""
    v = txn.get("meta", OPEN_KEY)
    return None if v is None else U64.unpack(v)[0]


# -- reading ------------------------------------------------------------------------------


def pack_bytes(txn: Txn, pack: int) -> Buf | None:
    """A pack's bytes as this transaction sees them (its fill's, if it is filling it)."""
    fill = txn.local.get(_FILL)
    if isinstance(fill, _Fill) and fill.pack == pack:
        return memoryview(fill.buf)
    return txn.get("packs", pack_key(pack))


def record(txn: Txn, digest: bytes) -> Buf | None:
    """The record of chunk `digest` (None if there is none): the value itself, or a
    view of the slice of its pack. A pointer outside its pack (or to no pack), or
    to a slice whose header is not the codec and dictionary it names, gives an
    empty record, which decodes as damage."""
    v = txn.get("chunks", digest)
    if v is None or not is_pointer(v):
        if v is not None and len(v) >= _HEAD.size:
            _know_dictionary(txn, _HEAD.unpack_from(v, 0)[1])
        return v
    loc = locate(v)
    p = pack_bytes(txn, loc.pack)
    if p is None or loc.offset + loc.length > len(p) or loc.length < _HEAD.size:
        return b""
    if _HEAD.unpack_from(p, loc.offset) != (loc.codec, loc.dict_id):
        return b""
    _know_dictionary(txn, loc.dict_id)
    return memoryview(p)[loc.offset : loc.offset + loc.length]


def _know_dictionary(txn: Txn, dict_id: int) -> None:
    """Make the dictionary `dict_id` known to this process's decoders if it is not:
    a process loads the store's dictionaries when it opens it, and another (the
    mount's idle upkeep, a `migrate`) may train one later. Never deleted, so the
    transaction that found the record finds it too (if not: damage, the decode's)."""
    if dict_id and not codec.known(dict_id):
        data = txn.get("dicts", U64.pack(dict_id))
        if data is not None:
            codec.register(dict_id, data)


# -- writing ------------------------------------------------------------------------------


class _Fill:
    """The pack a write transaction appends to, written once before it commits."""

    def __init__(self, txn: Txn) -> None:
        self.txn = txn
        self.pack = -1
        self.buf = bytearray()
        self._start(open_pack(txn))
        txn.on_commit(self.flush)

    def _start(self, pack: int | None) -> None:
        if pack is not None:
            have = self.txn.get("packs", pack_key(pack))
            if have is not None and len(have) < CARRY_MAX:
                self.pack, self.buf = pack, bytearray(have)
                return
            _drop_if_dead(self.txn, pack)  # free() keeps the open pack: it is open no more
        nv = self.txn.get("meta", NEXT_KEY)
        self.pack = U64.unpack(nv)[0] if nv is not None else 1
        self.txn.put("meta", NEXT_KEY, U64.pack(self.pack + 1))
        self.txn.put("meta", OPEN_KEY, U64.pack(self.pack))
        self.buf = bytearray()
        put_info(self.txn, self.pack, Info(0, 0, 0))

    def append(self, rec: Buf) -> int:
        """Append `rec` (accounted live); the pack and offset it went to."""
        if self.buf and len(self.buf) + len(rec) > PACK_TARGET:
            self.flush()
            full = self.pack
            self._start(None)
            _drop_if_dead(self.txn, full)  # its chunks may have died in this transaction
        off = len(self.buf)
        self.buf += rec
        i = info(self.txn, self.pack) or Info(0, 0, 0)
        put_info(
            self.txn, self.pack, Info(len(self.buf), i.live_bytes + len(rec), i.live_chunks + 1)
        )
        return off

    def flush(self) -> None:
        self.txn.put("packs", pack_key(self.pack), memoryview(self.buf))


def _drop_if_dead(txn: Txn, pack: int) -> None:
    """Delete `pack` if no live chunk is left in it (a pack that stops being the one
    filled: free() never drops that one)."""
    i = info(txn, pack)
    if i is not None and i.live_chunks == 0:
        txn.delete("packs", pack_key(pack))
        txn.delete("packinfo", pack_key(pack))


def _fill(txn: Txn) -> _Fill:
    f = txn.local.get(_FILL)
    if not isinstance(f, _Fill):
        f = txn.local[_FILL] = _Fill(txn)
    return f


def place(txn: Txn, digest: bytes, rec: Buf) -> None:
    """Store `rec` as chunk `digest`'s record, replacing (and freeing) any it had."""
    if txn.get("chunks", digest) is not None:
        free(txn, digest)
    if len(rec) >= _HEAD.size and rec[0] & codec.KIND == codec.ZSTD_DICT:
        _ensure_dictionary(txn, _HEAD.unpack_from(rec, 0)[1])
    if len(rec) > PACK_MAX or len(rec) < 5:
        txn.put("chunks", digest, rec)
        return
    kind, dict_id = _HEAD.unpack_from(rec, 0)
    f = _fill(txn)
    off = f.append(rec)
    txn.put("chunks", digest, pointer(Location(f.pack, off, len(rec), kind, dict_id)))


def _ensure_dictionary(txn: Txn, dict_id: int) -> None:
    """Store dictionary `dict_id` (from this process's registry) if the store lacks
    it: a chunk never names a dictionary its store does not hold."""
    k = U64.pack(dict_id)
    if txn.get("dicts", k) is None:
        data = codec.registered(dict_id)
        if data is None:
            raise ValueError(f"a record names dictionary {dict_id:08x}, which nobody has")
        txn.put("dicts", k, data)


def free(txn: Txn, digest: bytes) -> int:
    """Delete chunk `digest`'s record; the record bytes freed (0 if none)."""
    v = txn.get("chunks", digest)
    if v is None:
        return 0
    if not is_pointer(v):
        n = len(v)
        txn.delete("chunks", digest)
        return n
    loc = locate(v)
    txn.delete("chunks", digest)
    i = info(txn, loc.pack)
    if i is None:
        return loc.length
    i.live_bytes = max(0, i.live_bytes - loc.length)
    i.live_chunks = max(0, i.live_chunks - 1)
    fill = txn.local.get(_FILL)
    filling = isinstance(fill, _Fill) and fill.pack == loc.pack
    if i.live_chunks == 0 and not filling and loc.pack != open_pack(txn):
        txn.delete("packs", pack_key(loc.pack))
        txn.delete("packinfo", pack_key(loc.pack))
    else:
        put_info(txn, loc.pack, i)
    return loc.length


# -- compaction and upgrade (idle time) -----------------------------------------------------


def victims(txn: Txn, limit: int = 64, skip: set[int] | None = None) -> list[int]:
    """Packs mostly dead enough to compact (not the one being filled, nor those of
    `skip`), at most `limit`."""
    current = open_pack(txn)
    out = []
    for pack, i in all_info(txn):
        if pack == current or (skip and pack in skip):
            continue
        if i is not None and i.size and i.dead_bytes >= DEAD_RATIO * i.size:
            out.append(pack)
            if len(out) >= limit:
                break
    return out


def members(txn: Txn, packs: set[int]) -> dict[int, list[tuple[bytes, bytes]]]:
    """(digest, pointer value) of every chunk in `packs`, by pack (a scan of `chunks`)."""
    out: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in packs}
    for k, v in txn.range("chunks", b""):
        if is_pointer(v):
            loc = locate(v)
            if loc.pack in packs:
                out[loc.pack].append((k, bytes(v)))
    return out


def move_out(txn: Txn, pack: int, chunks: list[tuple[bytes, bytes]]) -> int:
    """Move the live chunks of `pack` (as `members` saw them) to the pack being
    filled, then drop `pack` if nothing lives in it. Chunks whose pointer changed
    since are left alone. Returns the bytes moved."""
    moved = 0
    src = txn.get("packs", pack_key(pack))
    for d, ptr in chunks:
        v = txn.get("chunks", d)
        if src is None or v is None or bytes(v) != ptr:
            continue
        loc = locate(ptr)
        if loc.offset + loc.length > len(src):
            continue  # damage: fsck's to report, not ours to move
        # A copy: the pack's pages may move once this transaction writes.
        # (A write transaction's values are copies: `src` stays valid as it writes.)
        place(txn, d, src[loc.offset : loc.offset + loc.length])
        moved += loc.length
    i = info(txn, pack)
    if i is not None and i.live_chunks == 0:
        txn.delete("packs", pack_key(pack))
        txn.delete("packinfo", pack_key(pack))
    return moved


def upgrade_batch(txn: Txn, limit: int = PACK_TARGET, scan: int = 4096) -> bool:
    """Move up to `limit` bytes of small records stored alone (as schema 1 stored
    them) into packs, looking at up to `scan` chunks from the cursor in meta on;
    True once the whole of `chunks` has been looked at."""
    cv = txn.get("meta", UPGRADE_CURSOR)
    todo: list[tuple[bytes, bytes]] = []
    size = 0
    nxt: bytes | None = None
    for n, (k, v) in enumerate(txn.range("chunks", bytes(cv) if cv is not None else b"")):
        if size >= limit or n >= scan:
            nxt = k
            break
        if not is_pointer(v) and len(v) <= PACK_MAX:
            todo.append((k, bytes(v)))
            size += len(v)
    for k, v in todo:
        place(txn, k, v)
    if nxt is None:
        txn.delete("meta", UPGRADE_CURSOR)
        txn.put("meta", UPGRADED, b"1")
        return True
    txn.put("meta", UPGRADE_CURSOR, nxt)
    return False


def upgraded(txn: Txn) -> bool:
    """Whether no small record stored alone is left from before packs."""
    return txn.get("meta", UPGRADED) is not None

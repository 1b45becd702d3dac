"""fsck's invariant 8: where chunk records lie (packs.py) and the dictionaries
they name (dictionaries.py), and its repair of pack accounting.

What is checked, from one scan of `chunks`, `packs` and `packinfo`:
- every packed chunk lies inside a pack that exists, and its slice starts with
  the codec and dictionary its pointer names (else it cannot be read: its files
  are reported as holding a damaged chunk, healed from Phase 3 by --repair);
- no two chunks of a pack overlap;
- each pack's accounting (size, live bytes, live chunks) matches the pack and
  the chunks in it, every pack is accounted and every account has its pack,
  and no pack without live chunks is kept (except the one being filled);
- every dictionary a chunk names exists.
Memory: a (pack, offset, length) per packed chunk, as the other checks keep a
digest per chunk.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from . import codec, packs
from .kv import Txn
from .records import U64


@dataclass
class Finding:
    kind: str
    detail: str
    digest: bytes | None = None
    key: bytes | None = None


@dataclass
class PackScan:
    findings: list[Finding] = field(default_factory=list)
    unreadable: set[bytes] = field(default_factory=set)  # chunks whose record is lost


def check(txn: Txn) -> PackScan:
    out = PackScan()
    spans: dict[int, list[tuple[int, int, bytes]]] = defaultdict(list)
    named_dicts: dict[int, int] = defaultdict(int)
    dict_ok: dict[int, bool] = {}

    def names_dict(d: bytes, dict_id: int) -> None:
        named_dicts[dict_id] += 1
        ok = dict_ok.get(dict_id)
        if ok is None:
            ok = dict_ok[dict_id] = txn.get("dicts", U64.pack(dict_id)) is not None
        if not ok:
            out.unreadable.add(d)

    sizes: dict[int, int] = {}
    for k, v in txn.range("packs", b""):
        if len(k) == U64.size:
            sizes[U64.unpack(k)[0]] = len(v)
        else:
            out.findings.append(Finding("pack-accounting", "a pack key that is not an id", key=k))
    for k, v in txn.range("chunks", b""):
        if packs.is_pointer(v):
            loc = packs.locate(v)
            if loc.codec & codec.KIND == codec.ZSTD_DICT:
                names_dict(k, loc.dict_id)
            size = sizes.get(loc.pack)
            if size is None or loc.offset + loc.length > size:
                where = "no pack" if size is None else f"pack {loc.pack} of {size} bytes"
                out.findings.append(
                    Finding(
                        "chunk-outside-pack",
                        f"its location ({loc.offset}+{loc.length} in pack {loc.pack}) "
                        f"lies outside {where}",
                        digest=k,
                    )
                )
                out.unreadable.add(k)
                continue
            rec = packs.record(txn, k)
            if not rec:
                out.findings.append(
                    Finding(
                        "chunk-header-differs",
                        f"its slice of pack {loc.pack} does not start with its codec",
                        digest=k,
                    )
                )
                out.unreadable.add(k)
            spans[loc.pack].append((loc.offset, loc.length, k))
        elif len(v) >= codec.HEADER_SIZE:
            kind, dict_id = codec.header(v)
            if kind & codec.KIND == codec.ZSTD_DICT:
                names_dict(k, dict_id)
    _overlaps_and_accounts(txn, out, spans, sizes)
    for dict_id, n in sorted(named_dicts.items()):
        if not dict_ok[dict_id]:
            out.findings.append(
                Finding(
                    "missing-dictionary",
                    f"dictionary {dict_id:08x}, named by {n} chunks, is not stored",
                    key=U64.pack(dict_id),
                )
            )
    return out


def _overlaps_and_accounts(
    txn: Txn,
    out: PackScan,
    spans: dict[int, list[tuple[int, int, bytes]]],
    sizes: dict[int, int],
) -> None:
    current = packs.open_pack(txn)
    accounted = {}
    for pack, i in packs.all_info(txn):
        accounted[pack] = i
    for pack in sorted(set(sizes) | set(accounted) | set(spans)):
        mine = sorted(spans.get(pack, ()))
        end, prev = 0, None
        for off, n, d in mine:
            if off < end and prev is not None:
                out.findings.append(
                    Finding(
                        "chunks-overlap",
                        f"it overlaps chunk {prev.hex()[:16]} in pack {pack}",
                        digest=d,
                    )
                )
            if off + n > end:
                end, prev = off + n, d
        live = sum(n for _o, n, _d in mine)
        want = packs.Info(sizes.get(pack, 0), live, len(mine))
        have = accounted.get(pack)
        key = packs.pack_key(pack)
        if pack not in sizes:
            if mine:
                continue  # its chunks are reported as outside their pack
            out.findings.append(
                Finding("pack-accounting", f"pack {pack} is accounted, not stored", key=key)
            )
        elif have != want:
            out.findings.append(
                Finding(
                    "pack-accounting",
                    f"pack {pack} is accounted as {_said(have)}, holds {_said(want)}",
                    key=key,
                )
            )
        elif not mine and pack != current:
            out.findings.append(Finding("dead-pack", f"pack {pack} holds no live chunk", key=key))


def _said(i: packs.Info | None) -> str:
    if i is None:
        return "nothing"
    return f"{i.size} bytes, {i.live_bytes} live in {i.live_chunks} chunks"


def rebuild_accounting(txn: Txn) -> int:
    """Account every pack from its bytes and the chunks pointing into it; drop
    accounts of missing packs and packs no chunk lives in (but the one being
    filled). Returns how many records changed."""
    live: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for _k, v in txn.range("chunks", b""):
        if packs.is_pointer(v):
            loc = packs.locate(v)
            live[loc.pack][0] += loc.length
            live[loc.pack][1] += 1
    current = packs.open_pack(txn)
    changed = 0
    stored = {U64.unpack(k)[0]: len(v) for k, v in txn.range("packs", b"") if len(k) == U64.size}
    for k, _v in list(txn.range("packs", b"")):
        if len(k) != U64.size:
            txn.delete("packs", k)
            changed += 1
    for pack, _i in list(packs.all_info(txn)):
        if pack not in stored:
            txn.delete("packinfo", packs.pack_key(pack))
            changed += 1
    top = 0
    for pack, size in stored.items():
        top = max(top, pack)
        lb, lc = live.get(pack, (0, 0))
        if lc == 0 and pack != current:
            txn.delete("packs", packs.pack_key(pack))
            txn.delete("packinfo", packs.pack_key(pack))
            changed += 1
            continue
        want = packs.Info(size, lb, lc)
        if packs.info(txn, pack) != want:
            packs.put_info(txn, pack, want)
            changed += 1
    if current is not None and current not in stored:
        txn.delete("meta", packs.OPEN_KEY)
    nv = txn.get("meta", packs.NEXT_KEY)
    if nv is None or U64.unpack(nv)[0] <= top:
        txn.put("meta", packs.NEXT_KEY, U64.pack(top + 1))
    return changed

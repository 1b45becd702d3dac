"""How one chunk is kept at rest: a codec byte, a dictionary id, the payload.

The codec byte's low bits say how the payload is coded: 0 the bytes as they are
(when compression does not pay), 1 zstd, 2 zstd with a dictionary trained on
the store (dictionaries.py; the id is the dictionary's). Bit `COLD` says the
chunk was recompressed cold (recompress.py) so it is not tried again; it does
not change decoding. A dictionary id under any codec but 2 is damage. Decoding
always checks the blake3 of the result against the chunk's key.

Dictionaries are looked up in a registry of this process (`register`), filled
from each store as it opens or trains one. Several stores of one process may
hold different dictionaries with the same id: each is tried, and only the one
whose output hashes to the key is accepted.

A record is stored alone in `chunks` or as a slice of a pack (packs.py); both
are the same bytes.
"""

from __future__ import annotations

import codecs
import struct
import threading

import zstandard

from .chunker import digest
from .errors import CorruptChunk

RAW = 0
ZSTD = 1
ZSTD_DICT = 2
KIND = 0x0F  # the codec byte's bits that say how to decode
COLD = 0x10  # recompressed cold: not tried again

_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size

_local = threading.local()
_lock = threading.Lock()
# dictionary id -> the dictionaries of that id this process has seen (see the docstring).
_registry: dict[int, list[zstandard.ZstdCompressionDict]] = {}


def dictionary_id(data: bytes | memoryview) -> int:
    """The id a dictionary is stored under: derived from its bytes, never 0."""
    return int.from_bytes(digest(data)[:4], "big") or 1


def register(dict_id: int, data: bytes | memoryview) -> zstandard.ZstdCompressionDict:
    """Make a dictionary known to this process's decoders (and encoders); the one
    to pass to `encode`. Registering the same bytes again returns the same object."""
    raw = bytes(data)
    with _lock:
        have = _registry.setdefault(dict_id, [])
        for d in have:
            if d.as_bytes() == raw:
                return d
        d = zstandard.ZstdCompressionDict(raw)
        have.append(d)
        return d


def known(dict_id: int) -> bool:
    """Whether a dictionary stored under `dict_id` is registered (cheap: per read)."""
    return dict_id in _registry


def registered(dict_id: int) -> bytes | None:
    """The bytes of a registered dictionary stored under `dict_id`, if any."""
    with _lock:
        for d in _registry.get(dict_id, ()):
            data: bytes = d.as_bytes()
            if dictionary_id(data) == dict_id:
                return data
    return None


def is_text(plain: bytes | memoryview) -> bool:
    """Whether a chunk looks like text (what a dictionary trained on sessions helps):
    its first 4 KiB hold no NUL and decode as UTF-8 (a character cut at the end
    allowed)."""
    head = bytes(plain[:4096])
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _compressor(
    level: int, zdict: zstandard.ZstdCompressionDict | None
) -> zstandard.ZstdCompressor:
    key = (level, id(zdict))
    cs: dict[tuple[int, int], zstandard.ZstdCompressor] | None = getattr(_local, "c", None)
    if cs is None:
        cs = _local.c = {}
    c = cs.get(key)
    if c is None:
        # Registered dictionaries live as long as the process: id() stays theirs.
        c = cs[key] = zstandard.ZstdCompressor(level=level, dict_data=zdict)
    return c


def _decompressor(zdict: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdDecompressor:
    ds: dict[int, zstandard.ZstdDecompressor] | None = getattr(_local, "d", None)
    if ds is None:
        ds = _local.d = {}
    d = ds.get(id(zdict))
    if d is None:
        d = ds[id(zdict)] = zstandard.ZstdDecompressor(dict_data=zdict)
    return d


def encode(
    plain: bytes | memoryview,
    level: int = 3,
    dictionary: tuple[int, zstandard.ZstdCompressionDict] | None = None,
    cold: bool = False,
) -> bytes:
    """The record for `plain`: zstd at `level` (with `dictionary`, (id, dict), if
    given and `plain` is text), or raw if that is not smaller. `cold` marks it
    recompressed cold."""
    flag = COLD if cold else 0
    if dictionary is not None and is_text(plain):
        kind, dict_id, zdict = ZSTD_DICT, dictionary[0], dictionary[1]
    else:
        kind, dict_id, zdict = ZSTD, 0, None
    packed = _compressor(level, zdict).compress(plain)
    if len(packed) + 8 < len(plain):
        return _HEADER.pack(kind | flag, dict_id) + packed
    return _HEADER.pack(RAW | flag, 0) + bytes(plain)


def header(record: bytes | memoryview) -> tuple[int, int]:
    """(codec byte, dictionary id) of a record; struct.error if it is too short."""
    codec, dict_id = _HEADER.unpack_from(record, 0)
    return int(codec), int(dict_id)


def decode(record: bytes | memoryview, key: bytes, length: int | None = None) -> bytes:
    """The plain bytes of `record`, checked against `key`; CorruptChunk if they differ."""
    try:
        codec, dict_id = _HEADER.unpack_from(record, 0)
        body = memoryview(record)[HEADER_SIZE:]
        kind = codec & KIND
        if codec & ~(KIND | COLD) or (kind != ZSTD_DICT) == (dict_id != 0):
            # Only codec 2 names a dictionary, and it always does: anything else is a
            # flipped bit, which would otherwise go unseen since the payload decodes.
            raise CorruptChunk(key)
        if kind == RAW:
            plain = bytes(body)
        elif kind in (ZSTD, ZSTD_DICT):
            # The frame header's unused bit (0x10 of its descriptor, after the 4-byte
            # magic) is ignored by decoders and always clear in what we write.
            if len(body) < 5 or body[4] & 0x10:
                raise CorruptChunk(key)
            # A flipped bit in the frame header can claim any size: check it before
            # letting the decoder allocate it.
            if length is not None and zstandard.frame_content_size(body) != length:
                raise CorruptChunk(key)
            if kind == ZSTD:
                plain = _decompressor().decompress(body, max_output_size=length or 0)
            else:
                return _decode_dict(body, dict_id, key, length)
        else:
            raise CorruptChunk(key)
    except (zstandard.ZstdError, struct.error, MemoryError, ValueError) as e:
        raise CorruptChunk(key) from e
    if digest(plain) != key:
        raise CorruptChunk(key)
    return plain


def _decode_dict(body: memoryview, dict_id: int, key: bytes, length: int | None) -> bytes:
    with _lock:
        candidates = list(_registry.get(dict_id, ()))
    for zdict in candidates:
        try:
            plain = _decompressor(zdict).decompress(body, max_output_size=length or 0)
        except zstandard.ZstdError:
            continue
        if digest(plain) == key:
            return plain
    raise CorruptChunk(key)

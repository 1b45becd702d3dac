"""How one chunk is kept at rest: a codec byte, a dictionary id, the payload.

Codec 0 keeps the bytes as they are (used when compression does not pay),
1 is zstd. Codec 2 (zstd with a trained dictionary, for a cold recompression)
is reserved: nothing writes it yet, so `decode` refuses it as damage, as it
does a dictionary id under any other codec. Decoding always checks the blake3
of the result against the chunk's key.
"""

from __future__ import annotations

import struct
import threading

import zstandard

from .chunker import digest
from .errors import CorruptChunk

RAW = 0
ZSTD = 1
ZSTD_DICT = 2

_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    key = f"c{level}"
    c = getattr(_local, key, None)
    if c is None:
        c = zstandard.ZstdCompressor(level=level)
        setattr(_local, key, c)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = zstandard.ZstdDecompressor()
        _local.d = d
    return d


def encode(plain: bytes | memoryview, level: int = 3) -> bytes:
    """The record for `plain`: zstd at `level`, or raw if that is not smaller."""
    packed = _compressor(level).compress(plain)
    if len(packed) + 8 < len(plain):
        return _HEADER.pack(ZSTD, 0) + packed
    return _HEADER.pack(RAW, 0) + bytes(plain)


def decode(record: bytes | memoryview, key: bytes, length: int | None = None) -> bytes:
    """The plain bytes of `record`, checked against `key`; CorruptChunk if they differ."""
    try:
        codec, dict_id = _HEADER.unpack_from(record, 0)
        body = memoryview(record)[HEADER_SIZE:]
        if codec != ZSTD_DICT and dict_id != 0:
            # Only codec 2 names a dictionary: anything else there is a flipped bit,
            # which would otherwise go unseen since the payload still decodes.
            raise CorruptChunk(key)
        if codec == RAW:
            plain = bytes(body)
        elif codec == ZSTD:
            # The frame header's unused bit (0x10 of its descriptor, after the 4-byte
            # magic) is ignored by decoders and always clear in what we write.
            if len(body) < 5 or body[4] & 0x10:
                raise CorruptChunk(key)
            # A flipped bit in the frame header can claim any size: check it before
            # letting the decoder allocate it.
            if length is not None and zstandard.frame_content_size(body) != length:
                raise CorruptChunk(key)
            plain = _decompressor().decompress(body, max_output_size=length or 0)
        else:
            raise CorruptChunk(key)
    except (zstandard.ZstdError, struct.error, MemoryError, ValueError) as e:
        raise CorruptChunk(key) from e
    if digest(plain) != key:
        raise CorruptChunk(key)
    return plain

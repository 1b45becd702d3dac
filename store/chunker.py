"""Content-defined chunking (FastCDC via pyfastcdc) and the chunk hash (blake3-256).

Sizes are tuned by the benchmark; the store records the ones it was created
with, because changing them would stop new chunks deduplicating against old ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import blake3
import pyfastcdc

# Tuned with the benchmark's tree (tools/bench.py, 201.5 MB): 32/128/512 KiB store
# 98.2 MB of LMDB pages against 99.7 MB at 16/64/256 (half as many overflow-page
# tails) and 99.0 MB at 64/256/1024 (dedup starts to suffer).
MIN_SIZE = 32 * 1024
AVG_SIZE = 128 * 1024
MAX_SIZE = 512 * 1024

DIGEST_SIZE = 32


def digest(data: bytes | memoryview) -> bytes:
    """blake3-256 of the plain bytes: the chunk's key."""
    # One thread (blake3's default): callers already hash chunks on several threads.
    return blake3.blake3(data).digest()


@dataclass(frozen=True)
class Chunker:
    min_size: int = MIN_SIZE
    avg_size: int = AVG_SIZE
    max_size: int = MAX_SIZE

    def _cdc(self) -> pyfastcdc.FastCDC:
        # pyfastcdc's avg_size is added to min_size (cut-point skipping), so
        # ask for avg - min to get the average we mean.
        return pyfastcdc.FastCDC(
            max(256, self.avg_size - self.min_size),
            min_size=self.min_size,
            max_size=self.max_size,
        )

    def cuts(self, buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, int]]:
        """(offset, length) of each chunk of `buf`; the last one ends at len(buf)."""
        if len(buf) == 0:
            return
        for c in self._cdc().cut_buf(buf):
            yield c.offset, c.length

    def stream(self, f: BinaryIO) -> Iterator[bytes]:
        """The chunks of a stream, as bytes that stay valid."""
        for c in self._cdc().cut_stream(_Reader(f)):
            yield bytes(c.data)


class _Reader:
    """Adapts a raw file to pyfastcdc's readinto()."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def readinto(self, b: memoryview) -> int:
        n: int | None = self.f.readinto(b)  # type: ignore[attr-defined]
        return n or 0

"""Appends: an append costs its own bytes (and at most the chunker's minimum chunk
size besides), not a re-chunking of the file's last chunk at every close."""

from __future__ import annotations

import random

from ferryfs.store import content
from ferryfs.store.records import HOLE, ROOT_INO
from ferryfs.store.store import Store
from helpers.store import check_invariants


def extents(st: Store, ino: int) -> list[tuple[int, bytes, int]]:
    with st.backend.read() as txn:
        return list(content.all_extents(txn, ino))


def test_an_append_leaves_a_full_last_chunk_alone_and_joins_a_short_one() -> None:
    st = Store.memory()
    rng = random.Random(7)
    ino = st.create(ROOT_INO, b"log.jsonl", 0o644, 0, 0).ino
    body = rng.randbytes(300_000)
    st.write(ino, 0, body)
    before = extents(st, ino)
    assert before[-1][2] >= st.chunker.min_size, "the sample's last chunk is short"
    line = b'{"role":"assistant","text":"hello"}\n' * 40
    rw = st.plan_write(ino, [(len(body), line)])
    assert sum(len(r) for r in rw.records.values()) < 4 * len(line), "re-chunked old bytes"
    assert st.commit(rw) is not None
    body += line
    after = extents(st, ino)
    assert after[: len(before)] == before  # the old chunks, the last one too, untouched
    # The appended line is a short last chunk: the next append joins it.
    st.write(ino, len(body), line)
    body += line
    final = extents(st, ino)
    assert final[: len(before)] == before and len(final) == len(before) + 1
    assert final[-1][0] == len(body) - 2 * len(line) and final[-1][1] != HOLE
    assert st.read(ino, 0, len(body) + 10) == body
    check_invariants(st)

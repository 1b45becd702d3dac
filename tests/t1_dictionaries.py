"""zstd dictionaries trained on the store (store/dictionaries.py): trained once the
store holds enough text, stored with an id, used for new text chunks (not for
binary ones), read back exactly in another process; fsck finds a missing one
and --repair heals the chunks naming it from Phase 3; two stores of one process
with different dictionaries under one id each read their own.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from ferryfs.store import cas, codec, content, dictionaries, packs, upkeep
from ferryfs.store.chunker import digest
from ferryfs.store.fsck import Checker
from ferryfs.store.fsck_repair import repair
from ferryfs.store.records import ROOT_INO, U64
from ferryfs.store.store import Store
from helpers.store import check_invariants
from helpers.trees import prose


def text(rng: random.Random, n: int) -> bytes:
    out = []
    size = 0
    while size < n:
        line = '{{"role": "{}", "text": "{}"}}\n'.format(
            rng.choice(["user", "assistant"]),
            prose(rng, rng.randrange(3, 40)),
        )
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


def kinds(s: Store) -> dict[int, int]:
    """How many chunks of each codec (without the cold bit)."""
    out: dict[int, int] = {}
    with s.backend.read() as txn:
        for _k, v in txn.range("chunks", b""):
            kind = packs.locate(v).codec if packs.is_pointer(v) else v[0]
            out[kind & codec.KIND] = out.get(kind & codec.KIND, 0) + 1
    return out


@pytest.fixture
def small_min(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dictionaries, "TRAIN_MIN", 300_000)


def make_text_store(tmp_path: Path, files: int = 60) -> tuple[Store, Path, dict[str, bytes]]:
    rng = random.Random(21)
    src = tmp_path / "src"
    src.mkdir()
    want = {}
    for i in range(files):
        body = text(rng, rng.randrange(2000, 12000))
        (src / f"s{i:03d}.jsonl").write_bytes(body)
        want[f"s{i:03d}.jsonl"] = body
    (src / "blob.bin").write_bytes(rng.randbytes(50_000))
    want["blob.bin"] = (src / "blob.bin").read_bytes()
    s = Store.open(str(tmp_path / "s"), source=str(src), create=True)
    s.import_all()
    for name in want:
        s.migrate(s.lookup(ROOT_INO, name.encode()).ino)
    return s, src, want


def read(s: Store, name: str) -> bytes:
    ino = s.lookup(ROOT_INO, name.encode()).ino
    return s.read(ino, 0, s.getattr(ino).size + 1)


def test_no_dictionary_until_the_store_holds_enough_text(tmp_path: Path) -> None:
    s, _src, _want = make_text_store(tmp_path, files=5)
    with s:
        assert not upkeep.train(s)
        assert s.dictionary is None
        assert not upkeep.train(s)  # not tried again before the store grows


def test_a_trained_dictionary_compresses_new_text_chunks(tmp_path: Path, small_min: None) -> None:
    s, _src, want = make_text_store(tmp_path)
    with s:
        assert upkeep.step(s)
        assert s.dictionary is not None
        dict_id = s.dictionary[0]
        with s.backend.read() as txn:
            assert txn.get("dicts", U64.pack(dict_id)) is not None
            assert dictionaries.current(txn) is not None
        rng = random.Random(4)
        new_text = text(rng, 30_000)
        new_bin = rng.randbytes(30_000)
        for name, body in (("new.jsonl", new_text), ("new.bin", new_bin)):
            ino = s.create(ROOT_INO, name.encode(), 0o100644, 0, 0).ino
            s.write(ino, 0, body)
            want[name] = body
        assert kinds(s).get(codec.ZSTD_DICT, 0) >= 1
        with s.backend.read() as txn:
            ino = s.lookup(ROOT_INO, b"new.bin").ino
            d = next(d for _o, d, _n in content.all_extents(txn, ino))
            rec = cas.record(txn, d)
            assert (
                rec is not None and rec[0] & codec.KIND != codec.ZSTD_DICT
            )  # binary: no dictionary
        for name, body in want.items():
            assert read(s, name) == body
        check_invariants(s, deep=True)
        assert [p.kind for p in Checker(s, deep=True, resume=False).run().problems] == []
    # Another process (an empty registry) reads them back from the store's dictionary.
    code = (
        "import sys\n"
        "from ferryfs.store.store import Store\n"
        "from ferryfs.store.records import ROOT_INO\n"
        "with Store.open(sys.argv[1], readonly=True) as s:\n"
        "    ino = s.lookup(ROOT_INO, b'new.jsonl').ino\n"
        "    sys.stdout.buffer.write(s.read(ino, 0, 1 << 20))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, check=True
    ).stdout
    assert out == new_text


def test_fsck_finds_a_missing_dictionary_and_repair_heals_its_chunks(
    tmp_path: Path, small_min: None
) -> None:
    s, _src, _want = make_text_store(tmp_path)
    with s:
        assert upkeep.train(s) and s.dictionary is not None
        trained = s.dictionary
    rng = random.Random(9)
    src2 = tmp_path / "src2"
    src2.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (src2 / name).write_bytes(text(rng, 20_000))
    with Store.open(str(tmp_path / "s2"), source=str(src2), create=True) as s2:
        s2.import_all()
        s2.dictionary = trained  # as if trained here: new text chunks use it
        for name in ("a.jsonl", "b.jsonl"):
            s2.migrate(s2.lookup(ROOT_INO, name.encode()).ino)
        dict_id = trained[0]
        assert kinds(s2).get(codec.ZSTD_DICT, 0) >= 2
        with s2.backend.read() as txn:  # placing a record stored the dictionary it names
            assert txn.get("dicts", U64.pack(dict_id)) is not None
        assert [p.kind for p in Checker(s2, resume=False).run().problems] == []
        s2.transact(lambda txn: txn.delete("dicts", U64.pack(dict_id)))
        rep = Checker(s2, resume=False).run()
        found = {p.kind for p in rep.problems}
        assert "missing-dictionary" in found, found
        assert "corrupt-chunk" in found  # its chunks, named with the files holding them
        s2.dictionary = None
        assert repair(s2, rep) == []
        assert [p.kind for p in Checker(s2, deep=True, resume=False).run().problems] == []
        for name in ("a.jsonl", "b.jsonl"):
            assert read(s2, name) == (src2 / name).read_bytes()


def test_two_dictionaries_with_one_id_each_decode_their_own(tmp_path: Path) -> None:
    rng = random.Random(2)
    samples_a = [text(rng, 3000) for _ in range(300)]
    samples_b = [rng.randbytes(16).hex().encode() * 100 for _ in range(300)]
    da = codec.register(77, zstandard.train_dictionary(20_000, samples_a).as_bytes())
    db = codec.register(77, zstandard.train_dictionary(20_000, samples_b).as_bytes())
    for zd, plain in ((da, samples_a[0]), (db, samples_b[0])):
        rec = codec.encode(plain, 3, (77, zd))
        assert rec[0] == codec.ZSTD_DICT
        assert codec.decode(rec, digest(plain)) == plain


def test_a_dictionary_trained_after_a_reader_opened_is_found_by_it(
    tmp_path: Path, small_min: None
) -> None:
    """A process loads the store's dictionaries when it opens it; one trained later
    by another process (the mount's idle upkeep, a `migrate`, beside a `search`)
    must still decode: found in the store by the first read that needs it."""
    s, _src, _want = make_text_store(tmp_path)
    with s:
        assert upkeep.step(s)
        assert s.dictionary is not None
        dict_id = s.dictionary[0]
        body = text(random.Random(5), 30_000)
        ino = s.create(ROOT_INO, b"late.jsonl", 0o100644, 0, 0).ino
        s.write(ino, 0, body)
        assert kinds(s).get(codec.ZSTD_DICT, 0) >= 1
        # As a reader that opened the store before the dictionary existed.
        with codec._lock:
            codec._registry.pop(dict_id)
        s.cache = cas.ChunkCache()  # (nothing decoded kept from before)
        assert read(s, "late.jsonl") == body

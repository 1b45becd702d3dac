"""The benchmark's small-file tree (tools/bench/bench_smalltree.py): the same bytes
for a seed, sessions of 2-60 KB that parse, and a doc copy that never follows a
symlink nor copies anything but regular files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

NOW_NS = 1_750_000_000 * 10**9


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The benchmark is not installed: its modules are found as `make bench` finds them.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools" / "bench"))


def contents(root: Path) -> dict[str, tuple[bytes, int]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = (p.read_bytes(), p.lstat().st_mtime_ns)
    return out


def fake_doc(root: Path) -> Path:
    """A doc tree with a nested file, a symlink to a file outside, a symlinked
    directory and a FIFO: only the two regular files may be copied."""
    doc = root / "doc"
    (doc / "pkg-a").mkdir(parents=True)
    (doc / "pkg-a" / "copyright").write_text("MIT\n")
    (doc / "pkg-b" / "examples").mkdir(parents=True)
    (doc / "pkg-b" / "examples" / "x.conf").write_bytes(b"a = 1\n" * 100)
    secret = root / "secret"
    secret.write_text("outside")
    (doc / "pkg-a" / "link").symlink_to(secret)
    (doc / "pkg-c").symlink_to(doc / "pkg-b")
    os.mkfifo(doc / "pkg-a" / "fifo")
    return doc


def test_same_seed_same_tree(tmp_path: Path) -> None:
    from bench_smalltree import MAX_SIZE, MIN_SIZE, SmallTree, build_small_tree

    doc = fake_doc(tmp_path / "src")

    def build(name: str, seed: int = 1) -> SmallTree:
        return build_small_tree(
            tmp_path / name, scale=0.005, seed=seed, doc=doc, doc_scale=1.0, now_ns=NOW_NS
        )

    a, b = build("a"), build("b")
    build("c", seed=2)
    ca, cb, cc = contents(tmp_path / "a"), contents(tmp_path / "b"), contents(tmp_path / "c")
    assert a == b and ca == cb
    assert ca != cc
    assert a.sessions == 100 and a.files == len(ca) == 102
    assert a.bytes == sum(len(d) for d, _m in ca.values())
    sizes = []
    for rel, (data, _mtime) in ca.items():
        if rel.startswith("sessions/"):
            sizes.append(len(data))
            if rel.endswith(".json"):
                json.loads(data)
            else:
                assert rel.endswith(".jsonl")
                for line in data.splitlines():
                    json.loads(line)
    assert all(size <= MAX_SIZE for size in sizes)
    assert sum(size >= MIN_SIZE for size in sizes) >= 0.95 * len(sizes)
    assert sorted(sizes)[len(sizes) // 2] < 30_000  # most are small


def test_doc_copy_skips_symlinks_and_special_files(tmp_path: Path) -> None:
    from bench_smalltree import build_small_tree

    doc = fake_doc(tmp_path / "src")
    t = build_small_tree(tmp_path / "t", scale=0.001, doc=doc, doc_scale=1.0, now_ns=NOW_NS)
    copied = {k: v for k, v in contents(tmp_path / "t").items() if k.startswith("doc/")}
    assert sorted(copied) == ["doc/pkg-a/copyright", "doc/pkg-b/examples/x.conf"]
    assert copied["doc/pkg-a/copyright"][0] == b"MIT\n"
    assert t.doc_files == 2 and t.doc_bytes == 4 + 600
    for dirpath, dirs, files in os.walk(tmp_path / "t"):
        for name in dirs + files:
            assert stat.S_ISDIR(os.lstat(Path(dirpath, name)).st_mode) or stat.S_ISREG(
                os.lstat(Path(dirpath, name)).st_mode
            )


def test_scale_keeps_a_stable_share_of_the_doc(tmp_path: Path) -> None:
    from bench_smalltree import build_small_tree

    doc = tmp_path / "doc"
    for i in range(400):
        (doc / f"p{i % 20}").mkdir(parents=True, exist_ok=True)
        (doc / f"p{i % 20}" / f"f{i}").write_text(str(i))
    half = build_small_tree(tmp_path / "h", scale=0.001, doc=doc, doc_scale=0.5, now_ns=NOW_NS)
    few = build_small_tree(tmp_path / "f", scale=0.001, doc=doc, doc_scale=0.1, now_ns=NOW_NS)
    assert 150 < half.doc_files < 250
    assert 0 < few.doc_files < half.doc_files
    again = build_small_tree(tmp_path / "h2", scale=0.001, doc=doc, doc_scale=0.5, now_ns=NOW_NS)
    assert sorted(contents(tmp_path / "h")) == sorted(contents(tmp_path / "h2"))
    with pytest.raises(ValueError):
        build_small_tree(tmp_path / "bad", scale=0)
    assert again == half

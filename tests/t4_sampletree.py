"""The sample Phase 3 tree: deterministic, dedup-able, odd where it should be, and
`ferryfs sample` refuses to write into a directory that already has something in it."""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections import defaultdict
from pathlib import Path

import pytest
import zstandard
from ferryfs.store.chunker import Chunker, digest
from ferryfs.tools.cli import main
from ferryfs.tools.sampletree import Summary, generate

NOW_NS = 1_750_000_000 * 10**9
DAY_NS = 86400 * 10**9


def walk(root: Path) -> dict[bytes, bytes]:
    """Every regular file under root, by path relative to root (bytes), to its content."""
    out: dict[bytes, bytes] = {}
    top = os.fsencode(root)
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, top)] = f.read()
    return out


def fingerprint(root: Path) -> list[tuple[bytes, str, int]]:
    """(path, sha256, mtime_ns) of every entry, directories included, in a stable order."""
    top = os.fsencode(root)
    rows = []
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content = b""
            if name in files:
                with open(path, "rb") as f:
                    content = f.read()
            rows.append(
                (os.path.relpath(path, top), hashlib.sha256(content).hexdigest(), st.st_mtime_ns)
            )
    return sorted(rows)


def test_same_seed_same_tree_other_seed_other_tree(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", sessions=25, seed=3, attachment_mb=None, now_ns=NOW_NS)
    b = generate(tmp_path / "b", sessions=25, seed=3, attachment_mb=None, now_ns=NOW_NS)
    generate(tmp_path / "c", sessions=25, seed=4, attachment_mb=None, now_ns=NOW_NS)
    assert a == b
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    hashes_a = {h for _, h, _ in fingerprint(tmp_path / "a")}
    hashes_c = {h for _, h, _ in fingerprint(tmp_path / "c")}
    # Only the empty file (and directories' placeholder hash) may coincide.
    assert len(hashes_a & hashes_c) <= 1


def test_summary_counts_what_is_on_disk(sample_tree: tuple[Path, Summary, int]) -> None:
    root, summary, _ = sample_tree
    files = walk(root)
    assert summary.files == len(files)
    assert summary.bytes == sum(len(c) for c in files.values())
    n_dirs = sum(len(dirs) for _, dirs, _ in os.walk(os.fsencode(root)))
    assert summary.dirs == n_dirs
    logs = [p for p in files if p.startswith(b"sessions/") and p != b"sessions/imported/empty.json"]
    assert summary.sessions == len(logs)
    assert summary.attachments == sum(p.startswith(b"attachments/") for p in files)


def test_session_files_parse_except_the_damaged_one(sample_tree: tuple[Path, Summary, int]) -> None:
    root, _, _ = sample_tree
    damaged = {b"sessions/imported/crashed-mid-write.jsonl", b"sessions/imported/empty.json"}
    index = json.loads((root / "index.json").read_bytes())
    for rel, content in walk(root).items():
        if rel in damaged or not rel.startswith(b"sessions/"):
            continue
        if rel.endswith(b".jsonl"):
            for line in content.splitlines():
                json.loads(line)
        else:
            assert rel.endswith(b".json")
            json.loads(content)
    for entry in index["sessions"]:
        assert (root / entry["path"]).is_file()
    crashed = (root / "sessions/imported/crashed-mid-write.jsonl").read_bytes()
    *whole, last = crashed.split(b"\n")
    for line in whole:
        json.loads(line)
    with pytest.raises(json.JSONDecodeError):
        json.loads(last)


def test_resumed_sessions_share_their_parents_bytes(sample_tree: tuple[Path, Summary, int]) -> None:
    root, summary, _ = sample_tree
    logs = {p: c for p, c in walk(root).items() if p.endswith(b".jsonl") and c}
    # A resumed copy keeps its parent's first line (the parent's session header).
    by_header: dict[bytes, list[bytes]] = defaultdict(list)
    for content in logs.values():
        by_header[content.split(b"\n", 1)[0]].append(content)
    resumed = []
    for group in by_header.values():
        for c in group:
            parents = [p for p in group if len(p) < len(c) and c.startswith(p)]
            if parents:
                parent = max(parents, key=len)
                assert json.loads(c[len(parent) :].split(b"\n", 1)[0])["type"] == "resume"
                resumed.append((parent, c))
    assert summary.resumed > 0
    assert len(resumed) == summary.resumed

    # Content-defined chunking finds the shared prefix: most of the parent's
    # chunks reappear in the copy. Small chunks, so the sample's logs span several.
    chunker = Chunker(16 * 1024, 64 * 1024, 256 * 1024)

    def chunks(buf: bytes) -> list[bytes]:
        return [digest(buf[o : o + n]) for o, n in chunker.cuts(buf)]

    parent, copy = max(resumed, key=lambda pc: len(pc[0]))
    assert len(parent) > 2 * chunker.max_size
    theirs, ours = chunks(parent), set(chunks(copy))
    assert sum(d in ours for d in theirs) >= len(theirs) - 1


def test_attachments_repeat_byte_for_byte_and_do_not_compress(
    sample_tree: tuple[Path, Summary, int],
) -> None:
    root, summary, _ = sample_tree
    by_hash: dict[bytes, list[bytes]] = defaultdict(list)
    for rel, content in walk(root).items():
        if rel.startswith(b"attachments/"):
            by_hash[hashlib.sha256(content).digest()].append(rel)
    copies = sum(len(paths) - 1 for paths in by_hash.values())
    assert summary.duplicate_attachments > 0
    assert copies == summary.duplicate_attachments
    # Some copies carry another name, not just the same name in another folder.
    assert any(len({os.path.basename(p) for p in paths}) > 1 for paths in by_hash.values())

    for paths in by_hash.values():
        data = (root / os.fsdecode(paths[0])).read_bytes()
        if paths[0].endswith(b".png"):
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
        elif paths[0].endswith(b".pdf"):
            assert data.startswith(b"%PDF-") and data.endswith(b"%%EOF\n")
        if len(data) > 64 * 1024:
            assert len(zstandard.ZstdCompressor(level=3).compress(data)) > 0.99 * len(data)


def test_odd_names_are_there(sample_tree: tuple[Path, Summary, int]) -> None:
    root, summary, _ = sample_tree
    names = set(os.listdir(os.fsencode(root / "sessions" / "imported")))
    nfc = unicodedata.normalize("NFC", "café.json").encode()
    nfd = unicodedata.normalize("NFD", "café.json").encode()
    assert nfc != nfd and {nfc, nfd} <= names
    assert b"caf\xe9.json" in names
    with pytest.raises(UnicodeDecodeError):
        b"caf\xe9.json".decode()
    assert any(len(n) == 255 for n in names)
    assert any(n.startswith(b"-") for n in names)
    assert b"Old Client Export" in names
    assert "résumé – 東京 ✓.jsonl".encode() in names
    assert b"empty" in names and not os.listdir(root / "sessions/imported/empty")
    assert (root / "sessions/imported/empty.json").stat().st_size == 0
    assert summary.odd_names == 7


def test_mtimes_spread_over_90_days_with_cold_files(sample_tree: tuple[Path, Summary, int]) -> None:
    root, _, now_ns = sample_tree
    ages = [(now_ns - mtime) / DAY_NS for _, _, mtime in fingerprint(root)]
    assert min(ages) >= 0 and max(ages) <= 90
    assert sum(age > 30 for age in ages) > len(ages) / 3  # cold
    assert sum(age < 30 for age in ages) > len(ages) / 10  # warm


def test_attachment_mb_scales_attachments_only(tmp_path: Path) -> None:
    plain = generate(tmp_path / "plain", sessions=20, seed=5, attachment_mb=None, now_ns=NOW_NS)
    big = generate(tmp_path / "big", sessions=20, seed=5, attachment_mb=12, now_ns=NOW_NS)
    a, b = walk(tmp_path / "plain"), walk(tmp_path / "big")
    assert a.keys() == b.keys()
    att = [p for p in a if p.startswith(b"attachments/")]
    assert all(a[p] == b[p] for p in a if p not in att)
    assert abs(sum(len(b[p]) for p in att) - 12e6) < 0.01 * 12e6
    assert big.bytes > plain.bytes


def test_cli_writes_into_new_or_empty_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        assert main(["sample", str(target), "--sessions", "3", "--seed", "1", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["files"] == len(walk(target)) > 3


@pytest.mark.parametrize("occupant", ["file", "hidden", "dir"])
def test_cli_refuses_a_non_empty_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], occupant: str
) -> None:
    target = tmp_path / "phase3"
    target.mkdir()
    if occupant == "dir":
        (target / "sub").mkdir()
    else:
        (target / ("notes.txt" if occupant == "file" else ".keep")).write_bytes(b"mine")
    before = fingerprint(target)
    assert main(["sample", str(target), "--sessions", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ferryfs: ") and "not empty" in err and err.count("\n") == 1
    assert fingerprint(target) == before


def test_cli_refuses_a_file_and_bad_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    assert main(["sample", str(tmp_path / "f")]) == 2
    assert main(["sample", str(tmp_path / "d"), "--sessions", "-1"]) == 2
    assert main(["sample", str(tmp_path / "d"), "--attachment-mb", "-5"]) == 2
    assert not (tmp_path / "d").exists()
    assert capsys.readouterr().err.count("ferryfs: ") == 3

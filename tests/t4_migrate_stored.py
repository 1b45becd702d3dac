"""What `ferryfs migrate` leaves on disk. It trains the store's zstd
dictionaries from the text it migrates (dictionaries.Learner): the first once
it has seen 4 MiB of text, another each time the text seen has doubled; the
text chunks after each are compressed with it. Too little text trains none. It
ends by rewriting the database with every page full and none free
(kv.LmdbBackend.copy_compact): a tree of small files costs well under 1 KB of
database per file beyond its chunks. Every file still reads back exactly and
fsck --deep is clean."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from ferryfs.store import dictionaries
from ferryfs.store.store import Store
from ferryfs.tools.cli import main
from helpers.store import walk_store
from helpers.trees import files_of, prose

FILE_BYTES = 10_000


def session(rng: random.Random) -> bytes:
    """One JSONL session of about FILE_BYTES bytes, as agent logs look."""
    lines: list[str] = []
    size = 0
    while size < FILE_BYTES:
        turn = {
            "uuid": f"{rng.getrandbits(128):032x}",
            "type": "message",
            "role": rng.choice(("user", "assistant")),
            "content": prose(rng, rng.randint(20, 80)),
        }
        line = json.dumps(turn)
        lines.append(line)
        size += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def session_tree(root: Path, text_bytes: int, seed: int = 14) -> int:
    """Sessions of `text_bytes` bytes in all under `root`; how many files."""
    rng = random.Random(seed)
    n = 0
    total = 0
    while total < text_bytes:
        d = root / f"day-{n // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        body = session(rng)
        (d / f"s{n:05d}.jsonl").write_bytes(body)
        total += len(body)
        n += 1
    return n


def ferry(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def stats(capsys: pytest.CaptureFixture[str], store: Path) -> dict[str, int]:
    code, out, err = ferry(capsys, "stats", str(store), "--json")
    assert code == 0, err
    figures: dict[str, int] = json.loads(out)
    return figures


def test_migrate_trains_dictionaries_and_uses_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    # 4 MiB of text trains the first; the second is due at 8 MiB. (One reader
    # thread: files are prepared up to 4 tasks of 64 files ahead of the commits,
    # and those prepared before a dictionary was trained are not made with it.)
    files = session_tree(src, 3 * dictionaries.TRAIN_MIN)
    code, out, err = ferry(
        capsys, "migrate", str(src), "--store", str(store), "--no-index", "--jobs", "1"
    )
    assert code == 0, err
    got = stats(capsys, store)
    assert got["files_migrated"] == files
    assert got["dictionaries"] >= 2, got
    # Most of the text after the first 4 MiB (and what was prepared meanwhile).
    assert got["chunks_dict"] >= got["chunks"] // 3, got
    code, out, err = ferry(capsys, "fsck", str(store), "--deep")
    assert code == 0, out + err
    # Every file reads back exactly (fsck --deep hashed every chunk; this reads
    # every file through the store's read path too).
    with Store.open(str(store), readonly=True) as s:
        got_files = walk_store(s)
    want = files_of(src)
    assert {k.decode(): e.body for k, e in got_files.items() if k.endswith(b".jsonl")} == want


def test_migrate_trains_none_on_little_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    session_tree(src, dictionaries.TRAIN_MIN // 2)
    code, _out, err = ferry(capsys, "migrate", str(src), "--store", str(store), "--no-index")
    assert code == 0, err
    got = stats(capsys, store)
    assert got["dictionaries"] == 0 and got["chunks_dict"] == 0, got


def test_a_tree_of_tiny_files_costs_little_database_per_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = tmp_path / "src", tmp_path / "store"
    rng = random.Random(7)
    files = 3000
    for i in range(files):
        d = src / f"d{i // 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        body = {"id": f"{rng.getrandbits(128):032x}", "text": prose(rng, 40)}
        (d / f"session-{i:05d}.json").write_text(json.dumps(body))
    code, _out, err = ferry(capsys, "migrate", str(src), "--store", str(store))
    assert code == 0, err
    # Its name, inode, origin, extent, chunk pointer and refcount, the rollback
    # point's row and the index's rows, and a share of a pack: about 770 bytes a
    # file once pages are full (1,450 before: pages half full, and free ones).
    on_disk = (store / "db" / "data.mdb").stat().st_blocks * 512
    assert on_disk / files < 1000, on_disk / files
    code, out, err = ferry(capsys, "fsck", str(store), "--deep")
    assert code == 0, out + err
    with Store.open(str(store), readonly=True) as s:
        got = {k.decode(): e.body for k, e in walk_store(s).items()}
    assert {k: v for k, v in got.items() if k.endswith(".json")} == files_of(src)


def test_no_rewrite_without_room_for_a_second_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ferryfs.tools import migrate_cmd

    src, store = tmp_path / "src", tmp_path / "store"
    session_tree(src, 200_000)
    rewrites: list[object] = []
    monkeypatch.setattr(migrate_cmd.upkeep, "shrink_file", rewrites.append)
    real = migrate_cmd.shutil.disk_usage

    def nearly_full(path: str) -> object:
        total, used, _free = real(path)
        return type(real(path))(total, used, 1 << 20)

    monkeypatch.setattr(migrate_cmd.shutil, "disk_usage", nearly_full)
    code, _out, err = ferry(capsys, "migrate", str(src), "--store", str(store), "--no-index")
    assert code == 0, err
    assert rewrites == []
    monkeypatch.setattr(migrate_cmd.shutil, "disk_usage", real)
    code, _out, err = ferry(
        capsys, "migrate", str(src), "--store", str(tmp_path / "roomy"), "--no-index"
    )
    assert code == 0, err
    assert len(rewrites) == 1  # with room

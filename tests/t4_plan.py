"""`ferryfs plan`: exact counts, a dedup ratio that sees duplicates, symlinks and FIFOs
counted but never followed or opened, nothing written anywhere, and a one-line
exit 2 for a source that is not a directory."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import SampleTree
from ferryfs.tools import planner
from ferryfs.tools.cli import main


def _jsonl(rng: random.Random, lines: int) -> bytes:
    words = ["session", "user", "agent", "chunk", "store", "migrate", "cache", "index", "retry"]
    roles = ["user", "assistant"]
    return b"".join(
        json.dumps({"n": i, "role": rng.choice(roles), "text": words_of(rng, words)}).encode()
        + b"\n"
        for i in range(lines)
    )


def words_of(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choices(words, k=40))


class Tiny:
    """A small hostile tree in `root`, and outside it the things its links point at."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "phase3"
        self.outside = base / "outside"
        rng = random.Random(5)
        log = _jsonl(rng, 3000)  # about 1 MB: several 64 KiB chunks
        blob = rng.randbytes(300_000)  # incompressible
        self.files: dict[str, bytes] = {
            "sessions/2025/01/a.jsonl": log,
            "sessions/2025/02/a-copy.jsonl": log,  # the same bytes under another name
            "sessions/2025/02/b.jsonl": log + _jsonl(rng, 200),  # a resumed session
            "attachments/a/image.png": blob,
            "attachments/b/image (1).png": blob,
            "index.json": b'{"sessions": ["a", "b"]}\n',
            "empty.json": b"",
        }
        for rel, data in self.files.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (self.root / "sessions" / "empty-dir").mkdir()
        self.outside.mkdir()
        # Reading through either link would change the counts by 5 MB or 3 files.
        (self.outside / "big.bin").write_bytes(b"x" * 5_000_000)
        for i in range(3):
            (self.outside / f"f{i}.json").write_bytes(b"{}")
        os.symlink(self.outside / "big.bin", self.root / "attachments" / "out.bin")
        os.symlink(self.outside, self.root / "sessions" / "out-dir")
        os.symlink("nowhere", self.root / "dangling")
        os.mkfifo(self.root / "sessions" / "pipe")

    @property
    def bytes(self) -> int:
        return sum(len(d) for d in self.files.values())

    @property
    def dirs(self) -> int:
        # phase3, sessions, 2025, 01, 02, empty-dir, attachments, a, b
        return 9


@pytest.fixture
def tiny(tmp_path: Path) -> Tiny:
    return Tiny(tmp_path)


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["plan", *args, "--json"]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def snapshot(path: Path) -> list[tuple[str, int, int, int, int, int, int]]:
    """(path, mode, size, mtime, ctime, inode, nlink) of `path` and everything under it."""
    rows = []
    for dirpath, dirs, files in os.walk(path):
        for name in [".", *dirs, *files]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rows.append(
                (
                    os.path.relpath(p, path),
                    st.st_mode,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                    st.st_ino,
                    st.st_nlink,
                )
            )
    return sorted(rows)


def test_counts_are_exact(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    p = plan_json(capsys, str(tiny.root))
    assert p["files"] == len(tiny.files)
    assert p["bytes"] == tiny.bytes
    assert p["dirs"] == tiny.dirs
    assert p["symlinks"] == 3
    assert p["special"] == 1
    assert p["unreadable"] == 0
    assert p["sampled_bytes"] == tiny.bytes  # within the budget: sampled whole
    assert set(p) >= {
        "files", "dirs", "bytes", "symlinks", "special", "unreadable", "sampled_bytes",
        "dedup_ratio", "compression_ratio", "est_stored_bytes", "est_seconds",
        "disk_needed", "disk_free", "fits",
    }  # fmt: skip


def test_duplicates_show_as_dedup_and_text_compresses(
    tiny: Tiny, capsys: pytest.CaptureFixture[str]
) -> None:
    p = plan_json(capsys, str(tiny.root))
    # a.jsonl three times over (a copy, a resumed copy) and the blob twice.
    assert p["dedup_ratio"] > 1.8
    assert p["compression_ratio"] > 1.5
    assert p["est_stored_bytes"] < tiny.bytes / 2
    assert p["disk_needed"] > p["est_stored_bytes"]
    assert p["fits"] is (p["disk_needed"] <= p["disk_free"])


def test_symlinks_out_of_the_tree_are_never_followed(
    tiny: Tiny, capsys: pytest.CaptureFixture[str]
) -> None:
    before = os.stat(tiny.outside / "big.bin")
    p = plan_json(capsys, str(tiny.root))
    assert p["bytes"] == tiny.bytes  # not + 5 MB through attachments/out.bin
    assert p["files"] == len(tiny.files)  # not + 3 through sessions/out-dir
    assert os.stat(tiny.outside / "big.bin").st_atime_ns == before.st_atime_ns


def test_nothing_is_written(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    tree, outside = snapshot(tiny.root), snapshot(tiny.outside)
    parent = sorted(os.listdir(tiny.base))
    parent_st = os.stat(tiny.base)
    assert main(["plan", str(tiny.root)]) == 0
    capsys.readouterr()
    plan_json(capsys, str(tiny.root), "--sample-mb", "0.5")
    assert snapshot(tiny.root) == tree
    assert snapshot(tiny.outside) == outside
    assert sorted(os.listdir(tiny.base)) == parent  # no phase3.ferry, no cache
    assert os.stat(tiny.base).st_mtime_ns == parent_st.st_mtime_ns


def test_human_report(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(tiny.root)]) == 0
    out = capsys.readouterr().out
    assert f"{len(tiny.files)} in {tiny.dirs} directories" in out
    assert "3 symlinks, 1 special, 0 unreadable" in out
    assert str(tiny.base / "phase3.ferry") in out
    labels = [line[:14] for line in out.splitlines()]
    assert all(label[12:] == "  " for label in labels)  # one aligned column


@pytest.mark.parametrize("what", ["missing", "file"])
def test_source_not_a_directory_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    src = tmp_path / "src"
    if what == "file":
        src.write_bytes(b"not a tree")
    assert main(["plan", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ferryfs: source ")
    assert sorted(os.listdir(tmp_path)) == ([] if what == "missing" else ["src"])


def test_sample_is_spread_bounded_and_deterministic(sample_tree: SampleTree) -> None:
    budget = 2_000_000
    a = planner.plan(str(sample_tree.root), budget, jobs=2)
    b = planner.plan(str(sample_tree.root), budget, jobs=1)
    assert a.files == sample_tree.summary.files
    assert a.bytes == sample_tree.summary.bytes
    assert 0 < a.sampled_bytes <= budget
    assert (a.sampled_files, a.sampled_bytes) == (b.sampled_files, b.sampled_bytes)
    assert (a.dedup_ratio, a.compression_ratio) == (b.dedup_ratio, b.compression_ratio)
    # Scaled up to the whole tree, not just the sample.
    assert a.est_stored_bytes > a.sampled_bytes / a.dedup_ratio / a.compression_ratio


def test_sampler_keeps_a_subset_within_budget() -> None:
    s = planner._Sampler(1_000_000)
    for i in range(10_000):
        s.offer(b"f%05d" % i, 1000 + i % 7 * 100)
    kept = s.files()
    assert 1_000_000 / 3 < sum(take for _, _, take in kept) <= 1_000_000
    # Evenly spread: kept files come from the whole walk, not just its start.
    names = [int(p[1:]) for p, _, _ in kept]
    assert names[0] < 1000 and names[-1] > 9000


def plan_unprivileged(root: Path) -> planner.Plan:
    """`planner.plan(root)` as an ordinary user: as root, in a forked child that
    drops to nobody after entering `root` (its parents may be closed to others)."""
    if os.geteuid() != 0:
        return planner.plan(str(root), jobs=1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.chdir(root)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            os.write(w, json.dumps(planner.plan(".", jobs=1).as_json()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    d = json.loads(out)
    return planner.Plan(**{k: d[k] for k in ("files", "bytes", "unreadable", "dirs")})


def test_unreadable_entries_are_counted_not_fatal(tiny: Tiny) -> None:
    (tiny.root / "attachments" / "b").chmod(0)
    (tiny.root / "index.json").chmod(0)
    try:
        p = plan_unprivileged(tiny.root)
    finally:
        (tiny.root / "attachments" / "b").chmod(0o755)
        (tiny.root / "index.json").chmod(0o644)
    assert p.unreadable == 2  # the directory (its file unseen) and index.json
    assert p.files == len(tiny.files) - 2
    assert p.bytes == tiny.bytes - len(tiny.files["attachments/b/image (1).png"]) - len(
        tiny.files["index.json"]
    )

"""`ferryfs migrate SRC --store S` end to end: everything migrates and reads back,
a second run has nothing to do, a run killed mid-commit resumes, and bad input
gets one line and exit code 2."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SampleTree
from ferryfs.store.store import Store
from ferryfs.tools.cli import main
from helpers.store import check_invariants, snapshot, walk_store


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def stats(capsys: pytest.CaptureFixture[str], store: Path) -> dict[str, int]:
    code, out, err = run(capsys, "stats", str(store), "--json")
    assert code == 0, err
    figures: dict[str, int] = json.loads(out)
    return figures


def assert_store_matches(store_dir: Path, src: Path) -> None:
    """Every entry of the Phase 3 tree is in the store, files byte for byte."""
    with Store.open(str(store_dir), readonly=True) as s:
        got = walk_store(s)
        check_invariants(s)
    want = snapshot(src)
    assert set(got) == set(want) - {b""}
    for rel, ((mode, uid, gid, size, mtime_ns, *_), body) in want.items():
        if not rel:
            continue
        e = got[rel]
        assert (e.mode, e.uid, e.gid, e.mtime_ns) == (mode, uid, gid, mtime_ns), rel
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            assert (e.size, e.body) == (size, body), rel


def test_migrate_everything_then_nothing(
    sample_tree: SampleTree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = sample_tree.root, tmp_path / "store"
    before = snapshot(src)
    code, out, err = run(capsys, "migrate", str(src), "--store", str(store), "--json")
    assert code == 0, err
    first = json.loads(out)
    figures = stats(capsys, store)
    assert {"files_total", "files_migrated", "bytes_logical", "bytes_stored", "chunks"} <= set(
        figures
    )
    files = [b for (m, *_), b in before.values() if stat.S_ISREG(m)]
    assert figures["files_total"] == len({r[6] for r, _ in before.values() if stat.S_ISREG(r[0])})
    assert figures["files_migrated"] == figures["files_total"] == first["files"]
    assert figures["bytes_logical"] >= sum(map(len, set(files)))
    assert figures["chunks"] > 0
    assert figures["bytes_stored"] > 0
    assert first["errors"] == 0
    assert_store_matches(store, src)

    code, out, err = run(capsys, "migrate", str(src), "--store", str(store), "--json")
    assert code == 0, err
    assert json.loads(out)["files"] == 0
    assert stats(capsys, store)["chunks"] == figures["chunks"]
    assert snapshot(src) == before


def make_tree(root: Path, files: int) -> dict[Path, bytes]:
    rng = random.Random(11)
    out = {}
    common = rng.randbytes(50_000)
    for i in range(files):
        p = root / f"s{i % 4}" / f"f{i:03d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        data = common + rng.randbytes(rng.randrange(1, 150_000)) if i % 3 else common
        p.write_bytes(data)
        out[p] = data
    return out


# Runs `ferryfs migrate` with one file per commit; at the second commit it says
# so from inside the write transaction and waits there to be killed.
KILLABLE = """
import sys, threading
from ferryfs.store import migration as ingest
from ferryfs.tools import migrate_cmd
from ferryfs.tools.cli import main
migrate_cmd.GROUP_FILES = 1
real = ingest.commit_extents
calls = []
def commit_extents(txn, m):
    real(txn, m)
    calls.append(m.ino)
    if len(calls) == 2:
        print("inside the second commit", flush=True)
        threading.Event().wait()
ingest.commit_extents = commit_extents
sys.exit(main(sys.argv[1:]))
"""


def wait_for_line(proc: subprocess.Popen[str], want: str, seconds: float) -> None:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: [lines.put(x) for x in out], daemon=True).start()
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no {want!r} (exit {proc.poll()})"
        try:
            if lines.get(timeout=min(left, 0.5)).strip() == want:
                return
        except queue.Empty:
            continue


def test_a_run_killed_mid_commit_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = tmp_path / "phase3", tmp_path / "store"
    make_tree(src, 24)
    before = snapshot(src)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, "migrate", str(src), "--store", str(store), "--jobs", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_line(proc, "inside the second commit", 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    figures = stats(capsys, store)
    assert figures["files_total"] == 24
    assert figures["files_migrated"] == 1  # the first commit stayed, the second never was
    with Store.open(str(store)) as s:  # a writer frees what the killed run staged
        check_invariants(s)

    code, out, err = run(capsys, "migrate", str(src), "--store", str(store), "--json")
    assert code == 0, err
    assert json.loads(out)["files"] == 23
    figures = stats(capsys, store)
    assert figures["files_migrated"] == figures["files_total"] == 24
    assert_store_matches(store, src)
    assert snapshot(src) == before


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ferryfs: ")
    return lines[0]


def test_bad_input_gets_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, other, store = tmp_path / "phase3", tmp_path / "other", tmp_path / "store"
    make_tree(src, 3)
    make_tree(other, 2)
    a_file = src / "s0" / "f000.bin"

    code, _, err = run(capsys, "migrate", str(tmp_path / "missing"), "--store", str(store))
    assert code == 2
    assert "missing" in one_line_error(err)
    assert not store.exists()

    code, _, err = run(capsys, "migrate", str(a_file), "--store", str(store))
    assert code == 2
    assert "f000.bin" in one_line_error(err)
    assert not store.exists()

    code, _, err = run(capsys, "migrate", str(src), "--store", str(store), "--jobs", "0")
    assert code == 2
    one_line_error(err)

    assert run(capsys, "migrate", str(src), "--store", str(store))[0] == 0
    figures = stats(capsys, store)
    code, _, err = run(capsys, "migrate", str(other), "--store", str(store))
    assert code == 2
    assert str(src) in one_line_error(err)
    assert stats(capsys, store) == figures

    with Store.open(str(store)):
        code, _, err = run(capsys, "migrate", str(src), "--store", str(store))
    assert code != 0
    assert "in use" in one_line_error(err)

    code, _, err = run(capsys, "stats", str(tmp_path / "nostore"))
    assert code != 0
    one_line_error(err)


def test_default_store_beside_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "phase3"
    files = make_tree(src, 5)
    code, out, err = run(capsys, "migrate", str(src))
    assert code == 0, err
    assert "5 files" in out
    store = tmp_path / "phase3.ferry"
    with Store.open(str(store), readonly=True) as s:
        got = walk_store(s)
    for p, data in files.items():
        assert got[os.fsencode(p.relative_to(src))].body == data


def test_small_files_go_to_the_workers_many_to_a_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker task is up to TASK_FILES small files, or TASK_BYTES: a big file
    is a task alone, and every file is in exactly one task, in path order."""
    from ferryfs.tools import migrate_cmd

    monkeypatch.setattr(migrate_cmd, "TASK_FILES", 8)
    monkeypatch.setattr(migrate_cmd, "TASK_BYTES", 10_000)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"s{i:02d}.json").write_bytes(b"x" * 100)
    (src / "s10.json").write_bytes(b"y" * 50_000)
    with Store.open(str(tmp_path / "store"), source=str(src), create=True) as s:
        s.import_all()
        tasks = list(migrate_cmd._tasks(s))
        flat = [ino for t in tasks for ino in t]
        assert flat == list(s.legacy_files_by_path())
        big = s.lookup(1, b"s10.json").ino
        assert [big] in tasks
        assert [len(t) for t in tasks] == [8, 2, 1, 8, 1]
        done = migrate_cmd.migrate_all(s, 2)
        assert done == {"files": 20, "bytes": 19 * 100 + 50_000, "errors": 0}
        check_invariants(s, deep=True)

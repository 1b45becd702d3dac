"""^C during `ferryfs migrate` with the index built beside it: the command and
its word-cutting worker process stop soon, with the one line, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.update(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def test_interrupt_stops_migrate_and_its_worker_with_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3000):
        d = src / f"d{i // 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"s{i:05d}.jsonl").write_text(f'{{"content": "session {i} " }}\n' * 200)
    cmd = [sys.executable, "-m", "ferryfs.tools.cli", "migrate", str(src)]
    cmd += ["--store", str(tmp_path / "store")]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _children(p.pid):  # the worker process has started
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            assert time.monotonic() < deadline, "no worker process"
            time.sleep(0.01)
        workers = _children(p.pid)
        os.killpg(p.pid, signal.SIGINT)  # as a terminal's ^C: the whole group
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("migrating")]
    assert lines == ["ferryfs: interrupted"] or p.returncode == 0, err
    # Its worker processes end too (they may take a moment after their parent).
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{w}") and not _zombie(w) for w in workers):
        assert time.monotonic() < deadline, f"processes {workers} outlived migrate"
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_a_late_interrupt_waits_for_the_indexing_thread_before_the_store_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """^C once the migration itself is over, while the index thread still reads
    the store (the main thread waiting for it): the thread is told to stop and
    waited for, and only then is the index (then the store) closed. Found by a
    clean Debian chroot: a traceback of the thread reading a closed store."""
    from ferryfs.store import index_writer
    from ferryfs.store.store import Store
    from ferryfs.tools import migrate_cmd

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text('{"content": "hello"}')
    events: list[str] = []

    def slow_catch_up(self: index_writer.Indexer, stop: Any = None) -> index_writer.Progress:
        if stop is None:
            return index_writer.Progress()
        events.append("thread started")
        deadline = time.monotonic() + 20
        while not stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        events.append("thread stopped" if stop() else "thread timed out")
        return index_writer.Progress()

    real_close = index_writer.Indexer.close

    def close(self: index_writer.Indexer) -> None:
        events.append("index closed")
        real_close(self)

    def migrate_all(store: Store, jobs: int) -> dict[str, int]:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # ^C while joining
        return {"files": 0, "bytes": 0, "errors": 0}

    monkeypatch.setattr(index_writer.Indexer, "catch_up", slow_catch_up)
    monkeypatch.setattr(index_writer.Indexer, "close", close)
    monkeypatch.setattr(migrate_cmd, "migrate_all", migrate_all)
    with (
        Store.open(str(tmp_path / "s"), source=str(src), create=True) as s,
        pytest.raises(KeyboardInterrupt),
    ):
        migrate_cmd.migrate_indexing(s, 1)
    assert events == ["thread started", "thread stopped", "index closed"]


def test_migrate_indexes_without_a_worker_process_where_semaphores_are_refused(
    tmp_path: Path,
) -> None:
    """No POSIX semaphores (/dev/shm read-only, as in some containers; a clean
    Debian chroot's /dev/shm is not writable by other users): `migrate` cuts the
    words itself instead of failing with "Permission denied"."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"s{i}.json").write_text(f'{{"content": "quokka session {i}"}}')
    store = tmp_path / "store"
    cli = f"{sys.executable} -m ferryfs.tools.cli"
    script = (
        "mount -t tmpfs -o ro tmpfs /dev/shm && "
        f"{cli} migrate {src} --store {store} >/dev/null && {cli} search {store} quokka"
    )
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 50

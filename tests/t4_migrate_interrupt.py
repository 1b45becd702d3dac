"""^C during `ferryfs migrate` with the index built beside it: the command and
its word-cutting worker process stop soon, with the one line, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


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

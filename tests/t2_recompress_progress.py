"""The cold recompression's progress, without a mount: store/recompress.run reports
the plain bytes of cold files walked of the walk's total, each extent once, going
on from where a pre-empted walk stopped; fs/counters.RecompressProgress turns the
reports into what `status` shows (state, bytes, chunks, rate, ETA), across
pre-empted runs of one walk."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

from ferryfs.fs.counters import RecompressProgress
from ferryfs.store import recompress
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store
from helpers.trees import prose

DAY = 86400 * 10**9
NOW = 1_800_000_000 * 10**9


def make(tmp_path: Path) -> tuple[Path, int]:
    """A store of cold text files (one large, several chunks) and a hot one; the
    plain bytes of the cold ones."""
    rng = random.Random(71)
    src = tmp_path / "src"
    src.mkdir()
    cold = 0
    for i in range(12):
        body = prose(rng, rng.randrange(2_000, 60_000 if i else 300_000)).encode()
        (src / f"c{i:02d}.jsonl").write_bytes(body)
        os.utime(src / f"c{i:02d}.jsonl", ns=(NOW - 60 * DAY, NOW - 60 * DAY))
        cold += len(body)
    (src / "hot.jsonl").write_bytes(prose(rng, 3000).encode())
    os.utime(src / "hot.jsonl", ns=(NOW, NOW))
    path = tmp_path / "s"
    with Store.open(str(path), source=str(src), create=True) as s:
        s.import_all()
        for _c, _name, node in s.readdir(ROOT_INO, limit=100):
            s.migrate(node.ino)
    return path, cold


def test_a_walk_reports_every_cold_byte_once_even_when_pre_empted(tmp_path: Path) -> None:
    path, cold = make(tmp_path)
    tracker = RecompressProgress()
    reports: list[recompress.Result] = []

    def report(r: recompress.Result) -> None:
        reports.append(dataclasses.replace(r))
        tracker.report(r)

    shown: list[dict[str, Any]] = []
    per_run: list[int] = []
    with Store.open(str(path)) as s:
        runs = 0
        while True:  # pre-empted after its first chunk each time, as a busy mount would
            runs += 1
            tracker.begin()
            r = recompress.run(s, 30, stop=lambda: True, progress=report, now_ns=NOW)
            tracker.end()
            shown.append(tracker.status())
            per_run.append(r.chunks_recompressed)
            if r.done:
                break
            assert runs < 500
    assert runs > 3
    assert all(x.bytes_total == cold for x in reports)
    walked = [x.bytes_walked for x in reports]
    assert walked[-1] == cold and reports[-1].done
    # Within a run the bytes only go up; a resumed run starts at its cursor's file.
    assert all(0 <= w <= cold for w in walked)
    done = [d["recompress_bytes_done"] for d in shown]
    assert done == sorted(done) and done[-1] == cold
    states = [d["recompress_state"] for d in shown]
    assert states[:-1] == ["waiting"] * (len(states) - 1) and states[-1] == "done"
    end = shown[-1]
    # The chunks of the whole walk, counted over its runs, not the last run's only.
    assert end["recompress_chunks"] == sum(per_run) > runs // 2
    assert end["recompress_eta_seconds"] == 0 and end["recompress_walks"] == 1


def test_the_tracker_before_any_walk_and_while_running() -> None:
    t = RecompressProgress()
    s = t.status()
    assert s["recompress_state"] == "not run" and s["recompress_eta_seconds"] is None
    t.begin()
    r = recompress.Result(0, 19, False, bytes_total=1000, bytes_walked=0)
    t.report(r)
    assert t.status()["recompress_state"] == "running"
    t.report(dataclasses.replace(r, bytes_walked=400, chunks_recompressed=3))
    s = t.status()
    assert s["recompress_bytes_done"] == 400 and s["recompress_chunks"] == 3
    t.end()
    assert t.status()["recompress_state"] == "waiting"
    t.begin()  # a new walk after a finished one starts from nothing
    t.report(dataclasses.replace(r, bytes_walked=1000, chunks_recompressed=1, done=True))
    t.end()
    s = t.status()
    assert s["recompress_state"] == "done" and s["recompress_chunks"] == 4
    t.begin()
    t.report(dataclasses.replace(r, bytes_walked=10))
    s = t.status()
    assert s["recompress_chunks"] == 0 and s["recompress_bytes_done"] == 10

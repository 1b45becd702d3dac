"""What a mount has done since it started, shown by `status` (fs/control.py):
the request counters, and the idle sweep's cold recompression as it goes."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ferryfs.store.recompress import Result


@dataclass
class Counters:
    """Touched only on the trio thread (docs/concurrency.md)."""

    reads: int = 0
    migrated_on_open: int = 0
    corrupt_reads: int = 0
    healed: int = 0
    errors: list[str] = field(default_factory=list)
    last_request: float = field(default_factory=time.monotonic)


class RecompressProgress:
    """The idle sweep's cold recompression (store/recompress.py) as status shows it,
    like the sweep's migration: bytes walked of the walk's total, chunks
    recompressed, their bytes before and after, rate and ETA.

    `report` is recompress.run's progress callback: it runs on the nice-19 thread
    doing the walk, while `status` runs on the trio thread, so both take a lock,
    held only to copy a few numbers. The sweep brackets each idle call with
    `begin`/`end`; a walk pre-empted by a request is "waiting" until the next
    quiet period carries it on (its figures go on from where it was: see
    recompress.py), then "running" again, and "done" once it reached the end.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: Result | None = None
        self._state = "not run"
        self._fresh = False
        # (monotonic time, bytes walked) of this run's reports: its rate.
        self._window: deque[tuple[float, int]] = deque(maxlen=64)
        self._walks = 0  # walks that reached the end in this mount
        # (chunks, bytes before, bytes after) of the earlier runs of a walk that was
        # pre-empted: a run counts only what it did itself.
        self._base = (0, 0, 0)
        # A resumed run starts at its cursor's file, which the run before may have
        # been part way through: what status showed does not go back meanwhile.
        self._floor = 0

    def begin(self) -> None:
        """An idle call starts: its first report (if it walks) starts a run."""
        with self._lock:
            self._fresh = True

    def report(self, r: Result) -> None:
        snap = dataclasses.replace(r)
        now = time.monotonic()
        with self._lock:
            if self._fresh:  # a new run: a rate over a pause between runs means nothing
                self._fresh = False
                self._window.clear()
                last, (c, b, a) = self._last, self._base
                if self._state == "waiting" and last is not None:  # the same walk, resumed
                    c, b = c + last.chunks_recompressed, b + last.bytes_before
                    a += last.bytes_after
                    self._floor = last.bytes_walked
                else:
                    c = b = a = self._floor = 0
                self._base = (c, b, a)
            self._last = snap
            self._window.append((now, snap.bytes_walked))
            self._state = "running"
            if snap.done:
                self._state = "done"
                self._walks += 1

    def end(self) -> None:
        """The idle call returned: a run it left unfinished was pre-empted."""
        with self._lock:
            self._fresh = False
            if self._state == "running":
                self._state = "waiting"

    def _rate(self) -> float:
        if len(self._window) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._window[0], self._window[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def status(self) -> dict[str, Any]:
        with self._lock:
            r, state, walks, (c, b, a) = self._last, self._state, self._walks, self._base
            rate = self._rate() if state == "running" else 0.0
            floor = self._floor
        total = r.bytes_total if r is not None else 0
        done = min(max(floor, r.bytes_walked), total) if r is not None else 0
        eta: float | None
        if state == "done":
            eta = 0.0
        elif r is None or rate <= 0:
            eta = None
        else:
            eta = max(0, total - done) / rate
        return {
            "recompress_state": state,
            "recompress_bytes_done": done,
            "recompress_bytes_total": total,
            "recompress_chunks": c + (r.chunks_recompressed if r is not None else 0),
            "recompress_bytes_before": b + (r.bytes_before if r is not None else 0),
            "recompress_bytes_after": a + (r.bytes_after if r is not None else 0),
            "recompress_rate": round(rate, 1),
            "recompress_eta_seconds": None if eta is None else round(eta, 1),
            "recompress_walks": walks,
        }

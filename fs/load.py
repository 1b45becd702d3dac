"""How busy the machine is with work other than ours, read from /proc.

`OtherLoad.sample()` returns the number of CPUs kept busy by every other
process since the previous sample: the system's busy jiffies (/proc/stat)
minus this process's own (/proc/self/stat). Counting our own threads out is
what lets the sweep use the idle cores without mistaking itself for the app.
"""

from __future__ import annotations

import os
import time


def _system_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def _self_busy() -> float:
    with open("/proc/self/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return float(rest[11]) + float(rest[12])  # utime + stime, in jiffies


class OtherLoad:
    def __init__(self) -> None:
        self.ncpu = os.cpu_count() or 1
        self._last = (*_system_busy(), _self_busy(), time.monotonic())
        self.value = 0.0

    def sample(self) -> float:
        busy, total, mine, t = *_system_busy(), _self_busy(), time.monotonic()
        b0, t0, m0, _ = self._last
        dt = total - t0
        if dt > 0:
            others = max(0.0, (busy - b0) - (mine - m0))
            self.value = others / dt * self.ncpu
        self._last = (busy, total, mine, t)
        return self.value

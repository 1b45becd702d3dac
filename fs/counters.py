"""What a mount has done since it started, shown by `status` (fs/control.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Counters:
    """Touched only on the trio thread (docs/concurrency.md)."""

    reads: int = 0
    migrated_on_open: int = 0
    corrupt_reads: int = 0
    healed: int = 0
    errors: list[str] = field(default_factory=list)
    last_request: float = field(default_factory=time.monotonic)

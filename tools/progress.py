"""Progress as long commands and `status` show it: a byte-counting bar on a
terminal (Rich) and nothing elsewhere, and the one-line text of the cold
recompression's progress that `status` (a mount's idle sweep) and `ferryfs
recompress` (offline) both print.

Rich is imported only when a bar is made: `ferryfs status` imports this module,
and that command's start-up time is measured (the benchmark's `cli` section).
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING

from ._common import mb

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def recompress_text(done: int, total: int, chunks: int, before: int, after: int) -> str:
    """How far a walk of the cold files is: plain bytes looked at of the walk's
    total, and what the chunks recompressed took before and take now."""
    share = f" ({done / total:.0%})" if total else ""
    return (
        f"{mb(done)} of {mb(total)} of cold files looked at{share}, "
        f"{chunks} chunks recompressed ({mb(before)} -> {mb(after)})"
    )


class Bar:
    """A byte-counting progress bar, silent when stderr is not a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.enabled = sys.stderr.isatty()
        self._p: Progress | None = None
        self._task: TaskID | None = None
        if self.enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
            self._task = self._p.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self._p is not None and self._task is not None:
            self._p.advance(self._task, n)

    def update(self, completed: int, total: int) -> None:
        """Set where the bar is, and its 100% (known only once the work has begun)."""
        if self._p is not None and self._task is not None:
            self._p.update(self._task, completed=completed, total=total)

    def __enter__(self) -> Bar:
        if self._p is not None:
            self._p.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._p is not None:
            self._p.stop()

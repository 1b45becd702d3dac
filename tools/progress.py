"""A progress bar on a terminal and nothing elsewhere (Rich), shared by long commands."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class Bar:
    """A byte-counting progress bar, silent when stderr is not a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.enabled = sys.stderr.isatty()
        self._p: Progress | None = None
        self._task: TaskID | None = None
        if self.enabled:
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

    def __enter__(self) -> Bar:
        if self._p is not None:
            self._p.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._p is not None:
            self._p.stop()

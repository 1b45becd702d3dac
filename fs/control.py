"""The control channel: xattrs on the mount's root, answered only for the
mount's owner or root (checked by the Operations adapter).

`user.ferryfs.pid` and `user.ferryfs.store` say which daemon and store serve
the mount, `user.ferryfs.srcfd` which of its fds holds the Phase 3 tree;
`user.ferryfs.status` is a JSON document; setting
`user.ferryfs.control` to a command (`pause`, `resume`, `cancel`, `sync`)
acts on the mount and returns once it has. `user.ferryfs.open` first writes
out every buffered write it can, then answers (JSON) the files still open and
those whose bytes could not be saved: `ferryfs umount` asks it before it
unmounts anything.

The status counts come from a scan of the store (Store.stats), which takes
time in proportion to it (about 25 ms at 200 MB): it runs on a worker thread,
so the thread that answers FUSE requests goes on meanwhile, and its result is
kept until the store next commits, so that polling an idle mount (`status
--watch`) scans it once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
from ferryfs.store.errors import Invalid, NoData, NotPermitted
from ferryfs.store.stats import Stats
from ferryfs.store.store import Store

from .counters import Counters

Command = Callable[[], Awaitable[None]]
Report = Callable[[], Awaitable[Any]]


class Control:
    """The control xattrs. `commands` act (`sync`, the sweep's `pause`...);
    `reports` are JSON documents the daemon builds (`open`); `status_extra` adds
    to the status document (the sweep's figures)."""

    def __init__(
        self,
        store: Store,
        store_dir: str,
        counters: Counters,
        commands: Mapping[bytes, Command] | None = None,
        reports: Mapping[bytes, Report] | None = None,
        status_extra: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.store = store
        self.store_dir = store_dir
        self.counters = counters
        self.commands = dict(commands or {})
        self.reports = dict(reports or {})
        self.status_extra = status_extra
        self._stats: tuple[int, Stats] | None = None  # (store.commits when scanned, counts)
        self._scan = trio.Lock()  # one scan at a time; callers queued behind it reuse it

    async def get(self, name: bytes) -> bytes:
        if name == b"pid":
            return str(os.getpid()).encode()
        if name == b"store":
            return os.fsencode(os.path.abspath(self.store_dir))
        if name == b"srcfd" and self.store.tree is not None:
            # Lets the owner reach the shadowed Phase 3 tree of an in-place mount
            # through /proc/PID/fd (rollback's export needs it).
            return str(self.store.tree.root_fd).encode()
        if name == b"status":
            return json.dumps(await self.status()).encode()
        if name in self.reports:
            return json.dumps(await self.reports[name]()).encode()
        raise NoData(f"no control attribute {name.decode(errors='replace')}")  # ENOATTR

    async def set(self, name: bytes, value: bytes) -> None:
        if name != b"control":
            raise NotPermitted("only user.ferryfs.control can be set")
        cmd = self.commands.get(value.strip())
        if cmd is None:
            raise Invalid(f"no control command {value.strip().decode(errors='replace')}")
        await cmd()

    async def stats(self) -> Stats:
        async with self._scan:
            commits = self.store.commits  # before the scan: a commit during it rescans
            if self._stats is None or self._stats[0] != commits:
                self._stats = (commits, await trio.to_thread.run_sync(self.store.stats))
            return self._stats[1]

    async def status(self) -> dict[str, Any]:
        s = dataclasses.asdict(await self.stats())
        c = self.counters
        s.update(
            pid=os.getpid(),
            store=os.path.abspath(self.store_dir),
            reads=c.reads,
            migrated_on_open=c.migrated_on_open,
            corrupt_reads=c.corrupt_reads,
            healed=c.healed,
            failsafe=self.store.failsafe,
            mount_errors=c.errors[-20:],  # what went wrong in this mount (latest last)
        )
        s.update(self.status_extra())
        return s

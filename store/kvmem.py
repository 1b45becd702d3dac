"""The in-memory key-value backend: sorted dicts honouring the `Txn` contract of
kv.py, for tests (the store's contract tests run on it and on LMDB alike)."""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Callable, Iterator

from .kv import DBS, Buf, Txn, WriteGuard


class _MemTxn:
    """A transaction on MemoryBackend; writes keep an undo log for abort."""

    def __init__(self, be: MemoryBackend, write: bool) -> None:
        self._be = be
        self._write = write
        self.undo: list[tuple[str, bytes, bytes | None]] = []
        self.hooks: list[Callable[[], None]] = []
        self.local: dict[str, object] = {}

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.hooks.append(fn)

    def get(self, db: str, key: bytes) -> Buf | None:
        return self._be.data[db].get(key)

    def put(self, db: str, key: bytes, value: Buf) -> None:
        assert self._write, "put in a read transaction"
        d = self._be.data[db]
        old = d.get(key)
        if old is None:
            bisect.insort(self._be.keys[db], key)
        self.undo.append((db, key, old))
        d[key] = bytes(value)

    def delete(self, db: str, key: bytes) -> bool:
        assert self._write, "delete in a read transaction"
        d = self._be.data[db]
        old = d.pop(key, None)
        if old is None:
            return False
        ks = self._be.keys[db]
        del ks[bisect.bisect_left(ks, key)]
        self.undo.append((db, key, old))
        return True

    def range(
        self, db: str, start: bytes, stop: bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, Buf]]:
        ks = self._be.keys[db]
        lo = bisect.bisect_left(ks, start)
        hi = len(ks) if stop is None else bisect.bisect_left(ks, stop)
        snapshot = ks[lo:hi]
        if reverse:
            snapshot.reverse()
        d = self._be.data[db]
        for k in snapshot:
            v = d.get(k)
            if v is not None:
                yield k, v

    def rollback(self) -> None:
        for db, key, old in reversed(self.undo):
            d = self._be.data[db]
            ks = self._be.keys[db]
            if old is None:
                if d.pop(key, None) is not None:
                    del ks[bisect.bisect_left(ks, key)]
            else:
                if key not in d:
                    bisect.insort(ks, key)
                d[key] = old


class MemoryBackend:
    """Sorted dicts in memory: the same contract as LMDB, for tests.

    Readers see committed and in-flight writes alike (no snapshot isolation);
    tests drive it from one thread.
    """

    def __init__(self) -> None:
        self.data: dict[str, dict[bytes, bytes]] = {n: {} for n in DBS}
        self.keys: dict[str, list[bytes]] = {n: [] for n in DBS}
        self.write_guard: WriteGuard | None = None
        self._lock = threading.RLock()
        self._group: _MemTxn | None = None  # the shared transaction of `group()`
        self._group_thread = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[Txn]:
        yield _MemTxn(self, write=False)

    @contextlib.contextmanager
    def write(self) -> Iterator[Txn]:
        if self.write_guard is not None:
            self.write_guard()
        with self._lock:
            txn = _MemTxn(self, write=True)
            try:
                yield txn
                for fn in txn.hooks:
                    fn()
            except BaseException:
                txn.rollback()
                raise
            if self._group is not None and self.grouped():
                self._group.undo += txn.undo  # undone with the group if it is

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        if self.write_guard is not None:
            self.write_guard()
        with self._lock:
            self._group, self._group_thread = _MemTxn(self, write=True), threading.get_ident()
            try:
                yield
            except BaseException:
                self._group.rollback()
                raise
            finally:
                self._group = None

    def grouped(self) -> bool:
        return self._group is not None and self._group_thread == threading.get_ident()

    def grow(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass

    def disk_bytes(self) -> int:
        return sum(len(k) + len(v) for d in self.data.values() for k, v in d.items())

"""The mount's one writer: the thread on which every write transaction runs.

docs/concurrency.md has the rules this module enforces. In short: the trio
thread never opens a write transaction (it would wait for the store's writer
lock behind a sweep batch, and for the commit's fdatasync), and the nice-19
threads never do (a foreground write would wait behind a starved thread). They
hand store calls to this thread, at normal priority, and await the result:
`await writer.run(store.create, parent, name, ...)`.

`watch(store)` makes the store's backend check, at the start of every write
transaction, that it runs here (or on a thread `permit`ted for it); a write
from anywhere else is logged once per thread and counted in `strays`, which
tests assert is empty. Offline tools (migrate, fsck) install no check.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar, TypeVarTuple

import outcome
import trio
from ferryfs.store.store import Store

log = logging.getLogger("ferryfs.writer")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_Job = Callable[[], None]


class Writer:
    """One normal-priority thread, fed from trio. Jobs run one at a time, in the
    order they were handed over."""

    def __init__(self, name: str = "ferryfs-writer") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self._closed = False
        self._permitted: set[int] = set()  # thread idents allowed beside the writer
        self.strays: Counter[str] = Counter()  # write transactions opened elsewhere, by thread

    # -- handing work over ----------------------------------------------------------

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """`fn(*args)` on the writer thread; its result or its exception. Not
        cancellable (as `trio.to_thread.run_sync`): a transaction is not abandoned
        half done, and its caller learns how it ended."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[T]] = []

        def job() -> None:
            box.append(outcome.capture(fn, *args))
            token.run_sync_soon(done.set)

        self._submit(job)
        with trio.CancelScope(shield=True):
            await done.wait()
        return box[0].unwrap()

    def call(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """`fn(*args)` on the writer, from a thread that is not trio's: a nice-19
        thread hands a big migration's chunk records over this way as they are made
        (their spill), and waits, so its memory stays bounded. On the writer itself
        it runs inline (a job must not wait for the queue it is in)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        done = threading.Event()
        box: list[outcome.Outcome[T]] = []

        def job() -> None:
            box.append(outcome.capture(fn, *args))
            done.set()

        self._submit(job)
        done.wait()
        return box[0].unwrap()

    def _submit(self, job: _Job) -> None:
        with self._start:
            if self._closed:
                raise RuntimeError("the writer is closed")
            if self._thread is None:
                # A daemon thread: an Operations built by a test and never closed
                # must not keep the interpreter from exiting.
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()  # outcome.capture keeps the call's exceptions in the box
            except Exception:  # the hand-back failed (trio gone): keep serving the others
                log.exception("writer: could not hand a result back")

    def close(self) -> None:
        """Finish the jobs handed over, then end the thread."""
        with self._start:
            t = self._thread
            self._closed = True  # the thread stays ours while it drains (see check)
        if t is not None:
            self._jobs.put(None)
            t.join()

    # -- the rule, checked ------------------------------------------------------------

    def watch(self, store: Store) -> None:
        """From now on, every write transaction of `store` checks its thread."""
        store.backend.write_guard = self.check

    def check(self) -> None:
        """Called by the store's backend as a write transaction begins."""
        me = threading.current_thread()
        if me is self._thread or me.ident in self._permitted:
            return
        if not self.strays[me.name]:
            log.error(
                "write transaction on thread %s, not on the writer (docs/concurrency.md)",
                me.name,
            )
        self.strays[me.name] += 1

    @contextlib.contextmanager
    def permit(self) -> Iterator[None]:
        """Let the calling thread open write transactions for the block's duration
        (the first rollback point's walk: see docs/concurrency.md)."""
        ident = threading.get_ident()
        self._permitted.add(ident)
        try:
            yield
        finally:
            self._permitted.discard(ident)

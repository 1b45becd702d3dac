"""The mount's one writer: the thread on which every write transaction runs.

docs/concurrency.md has the rules this module enforces. In short: the trio
thread never opens a write transaction (it would wait for the store's writer
lock behind a sweep batch, and for the commit's fdatasync), and the nice-19
threads never do (a foreground write would wait behind a starved thread). They
hand store calls to this thread, at normal priority, and await the result:
`await writer.run(store.create, parent, name, ...)`.

Group commit (`share(store)`): the jobs waiting when the thread wakes run
together in one shared write transaction, each in a transaction nested in it, and
commit with one sync; their callers hear back once it is committed. A job that
fails has its nested transaction undone and its own error; the others are not
touched. If the shared transaction cannot commit (a full map, a full disk), none
of it is applied and every job of the group runs again alone, so that one job's
trouble is never another's outcome.

`watch(store)` makes the store's backend check, at the start of every write
transaction, that it runs here (or on a thread `permit`ted for it); a write
from anywhere else is logged once per thread and counted in `strays`, which
tests assert is empty. Offline tools (migrate, fsck) install no check.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, TypeVarTuple

import outcome
import trio
from ferryfs.store.store import Store

log = logging.getLogger("ferryfs.writer")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# Jobs run together at most: the group's callers wait for all of them.
GROUP_MAX = 64


@dataclass(slots=True)
class _Job:
    """A store call handed over, and how its outcome goes back to its caller."""

    call: Callable[[], Any]
    deliver: Callable[[outcome.Outcome[Any]], None]


class Writer:
    """One normal-priority thread, fed from trio. Jobs run one at a time, in the
    order they were handed over."""

    def __init__(self, name: str = "ferryfs-writer") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._share: Callable[[], contextlib.AbstractContextManager[None]] | None = None
        self.groups = 0  # shared transactions committed (figures for tests)
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

        def deliver(o: outcome.Outcome[T]) -> None:
            box.append(o)
            token.run_sync_soon(done.set)

        self._submit(_Job(functools.partial(fn, *args), deliver))
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

        def deliver(o: outcome.Outcome[T]) -> None:
            box.append(o)
            done.set()

        self._submit(_Job(functools.partial(fn, *args), deliver))
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

    def share(self, store: Store) -> None:
        """Run the jobs that wait together in one of `store`'s shared transactions."""
        self._share = store.group

    def _loop(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            # Everything already waiting joins: what arrived during the last commit.
            while jobs[-1] is not None and len(jobs) < GROUP_MAX:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            last = jobs[-1] is None
            todo = [j for j in jobs if j is not None]
            if todo:
                self._run(todo)
            if last:
                return

    def _run(self, jobs: list[_Job]) -> None:
        """Run `jobs` (in one shared transaction when there are several), then hand
        each its outcome: only once what it wrote is committed."""
        if self._share is None or len(jobs) == 1:
            for j in jobs:
                self._deliver(j, outcome.capture(j.call))
            return
        try:
            with self._share():
                outs = [outcome.capture(j.call) for j in jobs]
        except Exception as e:
            # Nothing of the group was applied: each job again, in its own transaction.
            log.info(
                "writer: a group of %d jobs did not commit (%s); running each alone", len(jobs), e
            )
            for j in jobs:
                self._deliver(j, outcome.capture(j.call))
            return
        self.groups += 1
        for j, o in zip(jobs, outs, strict=True):
            self._deliver(j, o)

    @staticmethod
    def _deliver(job: _Job, out: outcome.Outcome[Any]) -> None:
        try:
            job.deliver(out)
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

"""Crash: the daemon killed with SIGKILL at random moments while apps write and the
sweep runs. After each kill the store, as the crash left it, must pass its
invariants and `fsck --deep` (exit 0), mount again, and show every file at a
version some writer really wrote.

What a file may hold after a crash, precisely. Every writer works on its own file
and numbers the versions it produces: v0 is what the file held when the round
began (checked at the end of the previous round), v1, v2, ... the versions it
writes. `started` is the last version whose first system call was issued (its
commit may have landed even if that call got ENOTCONN back); `durable` the last
one whose commit point returned success: an fsync, the close() that flushed it,
or the rename() that published it. After the crash the file must equal v_j for
some durable <= j <= started, never anything else: no mix of two versions, no
garbage. One exception, the kernel's and not ours: an append that was not yet
durable may be found cut at a 4 KiB page boundary (v_{j-1} plus the first bytes
of record j, up to a page end). The kernel sends one buffered write(2) to a FUSE
filesystem as a request for its first partial page and one for the rest; the
daemon cannot tell them from two write(2) calls, and a commit of the file (a
close of another fd, a read) may land between them, as a local filesystem may
keep a torn write that nobody synced. The writers:

- append+fsync: records appended to an open fd, fsync after each (v_j = v0 + the
  first j records);
- append+close: open(O_APPEND), write one record, close; no fsync;
- append, never synced: records appended to an fd that stays open (nothing is
  promised: v0 up to every record);
- replace: write a temporary file, fsync every other time, close, rename over the
  target (the app's index.json pattern); a temporary file left by the crash must
  be empty or whole;
- overwrite: pwrite a same-size new content at offset 0 in 32 KiB pieces, fsync
  every other time, close;
- truncate+rewrite: open(O_TRUNC), write, close: the file may also be empty (the
  truncation is its own commit), as on any filesystem.

Files nobody writes must equal their Phase 3 content, whether the sweep migrated
them or not, and the Phase 3 tree must be byte-for-byte unchanged.

The seed is printed; rerun one with FERRYFS_CRASH_SEED=N.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import NOW_NS
from ferryfs.store import content
from ferryfs.store.store import Store
from ferryfs.tools.sampletree import generate
from helpers.mount import (
    BAD_LOG_LINE,
    Mount,
    ferry,
    mounted,
    pid_alive,
    snapshot,
    snapshot_diff,
    wait_for,
)
from helpers.store import check_invariants, store_entries
from helpers.trees import files_of

CRASHES = int(os.environ.get("FERRYFS_CRASHES", "20"))
SEED = int(os.environ.get("FERRYFS_CRASH_SEED", str(int(time.time()) % 100_000)))
# A sweep that keeps working for many rounds on a small tree.
SWEEP = ("--idle-ms", "20", "--max-load", "64", "--batch", "1", "--batch-delay-ms", "100")
KILL_DELAY = (0.0, 0.9)  # seconds after the writers start
# Errors a writer gets from a mount whose daemon died.
GONE = {errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV, errno.EIO}
PAGE = 4096  # where the kernel splits a buffered write(2) into FUSE requests


def record(rng: random.Random, who: str, n: int) -> bytes:
    """One JSONL line of 60 B to 40 KiB, unique to (writer, number)."""
    pad = rng.randbytes(rng.choice((30, 300, 3000, 20000))).hex()
    return f'{{"writer":"{who}","n":{n},"pad":"{pad}"}}\n'.encode()


@dataclass
class Writer:
    """One app thread working on one file; see the module docstring."""

    kind: str
    path: Path  # relative to the mount
    rng: random.Random
    base: bytes = b""
    versions: list[bytes] = field(default_factory=list)
    started: int = 0
    durable: int = 0
    fsynced: int = 0  # the last version made durable by an fsync (its bytes are promised)
    leftovers: dict[Path, bytes] = field(default_factory=dict)  # temp files of `replace`
    error: BaseException | None = None
    n: int = 0  # versions written over the whole test

    def begin_round(self, base: bytes) -> None:
        self.base = base
        self.versions = [base]
        self.started = self.durable = self.fsynced = 0

    def next_version(self) -> bytes:
        self.n += 1
        prev = self.versions[-1]
        if self.kind.startswith("append"):
            v = prev + record(self.rng, self.path.name, self.n)
        elif self.kind == "overwrite":
            v = self.rng.randbytes(len(self.base))
        else:
            v = b"".join(record(self.rng, self.path.name, self.n) for _ in range(3))
        self.versions.append(v)
        return v

    def run(self, mnt: Path, stop: threading.Event) -> None:
        try:
            getattr(self, "_" + self.kind.replace("+", "_").replace(" ", "_"))(mnt, stop)
        except OSError as e:
            if e.errno not in GONE:
                self.error = e
        except BaseException as e:
            self.error = e

    def _pause(self) -> None:
        # Sometimes long enough for the sweep (idle 20 ms) to get a batch in.
        time.sleep(self.rng.choice((0, 0.001, 0.005, 0.03)))

    def _append_fsync(self, mnt: Path, stop: threading.Event) -> None:
        fd = os.open(mnt / self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while not stop.is_set():
                v = self.next_version()
                self.started = len(self.versions) - 1
                os.write(fd, v[len(self.versions[-2]) :])
                os.fsync(fd)
                self.durable = self.fsynced = self.started
                self._pause()
        finally:
            os.close(fd)

    def _append_close(self, mnt: Path, stop: threading.Event) -> None:
        while not stop.is_set():
            v = self.next_version()
            fd = os.open(mnt / self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self.started = len(self.versions) - 1
            try:
                os.write(fd, v[len(self.versions[-2]) :])
            finally:
                os.close(fd)
            self.durable = self.started
            self._pause()

    def _append_never_synced(self, mnt: Path, stop: threading.Event) -> None:
        fd = os.open(mnt / self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # Never closed while the daemon lives: no flush, so nothing is promised.
        self._fd = fd
        while not stop.is_set():
            v = self.next_version()
            self.started = len(self.versions) - 1
            os.write(fd, v[len(self.versions[-2]) :])
            self._pause()

    def _replace(self, mnt: Path, stop: threading.Event) -> None:
        while not stop.is_set():
            v = self.next_version()
            j = len(self.versions) - 1
            tmp = self.path.with_name(f".{self.path.name}.tmp{self.n}")
            self.leftovers[tmp] = v
            self.started = j
            fd = os.open(mnt / tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, v)
                if j % 2:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(mnt / tmp, mnt / self.path)
            del self.leftovers[tmp]
            self.durable = j
            if j % 2:
                self.fsynced = j
            self._pause()

    def _overwrite(self, mnt: Path, stop: threading.Event) -> None:
        while not stop.is_set():
            v = self.next_version()
            j = len(self.versions) - 1
            fd = os.open(mnt / self.path, os.O_WRONLY)
            self.started = j
            try:
                for off in range(0, len(v), 32768):
                    os.pwrite(fd, v[off : off + 32768], off)
                if j % 2:
                    os.fsync(fd)
                    self.durable = self.fsynced = j
            finally:
                os.close(fd)
            self.durable = j
            self._pause()

    def _truncate_rewrite(self, mnt: Path, stop: threading.Event) -> None:
        while not stop.is_set():
            v = self.next_version()
            j = len(self.versions) - 1
            self.started = j
            fd = os.open(mnt / self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, v)
            finally:
                os.close(fd)
            self.durable = j
            self._pause()

    def close_leftover_fd(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError as e:
                assert e.errno in GONE, e
            self._fd = None

    def accepted(self) -> list[bytes]:
        """The contents this file may have after the crash."""
        ok = self.versions[self.durable : self.started + 1]
        if self.kind == "truncate+rewrite" and self.started > self.durable:
            ok = [*ok, b""]
        if self.kind.startswith("append"):
            # An append not yet durable may have been committed cut at a page
            # boundary: the kernel hands one write(2) to a FUSE filesystem as one
            # request per partial page and one for the rest, and a commit of the
            # file (another fd's close, a read) can land between them.
            for j in range(self.durable + 1, self.started + 1):
                prev, full = self.versions[j - 1], self.versions[j]
                first = (len(prev) // PAGE + 1) * PAGE
                ok += [full[:cut] for cut in range(first, len(full), PAGE)]
        return ok


@dataclass
class Reader:
    """Reads whole files through the mount in a loop, as the app's readers do."""

    paths: list[Path]
    error: BaseException | None = None

    def run(self, mnt: Path, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                for p in self.paths:
                    with contextlib.suppress(FileNotFoundError):  # not created yet this round
                        (mnt / p).read_bytes()
                time.sleep(0.002)
        except OSError as e:
            if e.errno not in GONE:
                self.error = e
        except BaseException as e:
            self.error = e


def files_by_path(root: Path) -> dict[Path, bytes]:
    return {Path(p): body for p, body in files_of(root).items()}


def migrated_contents(store_dir: Path) -> dict[Path, bytes]:
    """Path -> content of every MIGRATED file of a store, read offline (read-only):
    reading through the mount would migrate every file and leave the sweep idle."""
    out: dict[Path, bytes] = {}
    with Store.open(str(store_dir), readonly=True) as st, st.backend.read() as txn:
        for p, node in store_entries(txn):  # an UNLISTED directory lists nothing
            if node.is_reg and node.stored:
                out[Path(p)] = content.read(txn, node.ino, node.size, 0, node.size, None)
    return out


def kill_and_lazy_unmount(
    m: Mount, writers: list[Writer], threads: list[threading.Thread], stop: threading.Event
) -> None:
    pid = m.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 30, f"daemon {pid} to die")
    # The dead mount answers ENOTCONN: every writer stops before the unmount, so none
    # can reach the Phase 3 tree underneath (it is mounted in place).
    stop.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a writer hung on the dead mount"
    for w in writers:
        w.close_leftover_fd()
    r = subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if m._watchdog is not None:
        m._watchdog.cancel()
        m._watchdog = None
    m.pid = None


def test_kill_9_at_random_moments_loses_no_fsynced_byte(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"\ncrash seed: {SEED} (rerun with FERRYFS_CRASH_SEED={SEED})")
    src = tmp_path / "phase3"
    generate(src, 40, seed=SEED % 1000, attachment_mb=3, now_ns=NOW_NS)
    store = tmp_path / "store"
    pristine = snapshot(src)
    phase3 = files_by_path(src)
    jsonl = sorted(p for p in phase3 if p.suffix == ".jsonl" and len(phase3[p]) > 1000)
    json_ = sorted(p for p in phase3 if p.suffix == ".json")
    big = sorted(
        (p for p in phase3 if p.suffix not in (".json", ".jsonl")), key=lambda p: -len(phase3[p])
    )
    assert len(jsonl) >= 2 and json_ and big, "the sample tree lacks the files the writers need"
    sessions = jsonl[0].parent
    writers = [
        Writer("append+fsync", jsonl[0], random.Random(rng.random())),
        Writer("append+close", jsonl[1], random.Random(rng.random())),
        Writer("append never synced", sessions / "new-session.jsonl", random.Random(rng.random())),
        Writer("replace", json_[0], random.Random(rng.random())),
        Writer("overwrite", big[0], random.Random(rng.random())),
        Writer("truncate+rewrite", sessions / "scratch.json", random.Random(rng.random())),
    ]
    written = {w.path for w in writers}
    for w in writers:
        w.begin_round(phase3.get(w.path, b""))
    checked = fsynced_bytes = 0
    migrated_counts: list[int] = []
    mid_sweep = 0  # crashes that found LEGACY files left for the sweep
    in_flight = 0  # writes cut by a crash between their first call and their commit
    fsck_runs = 0
    cut_appends = 0  # appends found cut at a page boundary (see the module docstring)
    t0 = time.monotonic()
    with mounted(src, src, store, args=SWEEP) as m:
        for crash in range(1, CRASHES + 1):
            stop = threading.Event()
            threads = [threading.Thread(target=w.run, args=(src, stop)) for w in writers]
            # A reader of the appended files: its reads make the daemon commit what is
            # buffered, at any point of a write(2) in flight.
            reader = Reader([w.path for w in writers if w.kind.startswith("append")])
            threads.append(threading.Thread(target=reader.run, args=(src, stop)))
            for t in threads:
                t.start()
            delay = rng.uniform(*KILL_DELAY)
            time.sleep(delay)  # a random crash point, not a wait for a condition
            kill_and_lazy_unmount(m, writers, threads, stop)
            # Each mount's own log (the context manager checks only the last one).
            bad = [x for x in m.new_log().splitlines() if BAD_LOG_LINE.search(x)]
            assert not bad, f"crash {crash}: daemon.log before the kill: {bad}"
            assert reader.error is None, f"the reader failed: {reader.error!r}"
            for w in writers:
                assert w.error is None, f"{w.kind} writer failed: {w.error!r}"
                in_flight += w.started > w.durable

            # The store, unmounted: it opens and keeps its invariants.
            with Store.open(str(store), readonly=True) as st:
                check_invariants(st)
                stats = st.stats()
                migrated_counts.append(stats.files_migrated)
                mid_sweep += stats.files_legacy > 0
            diff = snapshot_diff(pristine, snapshot(src))
            assert not diff, f"crash {crash}: Phase 3 changed: {diff}"
            # fsck on the store exactly as the crash left it (before a mount tidies it).
            r = ferry("fsck", store, "--deep")
            assert r.returncode == 0, (
                f"crash {crash}: fsck --deep exit {r.returncode}:\n{r.stdout}{r.stderr}"
            )
            fsck_runs += 1

            # Files nobody writes: whatever the sweep did, Phase 3's bytes.
            for p, body in migrated_contents(store).items():
                if p in written or p.name.startswith("."):
                    continue
                assert body == phase3[p], f"crash {crash}: {p} differs from Phase 3"
                checked += 1

            m.start()
            for w in writers:
                got = (src / w.path).read_bytes() if (src / w.path).exists() else b""
                ok = w.accepted()
                assert got in ok, (
                    f"crash {crash} (after {delay:.3f} s): {w.kind} {w.path} holds "
                    f"{len(got)} bytes, none of the {len(ok)} versions it may hold "
                    f"(v{w.durable}..v{w.started}, sizes {[len(x) for x in ok]})"
                )
                cut_appends += got not in w.versions
                j = w.versions.index(got) if got in w.versions else -1
                if w.fsynced:
                    assert j >= w.fsynced
                    fsynced_bytes += len(w.versions[w.fsynced])
                checked += 1
                for tmp, whole in w.leftovers.items():
                    if (src / tmp).exists():
                        left = (src / tmp).read_bytes()
                        assert left in (b"", whole), f"crash {crash}: {tmp} is torn"
                        os.unlink(src / tmp)
                w.leftovers.clear()
                w.begin_round(got)
            print(f"crash {crash:2d} after {delay:.3f} s: {migrated_counts[-1]} files migrated")

        # The last word: the whole tree through the mount, then Phase 3 untouched.
        final = files_by_path(src)
        for p, body in phase3.items():
            if p not in written:
                assert final[p] == body, f"{p} differs from Phase 3 at the end"
                checked += 1
    diff = snapshot_diff(pristine, snapshot(src))
    assert not diff, f"Phase 3 changed: {diff}"
    assert mid_sweep >= CRASHES // 4, f"only {mid_sweep} crashes hit a sweep with work left"
    print(
        f"crash points: {CRASHES}, files checked: {checked}, "
        f"fsynced bytes verified: {fsynced_bytes}, versions written: {sum(w.n for w in writers)} "
        f"({in_flight} cut by a crash, {cut_appends} appends kept to a page boundary), "
        f"crashes mid-sweep: {mid_sweep} (migrated {migrated_counts[0]} -> {migrated_counts[-1]}, "
        f"{len(phase3)} Phase 3 files), fsck runs: {fsck_runs}, {time.monotonic() - t0:.1f} s"
    )

"""First-open migration of many small files (fs/lazy.py): files queued together
are prepared in one call and committed in one transaction, byte for byte, and
a file written meanwhile is left to its writer."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from ferryfs.fs import lazy as lazy_module
from ferryfs.fs.handles import OpenFiles
from ferryfs.fs.lazy import LazyMigrator
from ferryfs.store.store import Store
from helpers.store import check_invariants


class Counters:
    last_request = -float("inf")
    migrated_on_open = 0


async def until(cond: Callable[[], object], seconds: float) -> None:
    with trio.fail_after(seconds):
        while not cond():
            await trio.sleep(0.01)


def tree(root: Path, files: int) -> dict[bytes, bytes]:
    out = {}
    (root / "d").mkdir(parents=True)
    for i in range(files):
        data = os.urandom(64) * (1 + i % 50)
        (root / "d" / f"f{i:03}.json").write_bytes(data)
        out[f"f{i:03}.json".encode()] = data
    (root / "d" / "big.bin").write_bytes(os.urandom(3 << 20))
    return out


async def test_small_files_opened_together_migrate_as_one_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = tree(tmp_path / "src", 60)
    st = Store.open(str(tmp_path / "store"), source=str(tmp_path / "src"), create=True)
    counters = Counters()
    lazy = LazyMigrator(st, OpenFiles(), counters, jobs=1)  # type: ignore[arg-type]
    hops: list[int] = []
    real_run = lazy.background.run

    async def counting(fn, *args):  # type: ignore[no-untyped-def]
        hops.append(len(args[1]) if fn is lazy_module.migration.prepare_batch else 1)
        return await real_run(fn, *args)

    monkeypatch.setattr(lazy.background, "run", counting)
    commits: list[int] = []
    real_commit = st.commit_migrations

    def commit(ms):  # type: ignore[no-untyped-def]
        commits.append(len(ms))
        return real_commit(ms)

    monkeypatch.setattr(st, "commit_migrations", commit)
    try:
        d = st.lookup(1, b"d").ino
        inos = {name: st.lookup(d, name).ino for name in [*files, b"big.bin"]}
        for name in sorted(inos):  # the app reads the directory through
            lazy.request(inos[name])
        async with trio.open_nursery() as n:
            await n.start(lazy.run)
            await until(lambda: not lazy._queued, 60)
            n.cancel_scope.cancel()
        assert sum(hops) == 61 and len(hops) <= 61 // 8, hops
        assert 1 in hops  # the big file went alone
        assert len(commits) == len(hops), commits
        assert counters.migrated_on_open == 61
        for name, data in files.items():
            assert st.getattr(inos[name]).state == "migrated"
            assert st.read(inos[name], 0, 10**6) == data
        check_invariants(st, deep=True)
    finally:
        lazy.stop()
        st.close()


async def test_a_group_drops_a_file_written_meanwhile_and_commits_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = tree(tmp_path / "src", 10)
    st = Store.open(str(tmp_path / "store"), source=str(tmp_path / "src"), create=True)
    lazy = LazyMigrator(st, OpenFiles(), Counters(), jobs=1)  # type: ignore[arg-type]
    try:
        d = st.lookup(1, b"d").ino
        inos = [st.lookup(d, name).ino for name in sorted(files)]
        real = lazy_module.migration.prepare_batch

        def then_a_write(s, todo, spill, stop=None):  # type: ignore[no-untyped-def]
            out = real(s, todo, spill, stop)
            st.write(inos[3], 0, b"written")  # the app wrote it (it migrates first)
            return out

        monkeypatch.setattr(lazy_module.migration, "prepare_batch", then_a_write)
        await lazy.migrate_many(inos)
        for i, ino in enumerate(inos):
            want = files[sorted(files)[i]]
            if i == 3:
                want = b"written" + want[7:]
            assert st.read(ino, 0, 10**6) == want
            assert st.getattr(ino).state != "legacy"
        check_invariants(st, deep=True)
    finally:
        lazy.stop()
        st.close()


async def test_beside_an_app_that_never_pauses_migration_takes_a_quarter_of_the_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past PATIENCE, first-open migrations run beside a busy app, but each
    group's work is followed by BESIDE times as long without one; every file
    still migrates."""
    import time

    files = tree(tmp_path / "src", 40)
    st = Store.open(str(tmp_path / "store"), source=str(tmp_path / "src"), create=True)

    class Busy:
        migrated_on_open = 0

        @property
        def last_request(self) -> float:
            return time.monotonic()  # a request this very moment, always

    monkeypatch.setattr(lazy_module, "PATIENCE", 0.0)
    monkeypatch.setattr(lazy_module, "GROUP_FILES", 5)
    lazy = LazyMigrator(st, OpenFiles(), Busy(), jobs=1)  # type: ignore[arg-type]
    spans: list[tuple[float, float]] = []
    real_run = lazy.background.run

    async def timed(fn, *args):  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        try:
            return await real_run(fn, *args)
        finally:
            spans.append((t0, time.monotonic()))

    monkeypatch.setattr(lazy.background, "run", timed)
    try:
        d = st.lookup(1, b"d").ino
        for name in sorted(files):
            lazy.request(st.lookup(d, name).ino)
        async with trio.open_nursery() as n:
            await n.start(lazy.run)
            await until(lambda: not lazy._queued, 60)
            n.cancel_scope.cancel()
        assert len(spans) == 8
        for (a0, a1), (b0, _) in itertools.pairwise(spans):
            # (the commit after each prepare counts in its work, so the gap is longer)
            assert b0 - a1 >= lazy_module.BESIDE * (a1 - a0), spans
        for name, data in files.items():
            assert st.read(st.lookup(d, name).ino, 0, 10**6) == data
    finally:
        lazy.stop()
        st.close()

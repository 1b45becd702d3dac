"""Reading the Phase 3 tree (store/phase3.py) from several threads at once."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ferryfs.store.errors import NotFound
from ferryfs.store.phase3 import Phase3Tree
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store
from helpers.mount import mounted
from helpers.store import make_chain


def test_threads_listing_the_root_at_once_each_see_every_entry(tmp_path: Path) -> None:
    # The mount's sweep and its rollback-point walk list the root together. A dup
    # of the root fd shares the directory's read position: each saw part of it.
    names = {f"f{i:03}".encode() for i in range(300)}
    for n in names:
        (tmp_path / n.decode()).write_bytes(b"x")
    tree = Phase3Tree.open(str(tmp_path))
    seen: list[set[bytes]] = []
    start = threading.Barrier(4)

    def lister() -> None:
        start.wait()
        for _ in range(25):
            seen.append({e.name for e in tree.listdir(b"")})

    try:
        threads = [threading.Thread(target=lister) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        tree.close()
    assert len(seen) == 100
    assert all(s == names for s in seen), [len(s) for s in seen if s != names][:10]


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Path]:
    """SRC holding a chain of directories 1,500 deep; removed at the end, as
    pytest's own clean-up of old temporary directories recurses, and dies
    (RecursionError) on a tree this deep."""
    src = tmp_path / "src"
    src.mkdir()
    try:
        make_chain(src, 1500, file_every=100)
        yield src
    finally:
        subprocess.run(["rm", "-rf", str(src)], check=True)  # GNU rm walks it iteratively


def test_listing_a_deep_chain_opens_each_directory_once(
    chain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each directory was reached by opening every component from the root: listing a
    # chain 1,500 deep opened 1.1 million directories.
    src = chain
    opens = 0
    real_open = os.open

    def counting_open(*a, **kw):  # type: ignore[no-untyped-def]
        nonlocal opens
        opens += 1
        return real_open(*a, **kw)

    with Store.open(str(tmp_path / "store"), source=str(src), create=True) as st:
        monkeypatch.setattr(os, "open", counting_open)
        st.import_all()  # as the sweep lists: breadth first, 4,096 entries a transaction
        monkeypatch.undo()
        assert st.stats().dirs_listed == 1501
        assert opens < 4 * 1500, opens
        # Every level is still right.
        ino, level = ROOT_INO, 0
        while True:
            try:
                ino = st.lookup(ino, b"d").ino
            except NotFound:
                break
            level += 1
        assert level == 1500


def test_a_find_of_a_deep_tree_does_not_stall_other_requests(chain: Path, tmp_path: Path) -> None:
    # A first `find` of a tree 1,500 directories deep stalled every other request for
    # 4 to 8 s: the listing ahead ran on the thread that answers everyone.
    src, mnt = chain, tmp_path / "mnt"
    mnt.mkdir()
    (src / "top.txt").write_bytes(b"top\n")
    with mounted(src, mnt, tmp_path / "store") as m:
        stop = threading.Event()
        worst = [0.0]

        def reader() -> None:  # each stat of a new name is a request the mount answers
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                with contextlib.suppress(FileNotFoundError):
                    os.stat(m.mnt / f"missing-{i}")
                worst[0] = max(worst[0], time.monotonic() - t0)
                i += 1
                time.sleep(0.005)

        t = threading.Thread(target=reader)
        t.start()
        try:
            t0 = time.monotonic()
            r = subprocess.run(["find", str(m.mnt)], capture_output=True, text=True)
            took = time.monotonic() - t0
        finally:
            stop.set()
            t.join()
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("\n") == 1 + 1500 + 15 + 1  # root, dirs, files, top.txt
        print(f"find took {took:.2f} s; the slowest other request {worst[0] * 1000:.0f} ms")
        assert worst[0] < 1.0, f"a request waited {worst[0]:.2f} s behind the find"

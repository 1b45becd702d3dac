"""Reading the Phase 3 tree (store/phase3.py) from several threads at once."""

from __future__ import annotations

import threading
from pathlib import Path

from ferryfs.store.phase3 import Phase3Tree


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

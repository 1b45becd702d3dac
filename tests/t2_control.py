"""The control channel's status document (fs/control.py), without a mount."""

from __future__ import annotations

from pathlib import Path

from ferryfs.fs.control import Control
from ferryfs.fs.operations import Counters
from ferryfs.store.records import ROOT_INO
from ferryfs.store.store import Store


async def test_status_scans_the_store_again_only_after_a_commit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 1000)
    store = Store.open(str(tmp_path / "store"), source=str(src), create=True)
    try:
        scans = 0
        real = store.stats

        def counted() -> object:
            nonlocal scans
            scans += 1
            return real()

        store.stats = counted  # type: ignore[method-assign]
        control = Control(store, str(tmp_path / "store"), counters=Counters())
        first = await control.status()
        again = await control.status()
        assert scans == 1 and first == again
        store.lookup(ROOT_INO, b"a")  # lists the root: a commit
        after = await control.status()
        assert scans == 2
        assert after["files_total"] == first["files_total"] + 1
    finally:
        store.close()

"""Fixtures shared by every test tier."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
from ferryfs.tools import cli
from ferryfs.tools.sampletree import Summary, generate

# Pinned so that sample trees, mtimes included, are the same on every run.
NOW_NS = 1_750_000_000 * 10**9


class SampleTree(NamedTuple):
    root: Path
    summary: Summary
    now_ns: int  # the clock its mtimes were set against


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory: pytest.TempPathFactory) -> SampleTree:
    """A small sample Phase 3 tree (40 sessions, about 13 MB). Shared: do not modify it."""
    root = tmp_path_factory.mktemp("sample") / "phase3"
    return SampleTree(root, generate(root, 40, seed=7, attachment_mb=None, now_ns=NOW_NS), NOW_NS)


@pytest.fixture
def migrated(sample_tree: SampleTree, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the sample tree and a store `ferryfs migrate` made of it."""
    src = tmp_path / "phase3"
    shutil.copytree(sample_tree.root, src, symlinks=True)
    store = tmp_path / "store"
    assert cli.main(["migrate", str(src), "--store", str(store)]) == 0
    return src, store

"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
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


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random source whose seed is shown when the test fails; FERRYFS_TEST_SEED
    replays one."""
    seed = int(os.environ.get("FERRYFS_TEST_SEED") or int.from_bytes(os.urandom(4), "big"))
    request.node.user_properties.append(("seed", seed))
    return random.Random(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("random seed", f"FERRYFS_TEST_SEED={value} replays it"))

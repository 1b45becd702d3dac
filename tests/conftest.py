"""Fixtures shared by every test tier, and the `mount` marker.

The tiers, by file name prefix (as S3QL's t1_..t5_):
  t1_  the store and its key-value backends, called directly (no FUSE);
  t2_  the FUSE adapter (`fs.operations.Operations`) called directly, no kernel;
  t3_  real mounts: the kernel, a daemon, apps in the mount;
  t4_  the CLI, as an operator runs it;
  t5_  faults: corruption, crashes, a full disk, fsck on damaged stores.
Helpers more than one module needs live in tests/helpers/.
"""

from __future__ import annotations

import inspect
import os
import random
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from ferryfs.tools import cli
from ferryfs.tools.sampletree import Summary, generate

# Before the helpers are imported: pytest then rewrites their asserts too.
pytest.register_assert_rewrite("helpers")
from helpers import mount as mountutil  # noqa: E402

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


# -- the `mount` marker ------------------------------------------------------------------------
#
# A test that mounts carries the `mount` marker, so that `make test-fast`
# (`pytest -m "not mount"`) runs everything else. It is set here, not by hand: a
# test is marked when its code, or a fixture's, or a function or class of the
# tests it calls, names one of MOUNT_ENTRY_POINTS (every mount goes through one:
# `mounted` and the other mount helpers call `require_fuse`). What this cannot
# see (a mount reached through a method of an object) fails at run time:
# `require_fuse` fails a test that is not marked.

MOUNT_ENTRY_POINTS = frozenset({"require_fuse", "mounted", "Mount"})
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _names(code: types.CodeType) -> set[str]:
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _names(c)
    return out


def _ours(obj: object) -> bool:
    """Defined in a module of the tests (not in pytest or ferryfs)."""
    mod = sys.modules.get(getattr(obj, "__module__", "") or "")
    path = getattr(mod, "__file__", None)
    return path is not None and os.path.abspath(path).startswith(TESTS_DIR + os.sep)


def _reaches_mount(obj: object, seen: set[int]) -> bool:
    obj = inspect.unwrap(obj) if callable(obj) else obj  # type: ignore[arg-type]
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, type):
        return any(_reaches_mount(v, seen) for v in vars(obj).values() if callable(v))
    code = getattr(obj, "__code__", None)
    if code is None:
        return False
    names = _names(code)
    if names & MOUNT_ENTRY_POINTS:
        return True
    scope = getattr(obj, "__globals__", {})
    return any(_reaches_mount(scope[n], seen) for n in names if n in scope and _ours(scope[n]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("mount") is not None or not isinstance(item, pytest.Function):
            continue
        seen: set[int] = set()
        funcs = [item.function]
        for defs in item._fixtureinfo.name2fixturedefs.values():
            funcs += [d.func for d in defs if _ours(d.func)]
        if any(_reaches_mount(f, seen) for f in funcs):
            item.add_marker(pytest.mark.mount)


@pytest.fixture(autouse=True)
def _running(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tell mountutil.require_fuse which test runs (to check its marker)."""
    mountutil.RUNNING = request.node
    try:
        yield
    finally:
        mountutil.RUNNING = None


def pytest_sessionstart(session: pytest.Session) -> None:
    """pytest collects only tier-named modules (pyproject's python_files): a test
    module named otherwise would be skipped silently, so it stops the run."""
    loose = sorted(p.name for p in Path(TESTS_DIR).glob("test_*.py"))
    if loose:
        raise pytest.UsageError(
            f"tests/{', tests/'.join(loose)}: name test modules by tier, t1_ to t5_ "
            "(tests/conftest.py says which is which)"
        )

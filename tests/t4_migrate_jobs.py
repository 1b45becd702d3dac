"""`ferryfs migrate`'s reader threads: two per CPU by default (a cold read of a
small file is a wait on the disk), at most 16, and what --jobs says."""

from __future__ import annotations

import argparse
import os

import pytest
from ferryfs.tools import migrate_cmd


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    migrate_cmd.add_arguments(p)
    return p.parse_args(["SRC", *argv])


@pytest.mark.parametrize("cpus", [1, 2, 6, 64])
def test_two_reader_threads_per_cpu(monkeypatch: pytest.MonkeyPatch, cpus: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert _parse().jobs == min(16, 2 * cpus)
    assert _parse("--jobs", "3").jobs == 3

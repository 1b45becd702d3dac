"""fs/ stays a thin adapter: one error table, small modules."""

from __future__ import annotations

import re
from pathlib import Path

FS = Path(__file__).resolve().parent.parent / "fs"


def test_only_the_error_table_raises_fuse_errors() -> None:
    # A raw FUSEError in a handler bypasses errmap: no log, no failsafe hook, and
    # an errno chosen at each call site instead of once per exception class.
    raw = [
        f"{p.name}:{n}"
        for p in sorted(FS.glob("*.py"))
        if p.name != "errmap.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"raise\s+pyfuse3\.FUSEError", line)
    ]
    assert raw == []


def test_no_fs_module_is_over_600_lines() -> None:
    big = {p.name: n for p in FS.glob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert big == {}

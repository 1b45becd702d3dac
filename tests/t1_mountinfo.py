"""fs/mountinfo.py, the one parser of /proc/self/mountinfo that the daemon and the
CLI share: escaped paths, optional fields, options, and the live table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ferryfs.fs import mountinfo
from ferryfs.fs.daemon import raise_readahead
from ferryfs.tools import mounts

# Two optional fields (shared:, master:) before "-", a mount point with a space,
# a tab and a backslash in it, and superblock options after the source.
LINE = (
    rb"412 29 0:57 / /tmp/my\040mnt\011x\134y rw,nosuid,nodev,relatime shared:230 master:7"
    rb" - fuse.ferryfs ferryfs rw,user_id=1000,group_id=1000,allow_other"
)


def test_a_line_parses_with_escapes_optional_fields_and_both_option_sets() -> None:
    m = mountinfo.parse_line(LINE)
    assert m.mount_id == 412
    assert m.dev == (0, 57) and m.dev_name == "0:57"
    assert m.point == b"/tmp/my mnt\tx\\y"
    assert m.fstype == "fuse.ferryfs"
    assert {"nosuid", "nodev", "allow_other", "user_id=1000"} <= m.options


def test_a_table_keeps_its_order_and_skips_blank_lines() -> None:
    other = b"30 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw"
    entries = mountinfo.parse([other + b"\n", b"\n", LINE + b"\n"])
    assert [e.mount_id for e in entries] == [30, 412]
    assert entries[0].fstype == "ext4" and entries[0].point == b"/"


def test_the_live_table_agrees_with_the_kernel_and_the_cli_helpers() -> None:
    entries = mountinfo.mount_entries()
    root = [e for e in entries if e.point == b"/"]
    assert root, "no mount at / in /proc/self/mountinfo"
    assert mounts.fs_type("/") == root[-1].fstype
    assert mounts.mount_options("/") == set(root[-1].options)
    assert mounts.mount_options("/no/such/mount/point") == set()


def test_raise_readahead_finds_no_ferryfs_mount_where_there_is_none(tmp_path: Path) -> None:
    assert raise_readahead(str(tmp_path)) is False


def test_status_does_not_load_fuse_or_trio() -> None:
    """The parser is imported by `ferryfs status`, whose start-up time is measured."""
    code = (
        "import sys, ferryfs.tools.status_cmd, ferryfs.tools.stats_cmd\n"
        "print(sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"

"""The `ferryfs` command: one module per subcommand, errors as one line and an exit code.

Each subcommand lives in `ferryfs.tools.<name>_cmd` and provides
`add_arguments(parser)` and `run(args) -> int`; its module docstring is its
`--help` description. A `FerryError` prints as `ferryfs: <message>` and exits
with its `exit_code`; Ctrl-C exits 130; nothing else prints a traceback unless
FERRYFS_DEBUG is set.

Only the module of the command that runs is imported: `ferryfs --help` and
`ferryfs status MNT` are run from scripts and status loops, and importing every
command (the store, rich, the planner) tripled their start-up time.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from types import ModuleType

from ferryfs.store.errors import FerryError

# Name on the command line -> (module in ferryfs.tools, one line for `ferryfs --help`).
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("plan_cmd", "estimate a migration: files, bytes, savings, time, disk"),
    "migrate": ("migrate_cmd", "migrate a whole Phase 3 tree into a store, with no mount"),
    "stats": ("stats_cmd", "a store's logical and stored bytes, savings and counts"),
    "sample": ("sample_cmd", "write a realistic sample Phase 3 tree into an empty directory"),
    "mount": ("mount_cmd", "mount a Phase 3 tree (in place if MNT is SRC), migrate it"),
    "umount": ("umount_cmd", "flush, stop the sweep, unmount and wait for the daemon"),
    "status": ("status_cmd", "a live mount's progress: files, bytes, savings, sweep, ETA"),
    "pause": ("control_cmd", "pause the mount's idle sweep"),
    "resume": ("control_cmd", "resume the mount's idle sweep"),
    "cancel": ("control_cmd", "stop the mount's idle sweep until it is mounted again"),
    "fsck": ("fsck_cmd", "check a store against its invariants; --repair fixes it"),
    "points": ("points_cmd", "rollback points: create, list, verify, delete, expire"),
    "rollback": ("rollback_cmd", "back out: show the untouched Phase 3 tree read-only in place"),
    "search": ("search_cmd", "search the files' text"),
}


def _exists(module: str) -> bool:
    return importlib.util.find_spec(f"ferryfs.tools.{module}") is not None


def _load(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"ferryfs.tools.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"ferryfs.tools.{module}":
            return None  # not built yet
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser. Every command is listed, but only the module of `only` (the
    command being run) is imported and given its arguments."""
    parser = argparse.ArgumentParser(
        prog="ferryfs",
        description="Move a live application's files into chunked, deduplicated storage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        if name != only:
            if _exists(module):
                sub.add_parser(name, help=summary)
            continue
        mod = _load(module)
        if mod is None:
            continue
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=summary,
            description=doc or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(_module=mod)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] not in COMMANDS and not words[0].startswith("-"):
        from .mount_options import looks_like_mount_fuse, mount_command

        if looks_like_mount_fuse(words):  # fuse3's mount.fuse, for an fstab entry
            command = mount_command(words)
            return command if isinstance(command, int) else main(command)
    first = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        code: int = args._module.run(args)
        return code
    except FerryError as e:
        print(f"ferryfs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ferryfs: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if os.environ.get("FERRYFS_DEBUG"):
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"ferryfs: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

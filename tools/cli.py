"""The `ferryfs` command: one module per subcommand, errors as one line and an exit code.

Each subcommand lives in `ferryfs.tools.<name>_cmd` and provides
`add_arguments(parser)` and `run(args) -> int`; the first line of its module
docstring is its help. A `FerryError` prints as `ferryfs: <message>` and exits
with its `exit_code`; Ctrl-C exits 130; nothing else prints a traceback unless
FERRYFS_DEBUG is set.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType
from typing import NoReturn

from ferryfs.store.errors import FerryError

# Name on the command line -> module name in ferryfs.tools.
COMMANDS: dict[str, str] = {
    "plan": "plan_cmd",
    "migrate": "migrate_cmd",
    "stats": "stats_cmd",
    "sample": "sample_cmd",
    "mount": "mount_cmd",
    "umount": "umount_cmd",
    "status": "status_cmd",
    "pause": "control_cmd",
    "resume": "control_cmd",
    "cancel": "control_cmd",
    "fsck": "fsck_cmd",
    "points": "points_cmd",
    "rollback": "rollback_cmd",
    "search": "search_cmd",
}


def _load(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"ferryfs.tools.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"ferryfs.tools.{module}":
            return None  # not built yet
        raise


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line and exit 2, as every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand's module is imported (start-up
    time matters for a command run from scripts and status loops)."""
    parser = _Parser(
        prog="ferryfs",
        description="Move a live application's files into chunked, deduplicated storage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        mod = _load(module)
        if mod is None:
            continue
        doc = (mod.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else None, description=doc[0] if doc else None)
        p.set_defaults(_module=mod)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
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

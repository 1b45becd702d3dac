"""The `ferryfs` subcommands: their names, the parser, and running one.

Each subcommand lives in `ferryfs.tools.<name>_cmd` and provides
`add_arguments(parser)` and `run(args) -> int`; its module docstring is its
`--help` description. A `FerryError` prints as `ferryfs: <message>` and exits
with its `exit_code`; Ctrl-C exits 130; nothing else prints a traceback unless
FERRYFS_DEBUG is set.

Only the module of the command that runs is imported: `ferryfs --help` and
`ferryfs status MNT` are run from scripts and status loops, and importing every
command (the store, rich, the planner) tripled their start-up time.

Apart from cli.py so that mount_helper.py, which turns mount(8)'s command line
into a `ferryfs mount` one, can run it without importing the module that
imports mount_helper.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType
from typing import NoReturn

from ferryfs.store.errors import FerryError

# Imported here, not where an error is printed: a command that has dropped its
# privileges (or whose checkout has become unreadable) must still say its one line.
from ._common import shown

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
    "recompress": ("recompress_cmd", "recompress cold files' chunks (Step 4), store not mounted"),
}


def _load(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"ferryfs.tools.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"ferryfs.tools.{module}":
            return None  # not built yet
        raise


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line and exit 2, as every other refusal (argparse's
    own error prints the whole usage first). Its subcommands' parsers are too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for every argument added, and its own asks
        # shutil for the terminal's width: importing shutil (and bz2, lzma) was
        # a tenth of a search's start. The same width, found without it.
        return self.formatter_class(prog=self.prog, width=_width())  # type: ignore[call-arg]


def _width() -> int:
    """What HelpFormatter uses: shutil.get_terminal_size()'s columns, less 2."""
    try:
        cols = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        cols = 0
    if cols <= 0:
        try:
            cols = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            cols = 0
    return (cols or 80) - 2


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser. Every command is listed, but only the module of `only` (the
    command being run) is imported and given its arguments."""
    parser = _Parser(
        prog="ferryfs",
        description="Move a live application's files into chunked, deduplicated storage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        if name != only:
            # Listed without looking for its module: every command in the table
            # has one, and looking (a stat per module, through the import system)
            # was a good part of a quick command's start.
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


def run(argv: list[str]) -> int:
    """Parse `argv` (the words after `ferryfs`) and run that command: its exit code."""
    first = next((w for w in argv if not w.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        code: int = args._module.run(args)
        sys.stdout.flush()  # here, where a reader gone away is caught below
        return code
    except BrokenPipeError:
        return reader_gone()
    except FerryError as e:
        print(f"ferryfs: {shown(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ferryfs: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if os.environ.get("FERRYFS_DEBUG"):
            raise
        name = e.filename
        where = f": {os.fsdecode(name) if isinstance(name, bytes) else name}" if name else ""
        print(f"ferryfs: {shown(str(e.strerror or e) + where)}", file=sys.stderr)
        return 1


# What a process killed by SIGPIPE returns to the shell: `ferryfs ... | head` ends
# as `grep ... | head` does. (The signal itself is left ignored, as Python sets it:
# a daemon started from this process must not die of a closed socket.)
SIGPIPE_EXIT = 141


def reader_gone() -> int:
    """The reader of our output went away (`| head`): stop quietly. stdout goes to
    /dev/null, so the interpreter's last flush does not fail and print again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SIGPIPE_EXIT

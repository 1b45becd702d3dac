"""The `ferryfs` command: one module per subcommand, errors as one line and an exit code.

The subcommands, their parser and how one runs are in commands.py. This entry
point adds one thing: `ferryfs SRC MNT -o OPTIONS`, the command line fuse3's
`mount.fuse` runs for an fstab entry of type fuse.ferryfs, goes to
mount_helper.py, which turns it into `ferryfs mount ...`.
"""

from __future__ import annotations

import os
import sys

from .commands import COMMANDS, build_parser, reader_gone, run

__all__ = ["COMMANDS", "build_parser", "main"]


# Commands that may leave the process without the interpreter's teardown once
# they have answered: they hold nothing that needs it (their store is closed,
# their output flushed), and for a search the teardown (modules, tantivy's
# threads) was a fifth of the whole command's time.
QUICK_EXIT = frozenset({"search"})


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] not in COMMANDS and not words[0].startswith("-"):
        from .mount_helper import looks_like_mount_fuse, mount_main

        if looks_like_mount_fuse(words):  # fuse3's mount.fuse, for an fstab entry
            return mount_main(words)
    code = run(words)
    if argv is None and words and words[0] in QUICK_EXIT:
        # Run as the `ferryfs` program (not called from Python): exit now.
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            code = reader_gone()
        except OSError:
            code = code or 1
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

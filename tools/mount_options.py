"""What an /etc/fstab entry's mount command means as a `ferryfs mount` command
line (mount_helper.py's docstring has the options); nothing here runs it."""

from __future__ import annotations

import os
import sys

from ferryfs.store.errors import FerryError, UsageError

# Options that are mount(8)'s, fuse's mount.fuse's or systemd's own business, or
# that a FUSE mount cannot change (ferryfs always mounts nodev).
IGNORED = frozenset(
    {
        "defaults", "rw", "auto", "noauto", "nofail", "_netdev", "user", "nouser",
        "users", "owner", "group", "dev", "nodev", "suid", "nosuid", "exec",
        "noexec", "async", "atime", "noatime", "relatime", "strictatime",
        "lazytime", "nolazytime", "diratime", "nodiratime", "loud", "silent",
    }
)  # fmt: skip
IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=")
# option=VALUE -> `ferryfs mount` flag
VALUED = {
    "idle_ms": "--idle-ms",
    "max_load": "--max-load",
    "batch": "--batch",
    "batch_delay_ms": "--batch-delay-ms",
    "order": "--order",
    "jobs": "--jobs",
}


def mount_argv(src: str, mnt: str, options: list[str], sloppy: bool = False) -> list[str]:
    """The `ferryfs mount` command line for `mount -t fuse.ferryfs SRC MNT -o OPTIONS`."""
    argv = ["mount", src, mnt]
    for opt in (o for group in options for o in group.split(",") if o):
        key, eq, value = opt.partition("=")
        if opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
            continue
        if key == "store" and eq and value:
            argv += ["--store", value]
        elif opt == "allow_other":
            argv += ["-o", "allow_other"]
        elif opt == "no_sweep":
            argv.append("--no-sweep")
        elif key in VALUED and eq and value:
            argv += [VALUED[key], value]
        elif opt == "ro":
            raise UsageError(
                "ferryfs mounts read-write; for the Phase 3 tree read-only use `ferryfs rollback`"
            )
        elif not sloppy:
            known = "store=DIR, allow_other, no_sweep, " + ", ".join(f"{k}=" for k in VALUED)
            raise UsageError(f"unknown mount option {opt} (known: {known})")
    return argv


def parse_mount(argv: list[str]) -> tuple[str, str, list[str], set[str]]:
    """`SRC MNT [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]` as mount(8) and mount.fuse pass
    them: (src, mnt, option groups, single-letter flags)."""
    positional: list[str] = []
    options: list[str] = []
    flags: set[str] = set()
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("-o", "-t", "-N"):
            if i + 1 == len(argv):
                raise UsageError(f"{word} needs a value")
            if word == "-o":
                options.append(argv[i + 1])
            i += 2
            continue
        if word.startswith("-o") and len(word) > 2:
            options.append(word[2:])
        elif word.startswith("-") and len(word) > 1:
            flags.update(word[1:])
        else:
            positional.append(word)
        i += 1
    if len(positional) != 2:
        raise UsageError("usage: mount.fuse.ferryfs SRC MNT [-o store=DIR,allow_other,...]")
    return positional[0], positional[1], options, flags


def looks_like_mount_fuse(words: list[str]) -> bool:
    """`ferryfs SRC MNT -o OPTIONS`, the command fuse3's mount.fuse runs for an entry
    of type fuse.ferryfs: two directories and `-o`, where a command name would be."""
    return (
        len(words) >= 4
        and "-o" in words
        and all(os.path.isdir(w) for w in words[:2])
        and not words[0].startswith("-")
    )


def mount_command(words: list[str]) -> list[str] | int:
    """The `ferryfs` command line for mount(8)'s `SRC MNT [-sfnv] [-o OPTIONS]`, or the
    exit code when there is nothing to run (a bad option, said on stderr; `-f`)."""
    try:
        src, mnt, options, flags = parse_mount(words)
        command = mount_argv(src, mnt, options, sloppy="s" in flags)
    except FerryError as e:
        print(f"ferryfs: {e}", file=sys.stderr)
        return e.exit_code
    if "f" in flags:  # mount -f: do everything but the mount
        return 0
    if "v" in flags:
        print("ferryfs " + " ".join(command), file=sys.stderr)
    return command

"""The helpers `mount(8)` and `umount(8)` run for a `fuse.ferryfs` filesystem, so an
/etc/fstab entry or a systemd .mount unit mounts ferryfs like any filesystem:

    /srv/app/sessions  /srv/app/sessions  fuse.ferryfs  store=/srv/app/s.ferry,allow_other  0 0

mount(8) runs `/sbin/mount.fuse.ferryfs SRC MNT [-sfnv] [-o OPTIONS]` when that
exists (the console script `mount.fuse.ferryfs`, linked there), and otherwise
fuse3's `mount.fuse`, which runs `ferryfs SRC MNT -o OPTIONS` from PATH: `ferryfs`
hands that shape of command line here. Both then do what `ferryfs mount` does and
return once the mount answers.

`umount(8)` runs `/sbin/umount.fuse.ferryfs MNT` when linked: `ferryfs umount`,
which returns once the daemon has flushed and exited (`umount -l`, for a mount
whose daemon died, detaches it lazily). Without the link, umount(8) unmounts
directly and the daemon flushes and exits on its own just after.

OPTIONS: `store=DIR`, `allow_other`, `no_sweep` and the sweep's knobs as
`idle_ms=`, `max_load=`, `batch=`, `batch_delay_ms=`, `order=`, `jobs=`. The
options mount(8) and systemd add for themselves are ignored (`defaults`, `rw`,
`auto`, `noauto`, `nofail`, `_netdev`, `user`, `dev`, `suid`, `x-*`, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys

from ferryfs.store.errors import FerryError, UsageError

from .commands import run

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


def mount_main(argv: list[str] | None = None) -> int:
    """Entry point of `mount.fuse.ferryfs` (and `ferryfs SRC MNT -o ...`)."""
    words = sys.argv[1:] if argv is None else argv
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
    return run(command)


def umount_main(argv: list[str] | None = None) -> int:
    """Entry point of `umount.fuse.ferryfs MNT [-flnrv] [-t TYPE]`: `ferryfs umount MNT`;
    with -l (`umount -l`, for a mount whose daemon died) a lazy `fusermount3 -u -z`."""
    words = sys.argv[1:] if argv is None else argv
    targets: list[str] = []
    flags: set[str] = set()
    i = 0
    while i < len(words):
        if words[i] in ("-t", "-N"):  # -t fuse.ferryfs, -N namespace: values, not targets
            i += 2
            continue
        if words[i].startswith("-"):
            flags.update(words[i][1:])
        else:
            targets.append(words[i])
        i += 1
    if len(targets) != 1:
        print("ferryfs: usage: umount.fuse.ferryfs MNT", file=sys.stderr)
        return 2
    if "l" in flags:
        r = subprocess.run(["fusermount3", "-u", "-z", targets[0]], check=False)
        return 0 if r.returncode == 0 else 1
    return run(["umount", targets[0]])

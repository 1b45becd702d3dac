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

import subprocess
import sys

from . import cli
from .mount_options import mount_command


def mount_main(argv: list[str] | None = None) -> int:
    """Entry point of `mount.fuse.ferryfs` (cli.main takes `ferryfs SRC MNT -o ...`)."""
    command = mount_command(sys.argv[1:] if argv is None else argv)
    return command if isinstance(command, int) else cli.main(command)


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
    return cli.main(["umount", targets[0]])

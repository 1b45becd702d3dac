"""Pause, resume or cancel a mount's idle sweep; returns once the daemon has acted.

`cancel` stops the sweep for the rest of this mount's life; files still
migrate when they are first opened. `resume` after `cancel` is refused (exit 1):
it cannot restart the sweep, and saying "sweep cancelled" with exit 0 read as if it had.
"""

from __future__ import annotations

import argparse
import errno

from ferryfs.store.errors import FerryError

from .mounts import control_set, status


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mnt", help="the mountpoint")


def run(args: argparse.Namespace) -> int:
    try:
        control_set(args.mnt, args.command)
    except OSError as e:
        if e.errno != errno.ECANCELED:
            raise
        raise FerryError(
            "the sweep was cancelled and stays off for the rest of this mount's life "
            "(files still migrate when first opened; remount to sweep again)"
        ) from None
    print(f"sweep {status(args.mnt)['sweep_state']}")
    return 0

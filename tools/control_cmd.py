"""Pause, resume or cancel a mount's idle sweep; returns once the daemon has acted.

`cancel` stops the sweep for the rest of this mount's life; files still
migrate when they are first opened.
"""

from __future__ import annotations

import argparse

from .mounts import control_set, status


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mnt", help="the mountpoint")


def run(args: argparse.Namespace) -> int:
    control_set(args.mnt, args.command)
    print(f"sweep {status(args.mnt)['sweep_state']}")
    return 0

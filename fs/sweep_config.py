"""The sweep's settings and the command-line arguments that carry them, shared
by `ferryfs mount` and the daemon. No trio or pyfuse3 here: the `mount` command
imports this, and importing those would add a tenth of a second to every mount.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

ORDERS = ("recent", "oldest", "inode", "largest", "smallest")


@dataclass
class SweepConfig:
    idle_ms: int = 500
    # CPUs kept busy by other processes above which the sweep waits: half the machine.
    max_load: float = field(default_factory=lambda: (os.cpu_count() or 2) / 2)
    batch: int = 64
    batch_delay_ms: int = 10
    order: str = "recent"
    jobs: int = 2


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's knobs, shared by `ferryfs mount` and the daemon."""
    d = SweepConfig()
    p.add_argument("--no-sweep", action="store_true", help="migrate only on first open")
    p.add_argument(
        "--idle-ms",
        type=int,
        default=d.idle_ms,
        help=f"quiet time before the sweep runs (default {d.idle_ms})",
    )
    p.add_argument(
        "--max-load",
        type=float,
        default=d.max_load,
        help=f"CPUs busy with other processes above which the sweep waits (default {d.max_load})",
    )
    p.add_argument(
        "--batch", type=int, default=d.batch, help=f"files per batch (default {d.batch})"
    )
    p.add_argument(
        "--batch-delay-ms",
        type=int,
        default=d.batch_delay_ms,
        help=f"pause between batches (default {d.batch_delay_ms})",
    )
    p.add_argument(
        "--order",
        choices=ORDERS,
        default=d.order,
        help=f"which files first (default {d.order}: most recently modified)",
    )
    p.add_argument("--jobs", type=int, default=d.jobs, help=f"worker threads (default {d.jobs})")


def sweep_config(a: argparse.Namespace) -> SweepConfig | None:
    if a.no_sweep:
        return None
    return SweepConfig(a.idle_ms, a.max_load, a.batch, a.batch_delay_ms, a.order, a.jobs)


def sweep_argv(a: argparse.Namespace) -> list[str]:
    """The sweep arguments of a parsed `ferryfs mount`, for the daemon's command line."""
    if a.no_sweep:
        return ["--no-sweep"]
    return [
        f"--idle-ms={a.idle_ms}",
        f"--max-load={a.max_load}",
        f"--batch={a.batch}",
        f"--batch-delay-ms={a.batch_delay_ms}",
        f"--order={a.order}",
        f"--jobs={a.jobs}",
    ]

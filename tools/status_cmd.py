"""Show a live mount's migration progress: files and bytes, savings, sweep state, rate,
ETA; and, once everything is migrated, the idle sweep's cold recompression (how far,
rate, ETA)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ._common import mb, on_disk_text, saved_text
from .mounts import status
from .progress import eta_text, recompress_text

JSON_KEYS = (
    "files_total",
    "files_migrated",
    "bytes_logical",
    "bytes_stored",
    "sweep_state",
    "errors",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mnt", help="the mountpoint")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--watch", action="store_true", help="live progress bars until done")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between --watch updates")


def run(args: argparse.Namespace) -> int:
    if args.watch and not args.json:
        return watch(args.mnt, args.interval)
    s = status(args.mnt)
    if args.json:
        print(json.dumps(s))
    else:
        print(render(s))
    return 0


def _eta(s: dict[str, Any]) -> str:
    return eta_text(s.get("sweep_eta_seconds"))


def _sweep(s: dict[str, Any], sep: str = ", ") -> str:
    """The sweep's state, and its rate and ETA while it can still finish (a
    cancelled or disabled sweep has neither)."""
    if s["sweep_state"] in ("cancelled", "off"):
        return str(s["sweep_state"])
    return f"{s['sweep_state']}{sep}{mb(s.get('sweep_rate', 0))}/s{sep}ETA {_eta(s)}"


def _cold(s: dict[str, Any], sep: str = ", ") -> str | None:
    """The idle sweep's cold recompression: None without a sweep (nothing to show)."""
    state = s.get("recompress_state")
    if state is None:
        return None
    if state == "not run":
        return "not run yet in this mount (the sweep does it once nothing is left to migrate)"
    text = recompress_text(
        s["recompress_bytes_done"],
        s["recompress_bytes_total"],
        s["recompress_chunks"],
        s["recompress_bytes_before"],
        s["recompress_bytes_after"],
    )
    if state == "running":
        rate = mb(s.get("recompress_rate", 0))
        return f"{state}{sep}{text}{sep}{rate}/s{sep}ETA {eta_text(s['recompress_eta_seconds'])}"
    return f"{state}{sep}{text}"


def _finished(s: dict[str, Any]) -> bool:
    """Nothing more for --watch to follow: migration over, recompression not running."""
    migrated = s["sweep_state"] in ("done", "cancelled", "off") or not s["files_legacy"]
    return migrated and s.get("recompress_state") != "running"


def render(s: dict[str, Any]) -> str:
    rows = [
        (
            "files",
            f"{s['files_migrated']} of {s['files_total']} migrated, {s['files_legacy']} pending",
        ),
        (
            "bytes",
            f"{mb(s['bytes_migrated'])} of {mb(s['bytes_logical'])} migrated, "
            f"{mb(s['bytes_legacy'])} pending",
        ),
        ("on disk", on_disk_text(s["bytes_stored"], s["bytes_compressed"])),
        ("saved", saved_text(s["bytes_stored"], s["bytes_compressed"], s["bytes_migrated"])),
        ("sweep", _sweep(s)),
        (
            "index",
            f"{s.get('files_indexed', 0)} files indexed, {s.get('index_pending', 0)} pending"
            f" ({mb(s.get('bytes_index', 0))}, {s.get('index_state', 'off')})",
        ),
        ("errors", f"{s['errors']} files, {s.get('corrupt_reads', 0)} corrupt reads"),
    ]
    cold = _cold(s)
    if cold is not None:
        rows.insert(5, ("cold", cold))
    if s.get("failsafe"):
        rows.append(("FAILSAFE", f"{s['failsafe']}: run ferryfs fsck"))
    return "\n".join(f"{k:>8}  {v}" for k, v in rows)


def watch(mnt: str, interval: float) -> int:
    if not sys.stdout.isatty():
        while True:
            s = status(mnt)
            print(render(s), flush=True)
            if _finished(s):
                return 0
            time.sleep(interval)
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn

    prog = Progress(
        TextColumn("{task.description:>6}"), BarColumn(), TextColumn("{task.fields[what]}")
    )
    files = prog.add_task("files", total=1, what="")
    data = prog.add_task("bytes", total=1, what="")
    cold = prog.add_task("cold", total=1, what="", visible=False)
    try:
        with Live(prog, refresh_per_second=4):
            while True:
                s = status(mnt)
                prog.update(
                    files,
                    total=max(1, s["files_total"]),
                    completed=s["files_migrated"],
                    what=f"{s['files_migrated']}/{s['files_total']}",
                )
                prog.update(
                    data,
                    total=max(1, s["bytes_logical"]),
                    completed=s["bytes_migrated"],
                    what=f"{mb(s['bytes_migrated'])} · sweep {_sweep(s, ' · ')} · "
                    f"{s['errors']} errors",
                )
                if s.get("recompress_state", "not run") != "not run":
                    prog.update(
                        cold,
                        visible=True,
                        total=max(1, s["recompress_bytes_total"]),
                        completed=s["recompress_bytes_done"],
                        what=_cold(s, " · "),
                    )
                if _finished(s):
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        return 130
    print(render(status(mnt)))
    return 0

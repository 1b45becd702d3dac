"""Show a store's logical and stored bytes, savings and counts (works beside a live mount)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ferryfs.store.store import Store

from ._common import mb, on_disk_text, saved_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="the store directory")
    p.add_argument("--json", action="store_true", help="print as JSON")


def run(args: argparse.Namespace) -> int:
    with Store.open(args.store, readonly=True) as store:
        s = store.stats()
    d = dataclasses.asdict(s)
    saved = 1 - s.bytes_stored / s.bytes_migrated if s.bytes_migrated else 0.0
    d["savings"] = round(saved, 4)
    if args.json:
        print(json.dumps(d))
        return 0
    rows = [
        ("files", f"{s.files_total} ({s.files_migrated} migrated, {s.files_legacy} legacy)"),
        ("directories", f"{s.dirs_total} ({s.dirs_listed} listed)"),
        ("logical bytes", mb(s.bytes_logical)),
        ("migrated bytes", mb(s.bytes_migrated)),
        ("after dedup", mb(s.bytes_after_dedup)),
        ("chunks", f"{s.chunks} ({mb(s.bytes_compressed)} after dedup and compression)"),
        (
            "packs",
            f"{s.packs} ({mb(s.bytes_packs)}, {mb(s.bytes_packs_dead)} dead; "
            f"{s.chunks_packed} chunks packed)",
        ),
        (
            "cold",
            f"{mb(s.bytes_cold_plain)} recompressed to {mb(s.bytes_cold_compressed)}; "
            f"{s.dictionaries} dictionaries, {s.chunks_dict} chunks use one",
        ),
        ("on disk", on_disk_text(s.bytes_stored, s.bytes_compressed)),
        ("saved", saved_text(s.bytes_stored, s.bytes_compressed, s.bytes_migrated)),
        (
            "search index",
            f"{mb(s.bytes_index)}, {s.files_indexed} files, {s.index_pending} pending",
        ),
        ("errors", str(s.errors)),
    ]
    for k, v in rows:
        print(f"{k:>15}  {v}")
    return 0

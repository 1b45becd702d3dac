"""Find the files that hold some words, in a live mount or an unmounted store.

Prints one path per line, relative to the mount's root, best first. Exact
whatever the index's lag: files the index does not hold at their current
content are read at query time (their count goes to stderr, or into --json).
Only what a search needs is imported here: the command's start is part of its
answer time.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from ferryfs.store.errors import FerryError, UsageError

if TYPE_CHECKING:
    from ferryfs.store.search import Hit, Query, Reader, Result, SearchStore


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a live ferryfs mount, or a store directory")
    p.add_argument(
        "words", nargs="+", metavar="WORD", help='words; "a phrase" in quotes matches in order'
    )
    p.add_argument("--any", action="store_true", help="files holding any of the words")
    p.add_argument("--json", action="store_true", help="path, score, size, mtime, snippet")
    p.add_argument("--limit", type=int, help="at most N paths")
    p.add_argument("--sort", choices=("relevance", "recent", "path"), default="relevance")
    p.add_argument("--since", metavar="DATE", help="modified at or after DATE (ISO 8601)")
    p.add_argument("--until", metavar="DATE", help="modified before the end of DATE")
    p.add_argument("--path", metavar="GLOB", help="only paths matching GLOB (* spans /)")


def _date_ns(s: str, end: bool) -> int:
    """DATE (local time unless it says its zone) in ns; with `end`, a bare date
    means the end of that day."""
    import datetime as dt

    try:
        if len(s) == 10:
            d = dt.datetime.combine(dt.date.fromisoformat(s), dt.time())
            if end:
                d += dt.timedelta(days=1)
        else:
            d = dt.datetime.fromisoformat(s)
    except ValueError:
        raise UsageError(f"not a date: {s!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM)") from None
    return int(d.timestamp() * 1e9)


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 0:
        raise UsageError("--limit must be at least 0")
    from ferryfs.store import search

    q = search.parse_query(args.words, args.any)
    filters = search.Filters(
        None if args.since is None else _date_ns(args.since, False),
        None if args.until is None else _date_ns(args.until, True),
        args.path,
    )
    store_dir, mount = _resolve(args.target)
    try:
        store = search.SearchStore(store_dir)
    except FerryError as e:
        raise FerryError(f"cannot search {args.target}: {e}") from None
    with store:
        if mount is None:
            mount = _mounted_in_place(store_dir, store.source_path())
        # An unmounted store reads its own files (the whole Store is made on the
        # first read only); a mounted one, through the mount, as the app sees them.
        reader: search.Reader = (
            search.MountReader(mount) if mount is not None else search.StoreReader(store)
        )
        stat_hits = args.json or args.sort == "recent"
        res = search.search(store, q, reader, filters, stat_hits)
        hits = _order(res.hits, args.sort)
        if args.limit is not None:
            hits = hits[: args.limit]
        if args.json:
            _print_json(res, hits, q, store, reader)
        else:
            out = sys.stdout.buffer
            # One write, however many hits; but a write to a pipe may take only
            # part (its reader went away, a full disk): go on until all of it is
            # written or the error shows, never end with the output cut short.
            rest = memoryview(b"".join(h.path + b"\n" for h in hits))
            while rest:
                rest = rest[out.write(rest) :]
            out.flush()
    for err in res.errors[:5]:
        print(f"ferryfs: search: cannot read {err}", file=sys.stderr)
    if res.read_now and not args.json:
        print(
            f"ferryfs: search: {res.read_now} files read at query time (not indexed yet)",
            file=sys.stderr,
        )
    return 1 if res.errors else 0


def _resolve(target: str) -> tuple[str, str | None]:
    """(store directory, mount root or None) of TARGET."""
    # Only a mount point can be a mount: a store directory is told apart by a
    # stat of it and its parent, without reading the mount table.
    if os.path.isdir(target) and os.path.ismount(target):
        from .mounts import control_get, is_ferryfs

        if is_ferryfs(target):
            return os.fsdecode(control_get(target, "store")), target
    if os.path.isdir(os.path.join(target, "db")):
        return target, None
    raise UsageError(f"{target} is neither a ferryfs mount nor a ferryfs store")


def _mounted_in_place(store_dir: str, src: str | None) -> str | None:
    """The live mount serving this store over its own Phase 3 tree, if any: that
    tree is then shadowed, and the files are read through the mount instead."""
    if src is None or not os.path.ismount(src):
        return None
    from .mounts import is_ferryfs

    if not is_ferryfs(src):
        return None
    try:
        served = os.fsdecode(os.getxattr(src, "user.ferryfs.store"))
    except OSError:
        return None
    return src if os.path.realpath(served) == os.path.realpath(store_dir) else None


def _order(hits: list[Hit], how: str) -> list[Hit]:
    if how == "recent":
        return sorted(hits, key=lambda h: (-h.mtime_ns, h.path))
    if how == "path":
        return sorted(hits, key=lambda h: h.path)
    return sorted(hits, key=lambda h: (-h.score, h.path))


def _print_json(res: Result, hits: list[Hit], q: Query, store: SearchStore, reader: Reader) -> None:
    import datetime as dt
    import json

    from ferryfs.store import text

    wanted = q.wanted()
    rows = []
    for h in hits:
        snippet = ""
        try:
            data = _read_hit(h, store, reader)
            if data is not None:
                snippet = text.snippet(data, h.kind, wanted)
        except (OSError, FerryError):
            pass
        rows.append(
            {
                "path": os.fsdecode(h.path),
                "score": round(h.score, 4),
                "size": h.size,
                "mtime": dt.datetime.fromtimestamp(h.mtime_ns / 1e9, dt.UTC).isoformat(),
                "snippet": snippet,
            }
        )
    print(
        json.dumps(
            {
                "hits": rows,
                "total": len(res.hits),
                "read_at_query_time": res.read_now,
                "checked": res.checked,
                "index_used": res.indexed,
                "errors": res.errors,
            }
        )
    )


def _read_hit(h: Hit, store: SearchStore, reader: Reader) -> bytes | None:
    from ferryfs.store import search

    if h.opener is not None:
        return h.opener()
    if isinstance(reader, search.MountReader):
        return reader.read(h.ino, h.path, None)  # type: ignore[arg-type]
    full = store.store()
    return reader.read(h.ino, h.path, full.getattr(h.ino))

"""The benchmark's small-file tree: what a session store mostly is.

    ROOT/sessions/<yyyy>/<mm>/<dd>/<session-id>.jsonl|.json   2-60 KB each
    ROOT/doc/...                                              a copy of /usr/share/doc

`build_small_tree` writes, under a directory, `round(20,000 * scale)` sessions
of 2-60 KB (sizes log-uniform, so most are small; agent logs as JSONL and a
quarter as one JSON chat export, made by tools/sampletree.py's generators) and
a copy of the machine's /usr/share/doc (many small text files, some gzipped:
the other shape of a tree of small files). At a scale below 1 the doc copy
keeps the same share of its files, chosen by a hash of each path. Symlinks and
unreadable files are skipped, never followed.

The sessions are the same bytes, names and mtimes for a seed (and `now_ns`);
the doc copy is whatever this machine has, so figures from two machines differ
there. `small_tree` caches the tree in the bench's `--out` directory, rebuilt
only when its parameters change.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import stat
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import blake3
from bench_common import SEED, fresh
from ferryfs.tools.sampletree import (
    JSON_EXPORT_RATE,
    REFERENCE_END,
    SPAN,
    SessionLog,
    TreeWriter,
    random_title,
    random_uuid,
)

SESSIONS = 20_000
MIN_SIZE = 2_000  # bytes; a session's target size is log-uniform in [MIN_SIZE, MAX_SIZE]
MAX_SIZE = 60_000
DOC_SOURCE = Path("/usr/share/doc")


@dataclass(frozen=True)
class SmallTree:
    """What `build_small_tree` wrote. `files` and `bytes` count regular files."""

    files: int
    bytes: int
    dirs: int
    sessions: int
    session_bytes: int
    doc_files: int
    doc_bytes: int


def _session_bytes(rng: random.Random, log: SessionLog, title: str, json_export: bool) -> bytes:
    """One session of MIN_SIZE..MAX_SIZE bytes: turns are added until it reaches a
    log-uniform target; a turn that would pass MAX_SIZE is left out (one turn at
    least, shortened if even that is too long, so every file still parses)."""
    target = int(MIN_SIZE * (MAX_SIZE / MIN_SIZE) ** rng.random())
    data: bytes
    if json_export:
        messages: list[dict[str, str]] = []
        doc: dict[str, object] = {"id": log.sid, "title": title, "model": log.model}
        size = len(json.dumps(doc, ensure_ascii=False, indent=2).encode())
        while size < target:
            pair = log.message()
            grown = size + len(json.dumps(pair, ensure_ascii=False, indent=2).encode())
            if grown > MAX_SIZE and messages:
                break
            messages.extend(pair)
            size = grown
        doc["messages"] = messages
        data = json.dumps(doc, ensure_ascii=False, indent=2).encode() + b"\n"
        while len(data) > MAX_SIZE:  # the size estimate was short: drop or cut the last answer
            over = len(data) - MAX_SIZE
            last = messages[-1]
            if len(messages) > 2 and len(last["content"]) < 2 * over:
                del messages[-2:]
            else:
                last["content"] = last["content"][: max(0, len(last["content"]) - over - 8)]
            data = json.dumps(doc, ensure_ascii=False, indent=2).encode() + b"\n"
            if not last["content"] and len(messages) <= 2:
                break  # one exchange whose question alone is too long: keep it whole
        return data
    data = log.header()
    while len(data) < target:
        turn = log.turn()
        if len(data) + len(turn) > MAX_SIZE and len(data) >= MIN_SIZE:
            break
        data += turn
    if len(data) > MAX_SIZE:  # one turn too long: keep its whole lines that fit
        data = data[: data.rfind(b"\n", 0, MAX_SIZE) + 1]
    return data


def _write_sessions(w: TreeWriter, sessions: int, seed: int) -> int:
    """`sessions` session files in day directories, in time order; their bytes."""
    rng = random.Random(seed)
    span = SPAN.total_seconds() - 86400
    starts = sorted(rng.uniform(0, span) for _ in range(sessions))
    total = 0
    for off in starts:
        start = REFERENCE_END - SPAN + timedelta(seconds=off)
        sid = random_uuid(rng)
        log = SessionLog(rng, sid, start)
        export = rng.random() < JSON_EXPORT_RATE
        data = _session_bytes(rng, log, random_title(rng), export)
        ext = "json" if export else "jsonl"
        w.write(f"sessions/{start:%Y/%m/%d}/{sid}.{ext}", data, log.t)
        total += len(data)
    return total


def _chosen(rel: bytes, scale: float) -> bool:
    """Whether the doc file `rel` is in a copy at `scale` (by its path's hash, so
    the choice does not depend on walk order or on the other files)."""
    if scale >= 1.0:
        return True
    h = int.from_bytes(blake3.blake3(rel).digest(length=8), "big")
    return h < scale * 2**64


def _copy_doc(root: Path, src: Path, scale: float) -> tuple[int, int]:
    """Copy the regular files of `src` under `root/doc` with their mtimes, skipping
    symlinks (never followed), unreadable files and anything not a regular file.
    Returns (files, bytes) copied."""
    dest = os.path.join(os.fsencode(root), b"doc")
    base = os.fsencode(src)
    files = size = 0
    dir_mtimes: list[tuple[bytes, int]] = []
    for dirpath, dirnames, names in os.walk(base, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, base)
        out_dir = os.path.normpath(os.path.join(dest, rel_dir))
        for name in sorted(names):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if not _chosen(rel, scale):
                continue
            try:
                fd = os.open(
                    os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                )
            except OSError:
                continue  # a symlink (ELOOP), unreadable, or gone
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            finally:
                os.close(fd)
            os.makedirs(out_dir, exist_ok=True)
            target = os.path.join(out_dir, name)
            with open(target, "xb") as f:
                f.write(data)
            os.utime(target, ns=(st.st_mtime_ns, st.st_mtime_ns))
            files += 1
            size += len(data)
        with contextlib.suppress(OSError):
            dir_mtimes.append((out_dir, os.stat(dirpath).st_mtime_ns))
    for path, ns in reversed(dir_mtimes):  # deepest first: setting a child's touches nothing
        if os.path.isdir(path):
            os.utime(path, ns=(ns, ns))
    return files, size


def build_small_tree(
    root: Path,
    *,
    scale: float = 1.0,
    seed: int = SEED,
    doc: Path | None = DOC_SOURCE,
    doc_scale: float | None = None,
    now_ns: int | None = None,
) -> SmallTree:
    """Write the small-file tree into `root` (created; should be empty).

    `scale` multiplies the number of sessions (20,000 at 1.0) and the share of
    the doc copy kept (`doc_scale`, if given, sets the doc share alone); `doc=None`
    (or a missing directory) leaves the copy out.
    Raises FileExistsError rather than overwrite a file.
    """
    doc_share = scale if doc_scale is None else doc_scale
    if not (0 < scale <= 1.0 and 0 < doc_share <= 1.0):
        raise ValueError("scale must be in (0, 1]")
    sessions = max(1, round(SESSIONS * scale))
    root.mkdir(parents=True, exist_ok=True)
    w = TreeWriter(root, now_ns if now_ns is not None else time.time_ns())
    session_bytes = _write_sessions(w, sessions, seed)
    dirs = w.finish()
    doc_files = doc_bytes = 0
    if doc is not None and doc.is_dir():
        doc_files, doc_bytes = _copy_doc(root, doc, doc_share)
    dirs += sum(len(d) for _p, d, _f in os.walk(root / "doc")) + (doc_files > 0)
    return SmallTree(
        files=sessions + doc_files,
        bytes=session_bytes + doc_bytes,
        dirs=dirs,
        sessions=sessions,
        session_bytes=session_bytes,
        doc_files=doc_files,
        doc_bytes=doc_bytes,
    )


def small_tree(out: Path, scale: float = 1.0, seed: int = SEED) -> tuple[Path, SmallTree]:
    """The small-file tree in `out`, reused if built with the same parameters."""
    root, marker = out / f"smalltree-{scale:g}", out / f"smalltree-{scale:g}.json"
    params: dict[str, object] = {"scale": scale, "seed": seed, "sessions": SESSIONS}
    if root.is_dir() and marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("params") == params:
            return root, SmallTree(**saved["summary"])
    marker.unlink(missing_ok=True)
    summary = build_small_tree(fresh(root), scale=scale, seed=seed)
    marker.write_text(json.dumps({"params": params, "summary": asdict(summary)}))
    return root, summary


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write the benchmark's small-file tree.")
    ap.add_argument("root", type=Path, help="directory to create (should be empty)")
    ap.add_argument("--scale", type=float, default=1.0, help="share of 20,000 sessions (0-1]")
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args()
    t0 = time.monotonic()
    print(build_small_tree(a.root, scale=a.scale, seed=a.seed), f"{time.monotonic() - t0:.1f} s")

"""Corruption: random bit flips (XOR one random bit of one random byte, as borg's
tests do) in random chunk records of an unmounted store.

- Mounted, a read of a damaged file gives the Phase 3 bytes (healed) or EIO, never
  wrong bytes; a damaged file changed through the mount cannot be healed: EIO, and
  the mount goes failsafe (writes get EROFS, status says so).
- `fsck --deep` finds every damaged chunk (the set of files it names is exactly the
  set holding a damaged chunk), changes nothing, and `fsck --repair --yes` restores
  every unmodified file byte-exact and names the files it could not save.

What "damaged" means is decided by `helpers.damage.chunk_damaged`, not by the code
under test: a record whose header is not (codec 0 or 1, dictionary 0) or whose
payload does not decode (with `zstandard` directly) to bytes whose blake3 is the
chunk's key. A flip that would leave a record valid is drawn again.

The seed is printed; rerun one with FERRYFS_CORRUPT_SEED=N.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest
from conftest import NOW_NS
from ferryfs.store import content
from ferryfs.store.records import HOLE
from ferryfs.store.store import Store
from ferryfs.tools.sampletree import generate
from helpers.damage import damage_chunk
from helpers.mount import cli, ferry, mounted, wait_for
from helpers.store import store_entries
from helpers.trees import files_of

SEED = int(os.environ.get("FERRYFS_CORRUPT_SEED", str(int(time.time()) % 100_000)))
FAST = ("--idle-ms", "20", "--max-load", "64", "--batch-delay-ms", "0")
HEALABLE_FLIPS = 8  # chunks named only by unmodified files
UNHEALABLE_FLIPS = 3  # chunks named only by files changed through the mount
# What the daemon logs about the damage we made on purpose.
EXPECTED_LOG = r"corrupt chunk|healed chunk|failsafe"


@dataclass
class Layout:
    """Which file names which chunk, read from the store (unmounted, read-only)."""

    paths_of: dict[bytes, set[str]]  # digest -> files naming it
    changed: set[str]  # files changed through the mount (or created there)
    files: dict[str, int]  # path -> ino


def layout(store_dir: Path) -> Layout:
    paths_of: dict[bytes, set[str]] = defaultdict(set)
    changed: set[str] = set()
    files: dict[str, int] = {}
    with Store.open(str(store_dir), readonly=True) as st, st.backend.read() as txn:
        for p, node in store_entries(txn):
            if node.is_dir:
                assert node.stored, f"directory {p!r} still UNLISTED after the sweep"
            elif node.is_reg:
                assert node.stored, f"{p} still LEGACY after the sweep"
                files[p] = node.ino
                if node.changed:
                    changed.add(p)
                for _off, dg, _n in content.all_extents(txn, node.ino):
                    if dg != HOLE:
                        paths_of[dg].add(p)
    return Layout(dict(paths_of), changed, files)


def flip_bits(store_dir: Path, digests: list[bytes], rng: random.Random) -> set[bytes]:
    """Damage each chunk record with one random bit; the damaged digests. The first
    flip lands in the 5-byte header (codec, dictionary id), which a flip anywhere in
    a 100 KB record would almost never hit."""
    for i, d in enumerate(digests):
        damage_chunk(store_dir, d, rng, hi=5 if i == 0 else None)
    return set(digests)


def chunk_records(store_dir: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(store_dir / "db"), max_dbs=32, readonly=True, lock=False)
    try:
        chunks = env.open_db(b"chunks", create=False)
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=chunks)}
    finally:
        env.close()


def fsck(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = ferry("fsck", store, *args)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def fsck_json(store: Path, *args: str) -> tuple[int, dict[str, object]]:
    r = fsck(store, "--json", *args)
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"fsck --json printed no JSON:\n{r.stdout}\n{r.stderr}") from None
    assert isinstance(doc, dict) and {"errors", "repaired", "problems"} <= doc.keys(), doc
    return r.returncode, doc


def problem_paths(doc: dict[str, object]) -> set[str]:
    out = set()
    for p in doc["problems"]:  # type: ignore[attr-defined]
        path = p.get("path")
        if path:
            out.add(str(path).lstrip("/"))
    return out


def problem_digests(doc: dict[str, object]) -> set[str]:
    """Hex digests (or prefixes of them, 12+ digits) named anywhere in the problems."""
    return set(re.findall(r"\b[0-9a-f]{12,64}\b", json.dumps(doc["problems"])))


def names_all(found: set[str], wanted: set[bytes]) -> set[bytes]:
    """The digests of `wanted` that no hex string in `found` names (by prefix)."""
    return {d for d in wanted if not any(d.hex().startswith(h) for h in found)}


def migrated_store(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes], dict[str, bytes]]:
    """A Phase 3 tree, fully migrated into a store through a mount, with a few files
    changed through it (appended to, rewritten, created). Returns src, store, the
    Phase 3 contents and the changed files' contents."""
    src = tmp_path / "phase3"
    generate(src, 24, seed=5, attachment_mb=3, now_ns=NOW_NS)
    store = tmp_path / "store"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rng = random.Random(SEED)
    phase3 = files_of(src)
    changed: dict[str, bytes] = {}
    with mounted(src, mnt, store, args=FAST) as m:
        wait_for(lambda: m.status()["sweep_state"] == "done", 120, "the sweep to finish")
        sessions = sorted(p for p in phase3 if p.endswith(".jsonl"))
        for p in sessions[:2]:  # appended: new chunks at their tail
            with open(mnt / p, "ab") as f:
                f.write(json.dumps({"n": p, "pad": rng.randbytes(150_000).hex()}).encode())
        for p in sessions[2:3]:  # rewritten entirely
            (mnt / p).write_bytes(rng.randbytes(300_000))
        (mnt / "created.bin").write_bytes(rng.randbytes(400_000))
        for p in [*sessions[:3], "created.bin"]:
            changed[p] = (mnt / p).read_bytes()
    return src, store, phase3, changed


def pick(lay: Layout, rng: random.Random) -> tuple[list[bytes], list[bytes]]:
    """Random chunks named only by unmodified files, and only by changed ones."""
    healable = sorted(d for d, ps in lay.paths_of.items() if not ps & lay.changed)
    unhealable = sorted(d for d, ps in lay.paths_of.items() if ps <= lay.changed)
    assert len(healable) >= 2 * HEALABLE_FLIPS and len(unhealable) >= UNHEALABLE_FLIPS
    return rng.sample(healable, HEALABLE_FLIPS), rng.sample(unhealable, UNHEALABLE_FLIPS)


def read_or_errno(path: Path) -> bytes | int:
    try:
        return path.read_bytes()
    except OSError as e:
        return e.errno or -1


def test_damaged_chunks_read_as_healed_bytes_or_eio_never_wrong(tmp_path: Path) -> None:
    print(f"\ncorruption seed: {SEED} (rerun with FERRYFS_CORRUPT_SEED={SEED})")
    rng = random.Random(SEED)
    src, store, phase3, changed = migrated_store(tmp_path)
    lay = layout(store)
    healable, unhealable = pick(lay, rng)
    bad = flip_bits(store, healable + unhealable, rng)
    bad_healable = [d for d in healable if d in bad]
    bad_unhealable = [d for d in unhealable if d in bad]
    assert bad_unhealable, "no flip damaged a chunk of a changed file"
    hit_unmodified = sorted({p for d in bad_healable for p in lay.paths_of[d]})
    hit_changed = sorted({p for d in bad_unhealable for p in lay.paths_of[d]})

    # One damaged unmodified file is kept for after the failsafe.
    late = next(p for p in hit_unmodified if any(lay.paths_of[d] == {p} for d in bad_healable))
    early = [p for p in phase3 if p not in changed and p != late]

    mnt = tmp_path / "mnt"
    with mounted(src, mnt, store, args=("--no-sweep",), log_ok=EXPECTED_LOG) as m:
        # Every unmodified file: Phase 3's bytes (healed where damaged) or EIO, never others.
        eio = []
        for p in early:
            got = read_or_errno(mnt / p)
            if isinstance(got, int):
                assert got == errno.EIO, f"{p}: errno {got}, expected EIO"
                eio.append(p)
            else:
                assert got == phase3[p], f"{p}: WRONG BYTES from a damaged store"
        s = m.status()
        # Two reads racing on one chunk may both heal it: compare the chunks healed.
        healed_early = {d.hex()[:16] for d in bad_healable if lay.paths_of[d] != {late}}
        assert s["failsafe"] is None, f"failsafe without cause: {s['failsafe']}"
        assert s["corrupt_reads"] >= s["healed"] >= len(healed_early), s
        assert set(re.findall(r"healed chunk ([0-9a-f]+)", m.new_log())) == healed_early
        assert not eio, f"unmodified files not healed from Phase 3: {eio}"
        # Healed in the store, not only in the answer: read again, no new corrupt read.
        for p in hit_unmodified:
            if p == late:
                continue
            assert (mnt / p).read_bytes() == phase3[p]
        assert m.status()["corrupt_reads"] == s["corrupt_reads"]

        # A damaged file changed through the mount: EIO, never its stale Phase 3 bytes.
        for p in hit_changed:
            got = read_or_errno(mnt / p)
            assert got == errno.EIO, f"{p}: {'wrong bytes' if isinstance(got, bytes) else got}"
        for p in set(changed) - set(hit_changed):
            assert (mnt / p).read_bytes() == changed[p]
        s = m.status()
        assert s["failsafe"], "unhealable damage did not put the mount in failsafe"
        with pytest.raises(OSError) as e:
            (mnt / "after-failsafe.txt").write_bytes(b"x")
        assert e.value.errno == errno.EROFS, e.value
        # write() itself is refused, not only the close() that would flush it: an app
        # that does not check close() must not believe its bytes were taken.
        fd = os.open(mnt / early[0], os.O_WRONLY | os.O_APPEND)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, b"more")
            assert e.value.errno == errno.EROFS, e.value
        finally:
            os.close(fd)
        assert (mnt / early[0]).read_bytes() == phase3[early[0]]
        # In failsafe a read still answers Phase 3's bytes or EIO (not EROFS).
        got = read_or_errno(mnt / late)
        assert got in (phase3[late], errno.EIO), (
            f"{late} read in failsafe: {'wrong bytes' if isinstance(got, bytes) else got}"
        )
        status_text = cli("status", mnt)
        assert "FAILSAFE" in status_text and "fsck" in status_text, status_text
        log = m.new_log()
        assert "failsafe" in log
    print(
        f"chunks flipped: {len(healable) + len(unhealable)}, damaged: {len(bad)} "
        f"({len(healable) + len(unhealable) - len(bad)} flips left a record valid), "
        f"unmodified files hit: {len(hit_unmodified)} (all healed, byte-exact), "
        f"changed files hit: {len(hit_changed)} (EIO, failsafe), "
        f"files read: {len(phase3)}"
    )


def test_fsck_deep_finds_every_flip_and_repair_restores_unmodified_files(
    tmp_path: Path,
) -> None:
    print(f"\ncorruption seed: {SEED} (rerun with FERRYFS_CORRUPT_SEED={SEED})")
    rng = random.Random(SEED + 1)
    src, store, phase3, changed = migrated_store(tmp_path)
    code, doc = fsck_json(store, "--deep")
    assert code == 0 and not doc["problems"], f"fsck not clean before damage: {doc}"
    lay = layout(store)
    healable, unhealable = pick(lay, rng)
    bad = flip_bits(store, healable + unhealable, rng)
    hit = {p for d in bad for p in lay.paths_of[d]}
    hit_changed = {p for p in hit if p in lay.changed}
    assert hit_changed, "no flip damaged a chunk of a changed file"

    # Without --deep: structure only (it may or may not look at chunk bytes).
    r = fsck(store)
    assert r.returncode in (0, 4), r.stdout + r.stderr

    # --deep finds every damaged chunk and names exactly the files holding one.
    before = chunk_records(store)
    code, found = fsck_json(store, "--deep")
    assert code == 4, f"fsck --deep exit {code} with {len(bad)} damaged chunks: {found}"
    named = problem_paths(found)
    assert named == hit, (
        f"missed: {sorted(hit - named)}, named but undamaged: {sorted(named - hit)}"
    )
    digests = problem_digests(found)
    missed = names_all(digests, bad) if digests else set()
    assert not missed, f"fsck --deep named no problem for chunks {[d.hex() for d in missed]}"
    assert chunk_records(store) == before, "fsck without --repair changed the store"

    # --repair --yes: every unmodified file back byte-exact; the changed ones named.
    r = fsck(store, "--deep", "--repair", "--yes")
    out = r.stdout + r.stderr
    assert r.returncode == 4, f"repair exit {r.returncode}; changed files cannot be saved:\n{out}"
    for p in hit_changed:
        assert p in out, f"repair does not say it could not save {p}:\n{out}"
    code, after = fsck_json(store, "--deep")
    assert code == 4 and problem_paths(after) == hit_changed, after

    mnt = tmp_path / "mnt"
    with mounted(src, mnt, store, args=("--no-sweep",), log_ok=EXPECTED_LOG) as m:
        for p, body in phase3.items():
            if p not in changed:
                assert (mnt / p).read_bytes() == body, f"{p} not restored by repair"
        assert m.status()["corrupt_reads"] == 0, "repair left damage an unmodified file reads"
        for p in set(changed) - hit_changed:
            assert (mnt / p).read_bytes() == changed[p]
    print(
        f"chunks flipped: {len(healable) + len(unhealable)}, damaged: {len(bad)}, "
        f"found by fsck --deep: {len(bad) - len(missed)} chunks in {len(hit)} files "
        f"(exactly the damaged ones), repaired: {len(hit - hit_changed)} unmodified files "
        f"byte-exact, not saveable: {len(hit_changed)} changed files"
    )

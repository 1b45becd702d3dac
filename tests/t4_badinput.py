"""Bad input through the CLI, each command in a subprocess as an operator runs it:
an empty store directory, a truncated or foreign data.mdb, a store of another
schema version, a missing SRC, SRC a file, a busy or non-directory mountpoint, a
store locked by a live daemon, `status` of a directory that is not a mount.

Each must give ONE line on stderr (`ferryfs: ...`, naming the problem), no
traceback, nothing on stdout, the exit code the README promises (2 bad arguments
or input, 1 a failure, 8 a store that cannot be used; fsck 4 for a damaged
database), and change nothing: the
Phase 3 tree, the store directory (its daemon.log aside, which may gain the error
line) and the mountpoint are the same before and after, and nothing is mounted.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest
from conftest import NOW_NS
from ferryfs.store.records import SCHEMA_VERSION
from ferryfs.tools.mounts import fs_type
from ferryfs.tools.sampletree import generate
from helpers.mount import cli, ferry, mounted, require_fuse, snapshot, snapshot_diff

FOREIGN_SCHEMA = 99


def files_state(root: Path) -> dict[str, object]:
    """Every file under `root` with its size and sha256; LMDB's lock.mdb (its reader
    table moves with every reader) by name only, daemon.log not at all (a failed
    mount may log its error line there; see test_an_unusable_store)."""
    out: dict[str, object] = {}
    if not root.exists():
        return out
    for dirpath, dirs, names in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for n in names:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if n == "daemon.log":
                continue
            if n == "lock.mdb":
                out[rel] = "present"
            else:
                out[rel] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small Phase 3 tree and a store migrated from it (copied, never used directly)."""
    base = tmp_path_factory.mktemp("badinput")
    src = base / "phase3"
    generate(src, 4, seed=2, attachment_mb=1, now_ns=NOW_NS)
    cli("migrate", src, "--store", base / "store")
    return src, base / "store"


# -- the stores ---------------------------------------------------------------------


def copy_store(made: tuple[Path, Path], to: Path) -> Path:
    shutil.copytree(made[1], to)
    return to


def empty_dir(made: tuple[Path, Path], to: Path) -> Path:
    to.mkdir()
    return to


def truncated_half(made: tuple[Path, Path], to: Path) -> Path:
    copy_store(made, to)
    data = to / "db" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    return to


def truncated_zero(made: tuple[Path, Path], to: Path) -> Path:
    copy_store(made, to)
    os.truncate(to / "db" / "data.mdb", 0)
    return to


def not_lmdb(made: tuple[Path, Path], to: Path) -> Path:
    copy_store(made, to)
    (to / "db" / "data.mdb").write_bytes(b'{"this is": "not an LMDB file"}\n' * 4)
    return to


def other_schema(made: tuple[Path, Path], to: Path) -> Path:
    copy_store(made, to)
    env = lmdb.open(str(to / "db"), max_dbs=32)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(write=True) as txn:
            assert struct.unpack(">Q", txn.get(b"schema", db=meta)) == (SCHEMA_VERSION,)
            txn.put(b"schema", struct.pack(">Q", FOREIGN_SCHEMA), db=meta)
    finally:
        env.close()
    return to


STORES: dict[str, tuple[Callable[[tuple[Path, Path], Path], Path], str]] = {
    "empty-dir": (empty_dir, r"not a ferryfs store"),
    "truncated-half": (truncated_half, r"data\.mdb is truncated"),
    "truncated-zero": (truncated_zero, r"data\.mdb is empty"),
    "not-lmdb": (not_lmdb, r"not an LMDB file|not a ferryfs store"),
    "other-schema": (other_schema, rf"schema version {FOREIGN_SCHEMA}\b"),
}


def check(r: subprocess.CompletedProcess[str], code: int, says: str) -> str:
    """One line on stderr matching `says`, no traceback, no stdout, exit `code`."""
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr, r.stderr
    assert err.count("\n") == 0 and err, f"not one line on stderr: {r.stderr!r}"
    assert err.startswith("ferryfs: "), err
    assert re.search(says, err), f"{err!r} does not say /{says}/"
    assert r.stdout == "", f"stdout on an error: {r.stdout!r}"
    assert r.returncode == code, f"exit {r.returncode}, expected {code}: {err}"
    return err


def unchanged(src: Path, store: Path, mnt: Path | None = None) -> Callable[[], None]:
    """Snapshot now; the returned function asserts nothing changed since."""
    s0, t0 = snapshot(src), files_state(store)
    m0 = snapshot(mnt) if mnt is not None and mnt.exists() else None

    def after() -> None:
        assert not snapshot_diff(s0, snapshot(src)), "the Phase 3 tree changed"
        t1 = files_state(store)
        assert t1 == t0, (
            f"the store directory changed: { {k: t1.get(k) for k in t0.keys() ^ t1.keys() or t1} }"
        )
        if mnt is not None:
            assert fs_type(str(mnt)) is None, f"{mnt} is mounted after a failed command"
            if m0 is not None:
                assert not snapshot_diff(m0, snapshot(mnt)), "the mountpoint changed"

    return after


# -- stores that cannot be used -------------------------------------------------------


# A damaged database (not a store that cannot be used) is what fsck exits 4 for.
DAMAGED = ("truncated-half", "truncated-zero", "not-lmdb")

# An empty directory is where migrate and mount create a store: not bad input for them.
UNUSABLE = [
    (kind, command)
    for command in ("stats", "fsck", "migrate", "mount")
    for kind in STORES
    if not (kind == "empty-dir" and command in ("migrate", "mount"))
]


@pytest.mark.parametrize(("kind", "command"), UNUSABLE)
def test_an_unusable_store(made, tmp_path: Path, kind: str, command: str) -> None:  # type: ignore[no-untyped-def]
    make, says = STORES[kind]
    if command == "mount":
        require_fuse()
    src = made[0]
    store = make(made, tmp_path / "store")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "keep.txt").write_text("the mountpoint's own file\n")
    log = store / "daemon.log"
    log_before = log.read_bytes() if log.exists() else b""
    done = unchanged(src, store, mnt)
    argv: list[str | Path] = {
        "stats": ["stats", store],
        "fsck": ["fsck", store],
        "migrate": ["migrate", src, "--store", store],
        "mount": ["mount", src, mnt, "--store", store],
    }[command]
    r = ferry(*argv)
    try:
        done()
        if log.exists():
            added = log.read_bytes()[len(log_before) :].decode(errors="replace")
            assert "Traceback" not in added, added
        check(r, 4 if command == "fsck" and kind in DAMAGED else 8, says)
    finally:
        if fs_type(str(mnt)) is not None:  # never leave a mount behind, whatever failed
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    print(f"{command} on a store that is {kind}: exit {r.returncode}: {r.stderr.strip()}")


# -- bad sources and mountpoints ------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "migrate-missing-src",
        "migrate-src-is-a-file",
        "mount-missing-src",
        "mount-src-is-a-file",
        "mount-on-a-file",
        "status-of-a-directory",
    ],
)
def test_bad_source_or_mountpoint(made, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    src = made[0]
    store = copy_store(made, tmp_path / "store")
    afile = src / "index.json"
    assert afile.is_file()
    target = tmp_path / "notadir.json"
    target.write_text('{"a mountpoint": "that is a non-empty regular file"}\n')
    missing = tmp_path / "nowhere"
    argv, code, says = {
        "migrate-missing-src": (["migrate", missing], 2, r"nowhere is not a directory"),
        "migrate-src-is-a-file": (
            ["migrate", afile, "--store", store],
            2,
            r"index\.json is not a directory",
        ),
        "mount-missing-src": (["mount", missing, tmp_path], 2, r"nowhere is not a directory"),
        "mount-src-is-a-file": (
            ["mount", afile, tmp_path, "--store", store],
            2,
            r"index\.json is not a directory",
        ),
        "mount-on-a-file": (
            ["mount", src, target, "--store", store],
            2,
            r"mountpoint .*notadir\.json is not a directory",
        ),
        "status-of-a-directory": (["status", tmp_path], 1, r"is not a ferryfs mount"),
    }[case]
    done = unchanged(src, store)
    before = set(os.listdir(tmp_path))
    body = target.read_bytes()
    r = ferry(*argv)
    done()
    assert set(os.listdir(tmp_path)) == before, "a file appeared (a default store?)"
    assert target.read_bytes() == body
    assert not (tmp_path / "nowhere.ferry").exists()
    err = check(r, code, says)
    print(f"{case}: exit {r.returncode}: {err}")


# -- a store and a mountpoint in use by a live daemon -----------------------------------


def test_store_locked_and_mountpoint_busy(made, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    require_fuse()
    src = tmp_path / "phase3"
    shutil.copytree(made[0], src, symlinks=True)
    store = tmp_path / "store"
    mnt, mnt2 = tmp_path / "mnt", tmp_path / "mnt2"
    mnt.mkdir()
    mnt2.mkdir()
    seen = []
    with mounted(src, mnt, store, log_ok=r"is in use by another ferryfs process") as m:
        (mnt / "index.json").read_bytes()  # a live store with a migrated file
        cases: list[tuple[str, list[str | Path], int, str]] = [
            ("migrate a locked store", ["migrate", src, "--store", store], 8, r"in use"),
            (
                "mount a locked store elsewhere",
                ["mount", src, mnt2, "--store", store],
                8,
                r"in use",
            ),
            ("mount on a busy mountpoint", ["mount", src, mnt, "--store", store], 2, r"already a"),
            (
                "fsck --repair of a mounted store",
                ["fsck", store, "--repair", "--yes"],
                8,
                r"in use",
            ),
        ]
        for name, argv, code, says in cases:
            # The live store changes as it serves: compare its data through the mount.
            before_src = snapshot(src)
            before_view = (mnt / "index.json").read_bytes()
            r = ferry(*argv)
            assert not snapshot_diff(before_src, snapshot(src)), f"{name}: Phase 3 changed"
            assert (mnt / "index.json").read_bytes() == before_view
            assert fs_type(str(mnt2)) is None, f"{name}: {mnt2} got mounted"
            assert int(os.getxattr(mnt, "user.ferryfs.pid")) == m.pid, "the live daemon changed"
            err = check(r, code, says)
            seen.append(f"{name}: exit {r.returncode}: {err}")
        # Beside a live mount, reading the store works: stats is no bad input.
        out = ferry("stats", store, "--json")
        assert out.returncode == 0, out.stderr
    print("\n".join(seen))


def test_a_hostile_name_in_fsck_output_is_escaped(made, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A name fsck quotes (here the Phase 3 path the store records, as a damaged
    record could make it) with a newline, an escape sequence and bytes that are not
    UTF-8: the output stays valid UTF-8, one line per problem, no control character."""
    store = copy_store(made, tmp_path / "store")
    hostile = b"/nowhere/x\ny\x1b[2J\xff\xfe"
    env = lmdb.open(str(store / "db"), max_dbs=64)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"source", hostile)
    env.close()
    r = subprocess.run(
        [sys.executable, "-m", "ferryfs.tools.cli", "fsck", str(store)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    out = r.stdout.decode("utf-8")  # raises if fsck printed bytes that are not UTF-8
    lines = [x for x in out.splitlines() if x.startswith("phase3-missing")]
    assert len(lines) == 1, out
    assert "\x1b" not in out and r"\x1b[2J" in lines[0] and r"\xff\xfe" in lines[0], lines
    assert r.returncode == 4, (r.returncode, r.stderr)


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`ferryfs search ... | head`: the reader closes the pipe after a few bytes.
    The command stops as grep does (the shell's 141, SIGPIPE), with nothing on
    stderr: no "Broken pipe" line, no traceback."""
    src = tmp_path / "phase3"
    src.mkdir()
    for i in range(3000):  # ~300 KB of hits: more than a pipe holds
        (src / f"session-{i:05d}-{'x' * 80}.txt").write_text(f"hello number {i}\n")
    cli("migrate", src, "--store", tmp_path / "store")
    argv = [sys.executable, "-m", "ferryfs.tools.cli", "search", str(tmp_path / "store"), "hello"]
    for json in ([], ["--json"]):  # one write of every path; a line per hit
        p = subprocess.Popen(
            [*argv, *json],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert p.stdout is not None and p.stderr is not None
        assert p.stdout.read(10)
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait(60) == 141, (json, err)
        assert err == "", err

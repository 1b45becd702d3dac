"""Rollback points: the first migrate records one (a manifest of the whole tree),
verify sees drift by stat and, with --deep, by content; fsck reports drift too;
an unfinished recording is redone; expire refuses without --yes, before expiry,
with files not migrated and on drift, and otherwise deletes only the Phase 3
files whose content is verifiably in the store."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from ferryfs.store import points
from ferryfs.store.kv import Txn
from ferryfs.store.store import Store
from ferryfs.tools import cli
from helpers.mount import ferry
from helpers.store import tree_rows


def inproc(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([os.fspath(a) for a in args])
    return code, capsys.readouterr().out


def entries(root: Path) -> dict[bytes, os.stat_result]:
    return tree_rows(root, lambda _path, st: st)


def age(store: Path, days: int) -> None:
    """Move every point's creation `days` into the past."""
    with Store.open(str(store)) as s:

        def op(txn: Txn) -> None:
            for p in points.read_points(txn):
                p.created_ns -= days * points.DAY_NS
                txn.put("points", points.head_key(p.id), p.header())

        s.transact(op)


def test_migrate_records_the_whole_tree(
    migrated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = migrated
    code, out = inproc(capsys, "points", "list", store, "--json")
    assert code == 0
    (row,) = json.loads(out)
    want = entries(src)
    files = [st for st in want.values() if stat.S_ISREG(st.st_mode)]
    assert (row["id"], row["retention_days"], row["complete"], row["expired"]) == (
        1,
        30,
        True,
        False,
    )
    assert (row["entries"], row["files"], row["bytes"]) == (
        len(want),
        len(files),
        sum(st.st_size for st in files),
    )
    with Store.open(str(store), readonly=True) as s, s.backend.read() as txn:
        rows = {path: r for _k, path, r in points.rows(txn, 1)}
    assert rows.keys() == want.keys()
    assert all(rows[p] == points.Row.of(st) for p, st in want.items())
    # Migrating again (a resumed run) keeps the point: the tree is not walked again.
    assert cli.main(["migrate", str(src), "--store", str(store)]) == 0
    assert [p.id for p in points_of(store)] == [1]


def points_of(store: Path) -> list[points.Point]:
    with Store.open(str(store), readonly=True) as s:
        return points.list_points(s)


def test_verify_sees_drift_by_stat_and_by_content(
    migrated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = migrated
    code, out = inproc(capsys, "points", "verify", store, "--deep", "--json")
    assert code == 0 and json.loads(out)["matches"] is True, out
    files = sorted(p for p in src.rglob("*.jsonl"))
    files[0].write_bytes(files[0].read_bytes() + b"\n")  # appended
    files[1].unlink()  # gone
    (files[2].parent / "new.txt").write_text("born after the point")  # new
    code, out = inproc(capsys, "points", "verify", store, "--json")
    doc = json.loads(out)
    drifted = {d["path"]: d["how"] for d in doc["drifted"]}
    rel = {f: "/" + str(f.relative_to(src)) for f in files[:3]}
    assert code == 4 and doc["matches"] is False
    assert "size changed" in drifted[rel[files[0]]]
    assert drifted[rel[files[1]]] == "gone"
    assert drifted["/" + str((files[2].parent / "new.txt").relative_to(src))].startswith("new")
    # fsck reports the same drift, without --deep too.
    code, out = inproc(capsys, "fsck", store, "--json")
    fsck_paths = {p["path"] for p in json.loads(out)["problems"] if p["kind"] == "phase3-drift"}
    assert code == 4 and set(drifted) <= fsck_paths

    # Content changed with size and times as they were: only --deep can see that
    # (ctime cannot be set back, so the test records the new one in the manifest,
    # as if the filesystem had not moved it).
    victim = files[3]
    st = victim.stat()
    body = victim.read_bytes()
    victim.write_bytes(body[:-2] + bytes([body[-2] ^ 1]) + body[-1:])
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    path = os.fsencode(victim.relative_to(src))
    with Store.open(str(store)) as s:
        s.transact(
            lambda t: t.put(
                "points",
                points.row_key(1, path),
                points._row_value(path, points.Row.of(victim.lstat())),
            )
        )
    shown = "/" + str(victim.relative_to(src))
    code, out = inproc(capsys, "points", "verify", store, "--json")
    assert shown not in {d["path"] for d in json.loads(out)["drifted"]}
    code, out = inproc(capsys, "points", "verify", store, "--deep", "--json")
    deep = {d["path"]: d["how"] for d in json.loads(out)["drifted"]}
    assert code == 4 and deep[shown].startswith("content changed"), deep
    code, out = inproc(capsys, "fsck", store, "--deep", "--json")
    hit = [p for p in json.loads(out)["problems"] if p["path"] == shown]
    assert [p["kind"] for p in hit] == ["phase3-drift"] and not hit[0]["repairable"]


def test_an_unfinished_point_is_recorded_again(tmp_path: Path, sample_tree) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "phase3"
    shutil.copytree(sample_tree.root, src, symlinks=True)
    with Store.open(str(tmp_path / "store"), source=str(src), create=True) as s:
        first = points.ensure_first_point(s)
        # A crash in the middle of the walk: header not complete, some rows, one stale.
        first.complete = False
        s.transact(lambda t: t.put("points", points.head_key(1), first.header()))
        s.transact(
            lambda t: t.put(
                "points",
                points.row_key(1, b"stale"),
                points._row_value(b"stale", points.Row.of(src.stat())),
            )
        )
        with s.backend.read() as txn:
            assert points.current(txn) is None
        again = points.ensure_first_point(s)
        assert (again.id, again.complete, again.entries) == (1, True, len(entries(src)))
        with s.backend.read() as txn:
            assert {p for _k, p, _r in points.rows(txn, 1)} == entries(src).keys()
        # Deleted, a point is not reused: the next one gets a new id.
        points.delete_point(s, 1)
        assert points.ensure_first_point(s).id == 2


def test_a_path_too_long_for_a_key(tmp_path: Path) -> None:
    src = tmp_path / "phase3"
    deep = src
    for i in range(3):
        deep = deep / (chr(ord("a") + i) * 200)
    deep.mkdir(parents=True)
    (deep / "f.txt").write_text("far down")
    with Store.open(str(tmp_path / "store"), source=str(src), create=True) as s:
        points.ensure_first_point(s)
        path = os.fsencode((deep / "f.txt").relative_to(src))
        assert len(path) > points.LONG_PATH
        with s.backend.read() as txn:
            assert points.row_of(txn, 1, path) == points.Row.of((deep / "f.txt").lstat())
            assert path in {p for _k, p, _r in points.rows(txn, 1)}
        drift, checked = points.verify(s, s.tree, 1, deep=True)  # type: ignore[arg-type]
        assert (drift, checked) == ([], 5)
        (deep / "f.txt").write_text("changed")
        drift, _ = points.verify(s, s.tree, 1, deep=False)  # type: ignore[arg-type]
        assert [d.path for d in drift if d.path == path] == [path]


def test_expire_is_conservative(
    migrated: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = migrated
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file() and not p.is_symlink()}
    code, out = inproc(capsys, "points", "expire", store, "--yes")
    assert code == 0 and "no expired" in out  # within retention: nothing happens
    age(store, 31)
    r = ferry("points", "expire", store)
    assert r.returncode == 1 and "--yes" in r.stdout  # refuses without --yes
    # Drift in Phase 3: fsck --deep is not clean, so nothing at all is deleted.
    victim = sorted(before)[0]
    victim.write_bytes(b"changed")
    r = ferry("points", "expire", store, "--yes")
    assert r.returncode == 1 and "nothing deleted" in r.stderr, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    victim.write_bytes(before[victim])
    assert {p: p.read_bytes() for p in before} == before
    assert [p.id for p in points_of(store)] == [1]  # the point is kept too
    # Mounted (or any writer): refused, exit 8.
    with Store.open(str(store)):
        r = ferry("points", "expire", store, "--yes")
        assert r.returncode == 8 and "in use" in r.stderr


def test_expire_refuses_while_files_are_not_migrated(tmp_path: Path, sample_tree) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "phase3"
    shutil.copytree(sample_tree.root, src, symlinks=True)
    store = tmp_path / "store"
    with Store.open(str(store), source=str(src), create=True) as s:
        points.ensure_first_point(s)
        s.import_all()
        for ino in list(s.legacy_files_by_path())[:5]:
            s.migrate(ino)
    age(store, 40)
    r = ferry("points", "expire", store, "--yes")
    assert r.returncode == 1 and "not migrated" in r.stderr, r.stdout + r.stderr
    assert len([p for p in src.rglob("*") if p.is_file()]) == len(
        [p for p in sample_tree.root.rglob("*") if p.is_file()]
    )


def test_expire_deletes_only_what_the_store_holds(
    migrated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = migrated
    before = {
        "/" + str(p.relative_to(src)): p.read_bytes()
        for p in src.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    changed = sorted(p for p in before if p.endswith(".jsonl"))[0]
    with Store.open(str(store)) as s:  # changed through the store, as a mount would
        ino = 1
        for part in changed.strip("/").split("/"):
            ino = s.lookup(ino, os.fsencode(part)).ino
        s.write(ino, 0, b"new words")
    age(store, 31)
    code, out = inproc(capsys, "points", "expire", store, "--yes")
    assert code == 0, out
    left = {"/" + str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()}
    assert left == {changed}, "only the file whose Phase 3 version the store lacks stays"
    assert f"kept  {changed}" in out
    assert (src / changed.strip("/")).read_bytes() == before[changed]
    assert points_of(store) == []
    with Store.open(str(store), readonly=True) as s:
        assert points.released(s)
        for p, body in before.items():
            if p == changed:
                continue
            ino = 1
            for part in p.strip("/").split("/"):
                ino = s.lookup(ino, os.fsencode(part)).ino
            assert s.read(ino, 0, len(body) + 1) == body, p
    # Afterwards fsck says why it no longer compares with Phase 3, and is clean.
    code, out = inproc(capsys, "fsck", store, "--json")
    doc = json.loads(out)
    assert code == 0 and any("released" in n for n in doc["notes"])
    r = ferry("points", "verify", store)
    assert r.returncode == 8 and "released" in r.stderr


def test_a_vanished_phase3_tree_is_a_problem(
    migrated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = migrated
    shutil.rmtree(src)
    code, out = inproc(capsys, "fsck", store, "--json")
    kinds = [(p["kind"], p["repairable"]) for p in json.loads(out)["problems"]]
    assert code == 4 and kinds == [("phase3-missing", False)]
    r = ferry("points", "verify", store)
    assert r.returncode == 8 and "cannot be reached" in r.stderr


# -- points create: named points with their own retention ---------------------------------


def test_create_names_a_point_with_its_own_retention(
    migrated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _src, store = migrated
    code, out = inproc(
        capsys, "points", "create", store, "--name", "before go-live", "--keep-days", "90"
    )
    assert code == 0 and "rollback point 2 'before go-live'" in out, out
    code, out = inproc(capsys, "points", "list", store, "--json")
    listed = json.loads(out)
    assert [(p["id"], p["name"], p["retention_days"]) for p in listed] == [
        (1, "initial", 30),
        (2, "before go-live", 90),
    ]
    new = points_of(store)[1]
    assert new.complete and new.expires_ns == new.created_ns + 90 * points.DAY_NS
    assert (new.files, new.nbytes) == (points_of(store)[0].files, points_of(store)[0].nbytes)
    code, out = inproc(capsys, "points", "list", store)
    assert "before go-live" in out and "(90 days)" in out and "initial" in out
    # The new point is the one verify checks against, and the tree matches it.
    code, out = inproc(capsys, "points", "verify", store)
    assert code == 0 and "rollback point 2" in out


def test_a_longer_point_keeps_phase3_past_the_first_ones_expiry(
    migrated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = migrated
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert inproc(capsys, "points", "create", store, "--keep-days", "90")[0] == 0
    age(store, 40)
    code, out = inproc(capsys, "points", "expire", store, "--yes")
    assert code == 0 and "point 2 has not expired" in out, out
    assert [p.id for p in points_of(store)] == [2]
    assert sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink()) == files


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--keep-days", "0"), "--keep-days must be 1 to"),
        (("--keep-days", "-5"), "--keep-days must be 1 to"),
        (("--name", ""), "printable characters"),
        (("--name", "a\nb"), "printable characters"),
        (("--name", "x" * 101), "printable characters"),
        (("--name", "initial"), "named 'initial' exists"),
    ],
)
def test_create_refuses_bad_arguments_in_one_line(
    migrated: tuple[Path, Path], args: tuple[str, ...], message: str
) -> None:
    _src, store = migrated
    r = ferry("points", "create", store, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert [p.id for p in points_of(store)] == [1]


def test_create_refuses_a_drifted_tree(migrated: tuple[Path, Path]) -> None:
    src, store = migrated
    victim = sorted(p for p in src.rglob("*.jsonl"))[0]
    victim.write_bytes(victim.read_bytes() + b"\n")
    r = ferry("points", "create", store, "--name", "after drift")
    assert r.returncode == 1 and "drifted from rollback point 1" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert [p.id for p in points_of(store)] == [1]


def test_create_on_a_store_in_use_is_refused(migrated: tuple[Path, Path]) -> None:
    _src, store = migrated
    with Store.open(str(store)):  # as a mount holds it
        r = ferry("points", "create", store, "--name", "x")
    assert r.returncode == 8 and "in use" in r.stderr
    assert [p.id for p in points_of(store)] == [1]

"""`ferryfs search` against an oracle written here, whatever each file's state.

The oracle reads a plain tree (Phase 3, or the live mount, which is what the
app sees) with its own reading of the definition of text and word (README):
it does not call store/text.py. Every comparison runs the CLI as an operator
would, and compares sets of paths.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SampleTree
from ferryfs.store import index
from ferryfs.store.fsck import Checker
from ferryfs.store.store import Store
from ferryfs.tools import cli
from helpers.mount import mounted, wait_for

FERRYFS = [sys.executable, "-m", "ferryfs.tools.cli"]

# -- the oracle ---------------------------------------------------------------------------

_W = re.compile(r"\w+")


def _tokens(s: str) -> list[str]:
    return [m.group(0).lower() for m in _W.finditer(s)]


def _json_texts(doc: Any) -> list[str]:
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, tuple):  # an object, as its (key, value) pairs
        return [t for _, v in doc for t in _json_texts(v)]
    if isinstance(doc, list):
        return [t for v in doc for t in _json_texts(v)]
    return []


def _parse(s: str) -> Any:
    return json.loads(s, object_pairs_hook=tuple)


def oracle_words(name: bytes, data: bytes) -> list[str] | None:
    if 0 in data:
        return None
    try:
        s = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return None
    texts: list[str] = []
    if name.endswith(b".jsonl"):
        for line in s.split("\n"):
            try:
                texts += _json_texts(_parse(line))
            except ValueError:
                texts.append(line)
    elif name.endswith(b".json"):
        try:
            texts = _json_texts(_parse(s))
        except ValueError:
            texts = [s]
    else:
        texts = [s]
    return [w for t in texts for w in _tokens(t)]


def oracle_tree(root: Path) -> dict[bytes, list[str]]:
    """Relative path -> words of every regular file with text under `root`."""
    out: dict[bytes, list[str]] = {}
    base = os.fsencode(root)
    for d, _, files in os.walk(base):
        for f in files:
            p = os.path.join(d, f)
            if not stat.S_ISREG(os.lstat(p).st_mode):
                continue
            with open(p, "rb") as fh:
                ws = oracle_words(f, fh.read())
            if ws is not None:
                out[os.path.relpath(p, base)] = ws
    return out


def _has(ws: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return any(ws[i : i + n] == phrase for i in range(len(ws) - n + 1))


def oracle(tree: dict[bytes, list[str]], elements: list[list[str]], any_: bool) -> set[bytes]:
    test = any if any_ else all
    return {p for p, ws in tree.items() if test(_has(ws, e) for e in elements)}


def queries(tree: dict[bytes, list[str]], seed: int = 1) -> list[tuple[list[str], bool]]:
    """Fixed queries and some drawn from the tree's own words: (elements, any)."""
    rng = random.Random(seed)
    df: dict[str, int] = {}
    for ws in tree.values():
        for w in set(ws):
            df[w] = df.get(w, 0) + 1
    vocab = sorted(df)
    mid = [w for w in vocab if 2 <= df[w] <= max(2, len(tree) // 2)]
    rare = [w for w in vocab if df[w] == 1]
    qs: list[tuple[list[str], bool]] = [
        ([["user"]], False),
        ([["role"]], False),  # a key in every log, a value in few
        ([["zebrafish"]], False),
        ([["zebrafish"], ["quokka"]], False),
        ([["zebrafish"], ["quokka"]], True),
    ]
    for _ in range(3):
        qs.append(([[w] for w in rng.sample(mid, 2)], False))
    qs.append(([[w] for w in rng.sample(rare, 3)], True))
    path = sorted(tree)[rng.randrange(len(tree))]
    ws = tree[path] or ["x", "y"]
    i = rng.randrange(max(1, len(ws) - 2))
    qs.append(([ws[i : i + 2]], False))
    qs.append(([["zebrafish", "quokka"]], False))
    return qs


def args_of(elements: list[list[str]]) -> list[str]:
    return [e[0] if len(e) == 1 else '"' + " ".join(e) + '"' for e in elements]


# -- running the command ------------------------------------------------------------------


def search(target: Path, *args: str) -> tuple[set[bytes], dict[str, Any]]:
    """Paths printed, and the --json answer, of one query."""
    plain = subprocess.run([*FERRYFS, "search", str(target), *args], capture_output=True)
    assert plain.returncode == 0, plain.stderr.decode()
    js = subprocess.run([*FERRYFS, "search", str(target), *args, "--json"], capture_output=True)
    assert js.returncode == 0, js.stderr.decode()
    paths = set(plain.stdout.splitlines())
    doc = json.loads(js.stdout)
    assert {os.fsencode(h["path"]) for h in doc["hits"]} == paths
    return paths, doc


def check_exact(target: Path, plain_tree: Path, seed: int = 1) -> list[dict[str, Any]]:
    """Every query of `queries` answers what the oracle finds in `plain_tree`."""
    tree = oracle_tree(plain_tree)
    answers = []
    for elements, any_ in queries(tree, seed):
        args = args_of(elements) + (["--any"] if any_ else [])
        got, doc = search(target, *args)
        want = oracle(tree, elements, any_)
        assert got == want, (args, sorted(got ^ want)[:5])
        answers.append(doc)
    return answers


@pytest.fixture
def tree(sample_tree: SampleTree, tmp_path: Path) -> Path:
    """A private copy of the sample tree with the files a search must get right:
    malformed JSON, text that is not UTF-8, binary data with words in it."""
    src = tmp_path / "phase3"
    shutil.copytree(sample_tree.root, src, symlinks=True)
    odd = src / "odd"
    odd.mkdir()
    (odd / "broken.json").write_bytes(b'{"title": "zebrafish notes", "body": "quokka" ')
    (odd / "broken.jsonl").write_bytes(
        b'{"content": "zebrafish"}\n{"role": quokka habitat\n{"n": 42}\n'
    )
    (odd / "latin1.txt").write_bytes("zebrafish quokka café".encode("latin-1"))
    (odd / "blob.bin").write_bytes(b"zebrafish quokka \0\x01\x02 role")
    (odd / "keys.json").write_bytes(b'{"zebrafish": 1, "quokka": true, "x": "role"}')
    return src


def _migrate(src: Path, store: Path) -> None:
    assert cli.main(["migrate", str(src), "--store", str(store)]) == 0


# -- the tests ----------------------------------------------------------------------------


def test_unmigrated_store_is_searched_exactly(tree: Path, tmp_path: Path) -> None:
    """A store nothing was migrated into (every directory UNLISTED, no index)."""
    store = tmp_path / "store"
    Store.open(str(store), source=str(tree), create=True).close()
    docs = check_exact(store, tree)
    assert all(not d["index_used"] for d in docs)
    assert any(d["read_at_query_time"] > 0 for d in docs)


def test_migrated_store_answers_from_the_index(tree: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    _migrate(tree, store)
    docs = check_exact(store, tree)
    assert all(d["index_used"] and d["read_at_query_time"] == 0 for d in docs)
    st = json.loads(
        subprocess.run([*FERRYFS, "stats", str(store), "--json"], capture_output=True).stdout
    )
    assert st["files_indexed"] == st["files_total"] and st["index_pending"] == 0
    text_bytes = sum(p.stat().st_size for p in tree.rglob("*") if p.suffix in (".json", ".jsonl"))
    assert 0 < st["bytes_index"] < 0.1 * text_bytes
    # Malformed JSON is migrated byte-exact and searched as text.
    with Store.open(str(store), readonly=True) as s:
        ino = s.lookup(s.lookup(1, b"odd").ino, b"broken.jsonl").ino
        assert s.read(ino, 0, 1 << 20) == (tree / "odd" / "broken.jsonl").read_bytes()
    got, _ = search(store, "habitat")
    assert got == {b"odd/broken.jsonl"}
    assert search(store, "quokka", "--path", "odd/*")[0] == {
        b"odd/broken.json",
        b"odd/broken.jsonl",
    }


def test_a_file_read_at_query_time_scores_like_an_indexed_one(tree: Path, tmp_path: Path) -> None:
    """Best first holds across the index and query-time reads: the same bytes
    score about the same either way (BM25 with the index's idf)."""
    store = tmp_path / "store"
    _migrate(tree, store)
    _, before = search(store, "quokka", "habitat")
    first = before["hits"][0]
    with Store.open(str(store)) as s:
        ino = 1
        for part in os.fsencode(first["path"]).split(b"/"):
            ino = s.lookup(ino, part).ino
        data = s.read(ino, 0, 1 << 30)
        s.write(ino, 0, data)  # same bytes, a new version: read at query time now
    _, after = search(store, "quokka", "habitat")
    assert after["read_at_query_time"] == 1
    again = next(h for h in after["hits"] if h["path"] == first["path"])
    assert 0.5 < again["score"] / first["score"] < 2.0
    assert again["snippet"] and len(again["snippet"]) > 20


def test_live_mount_exact_after_append_create_rename_delete(tree: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    _migrate(tree, store)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(tree, mnt, store, args=("--idle-ms", "100")) as m:
        check_exact(mnt, mnt)
        logs = sorted((mnt / "sessions").rglob("*.jsonl"))
        # An append, a create, a rename (to another text kind), a delete.
        with open(logs[0], "ab") as f:
            f.write(b'{"role": "user", "content": "zebrafish quokka appended"}\n')
        check_exact(mnt, mnt, seed=2)
        (mnt / "new.txt").write_bytes(b"a fresh zebrafish, then a quokka\n")
        check_exact(mnt, mnt, seed=3)
        os.rename(logs[0], mnt / "renamed.txt")
        check_exact(mnt, mnt, seed=4)
        os.unlink(mnt / "renamed.txt")
        os.rename(logs[1], mnt / "sessions" / "moved.jsonl")
        check_exact(mnt, mnt, seed=5)

        def caught_up() -> bool:
            _, doc = search(mnt, "zebrafish")
            return bool(doc["index_used"] and doc["read_at_query_time"] == 0)

        wait_for(caught_up, 60, "the index to catch up")
        check_exact(mnt, mnt, seed=6)
        st = m.status()
        assert st["index_state"] in ("idle", "waiting", "running")
        assert st["index_files"] > 0
    # The index's files are private like the rest of the store (tantivy makes them
    # by the umask).
    loose = {
        e.name: oct(e.stat().st_mode)
        for e in os.scandir(store / "index")
        if e.stat(follow_symlinks=False).st_mode & 0o077
    }
    assert loose == {}
    # Unmounted, the store answers the same, and its index is sound (one document a file).
    check_exact(store, _plain_copy(store, tmp_path))
    with Store.open(str(store), readonly=True) as s:
        assert not Checker(s).run().problems


def _plain_copy(store: Path, tmp_path: Path) -> Path:
    """The store's files as a plain tree (read through the store, not the index)."""
    out = tmp_path / "plain"
    with Store.open(str(store), readonly=True) as s:
        stack = [(1, out)]
        while stack:
            d, p = stack.pop()
            p.mkdir(parents=True, exist_ok=True)
            for _, name, node in s.readdir(d):
                q = p / os.fsdecode(name)
                if node.is_dir:
                    stack.append((node.ino, q))
                elif node.is_reg:
                    q.write_bytes(s.read(node.ino, 0, node.size) if node.size else b"")
    return out


def test_live_mount_before_migration(tree: Path, tmp_path: Path) -> None:
    """A fresh in-place mount with no sweep: nothing listed, migrated or indexed."""
    plain = tmp_path / "plain"
    shutil.copytree(tree, plain, symlinks=True)
    with mounted(tree) as m:
        docs = check_exact(m.mnt, plain)
        assert all(not d["index_used"] for d in docs)
        # The store, named while it is mounted over its own Phase 3 tree: read
        # through the mount, since the tree underneath is shadowed.
        check_exact(m.store, plain, seed=2)


def test_kill9_mid_indexing_never_lies(tree: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    Store.open(str(store), source=str(tree), create=True).close()
    with Store.open(str(store)) as s:
        s.import_all()
    # The child says when each batch is committed, so the kills land at different
    # points of the build (in its start, and between or inside later batches)
    # however fast this machine indexes.
    code = (
        "import sys\nfrom ferryfs.store import index_writer\n"
        "from ferryfs.store.store import Store\n"
        "index_writer.BATCH_FILES = 3\n"
        "s = Store.open(sys.argv[1])\n"
        "ix = index_writer.Indexer(s)\n"
        "print('go', flush=True)\n"
        "ix.open()\n"
        "while ix.step():\n"
        "    print('step', flush=True)\n"
    )
    killed = 0
    for steps, delay in ((0, 0.05), (1, 0.0), (2, 0.01), (1, 0.02), (3, 0.0)):
        p = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE)
        try:
            assert p.stdout is not None
            for _ in range(steps + 1):
                p.stdout.readline()
            time.sleep(delay)  # not synchronisation: where the kill lands is the point
            p.send_signal(signal.SIGKILL)
        finally:
            rc = p.wait()
        killed += rc == -signal.SIGKILL
        check_exact(store, tree, seed=killed)
    assert killed >= 3
    (tmp_path / "mnt").mkdir()
    with mounted(tree, tmp_path / "mnt", store, args=("--idle-ms", "100")) as m:
        # Each poll reads unindexed files through the mount, and any request pre-empts
        # the indexer: a second between polls leaves it quiet periods (--idle-ms 100)
        # on a slow machine, where back-to-back polls starved it (a fresh chroot).
        done = lambda: search(m.mnt, "user")[1]["read_at_query_time"] == 0  # noqa: E731
        wait_for(done, 120, "indexing", interval=1.0)
        check_exact(m.mnt, m.mnt)


def test_fsck_finds_stale_and_missing_documents_and_repair_fixes(
    tree: Path, tmp_path: Path
) -> None:
    import tantivy

    store = tmp_path / "store"
    _migrate(tree, store)
    with Store.open(str(store), readonly=True) as s:
        assert not Checker(s).run().problems
        a = s.lookup(s.lookup(1, b"odd").ino, b"broken.jsonl").ino
        b = s.lookup(s.lookup(1, b"odd").ino, b"keys.json").ino
    # A document lost (b), one replaced by a stale one (a).
    ix = index.open_index(str(store))
    w = ix.writer(heap_size=15_000_000, num_threads=1)
    w.delete_documents_by_query(tantivy.Query.term_query(ix.schema, "ino", b))
    w.delete_documents_by_query(tantivy.Query.term_query(ix.schema, "ino", a))
    doc = tantivy.Document()
    doc.add_unsigned("ino", a)
    doc.add_unsigned("ver", 0)
    doc.add_unsigned("kind", 0)
    doc.add_text("text", "nothing")
    w.add_document(doc)
    w.commit()
    w.wait_merging_threads()
    del w, ix
    out = subprocess.run([*FERRYFS, "fsck", str(store), "--json"], capture_output=True)
    assert out.returncode == 4, out.stderr
    found = {(p["kind"], p["path"]) for p in json.loads(out.stdout)["problems"]}
    assert ("index-missing", "/odd/keys.json") in found
    assert ("index-stale", "/odd/broken.jsonl") in found or (
        "index-missing",
        "/odd/broken.jsonl",
    ) in found
    # The search trusts what the rows say, so it is wrong until repaired: found by fsck.
    out = subprocess.run([*FERRYFS, "fsck", str(store), "--repair", "--yes"], capture_output=True)
    assert out.returncode == 1, out.stdout + out.stderr
    out = subprocess.run([*FERRYFS, "fsck", str(store)], capture_output=True)
    assert out.returncode == 0, out.stdout
    check_exact(store, tree)


def test_fsck_finds_a_lost_mark(tree: Path, tmp_path: Path) -> None:
    """A file changed with no mark (a write path that forgot it) is reported."""
    store = tmp_path / "store"
    _migrate(tree, store)
    with Store.open(str(store)) as s:
        ino = s.lookup(s.lookup(1, b"odd").ino, b"keys.json").ino
        s.write(ino, 0, b'{"a": "wombat"}')
        s.transact(lambda txn: txn.delete("index", index.dirty_key(ino)))
    with Store.open(str(store), readonly=True) as s:
        kinds = {(p.kind, p.ino) for p in Checker(s).run().problems}
    assert ("index-stale", ino) in kinds


@pytest.mark.parametrize(
    "args",
    [
        ["STORE"],
        ["STORE", ""],
        ["STORE", "...", "--", "!!"],
        ["STORE", '""'],
        ["STORE", "word", "--bogus"],
        ["/nonexistent-ferryfs-target", "word"],
        ["/tmp", "word"],
        ["STORE", "word", "--since", "yesterday"],
        ["STORE", "word", "--limit", "-1"],
    ],
)
def test_bad_input_one_line_exit_2(
    args: list[str], tmp_path: Path, sample_tree: SampleTree
) -> None:
    store = tmp_path / "store"
    Store.open(str(store), source=str(sample_tree.root), create=True).close()
    before = sorted(os.listdir(store))
    argv = [str(store) if a == "STORE" else a for a in args]
    out = subprocess.run([*FERRYFS, "search", *argv], capture_output=True, text=True)
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(os.listdir(store)) == before

"""text.py's fast paths give exactly what the plain ones gave: `pieces` (msgspec's
decoder, with json's deciding whatever msgspec refuses or cannot be trusted
with) against `pieces_json` (json's decoder alone, as before), and
`index_text` (replacements per distinct character) against the words of
`words`, on random JSON documents and lines written to hit the corners:
escapes, surrogates (paired, lone, reversed), keys given twice, deep
nesting, numbers json takes and msgspec does not, control characters, a
BOM, invalid UTF-8, NUL bytes and huge strings."""

from __future__ import annotations

import json
import random

import pytest
from ferryfs.store import text

ALPHABET = (
    "abcXYZ019_ -.,:;!?'\"\\/\n\t\r"
    "éüÉÜßİıΣσςΑΩ ǅǈⅫ½٣漢字かな\u00a0\u2028\u2029\u0301\u0307—“”😀\U0001f600"
)
ESCAPES = [
    "\\n",
    "\\t",
    '\\"',
    "\\\\",
    "\\/",
    "\\b",
    "\\f",
    "\\r",
    "\\u00e9",
    "\\u00C9",
    "\\u0130",
    "\\u03a3",
    "\\ud83d\\ude00",  # a pair
    "\\ud800",  # lone high
    "\\udc00",  # lone low
    "\\ude00\\ud83d",  # reversed
    "\\u0000",
    "\\u001f",
    "\\u2028",
]
SCALARS = ["0", "-0", "1.5e3", "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "true", "null"]


def _raw(rng: random.Random) -> str:
    """Characters a literal may hold as they are, and the others escaped, except
    now and then: the document is then malformed, on purpose."""
    chars = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 12)))
    if rng.random() < 0.03:
        return chars
    return "".join(json.dumps(c)[1:-1] if c in '"\\' or ord(c) < 0x20 else c for c in chars)


def _string(rng: random.Random) -> str:
    parts = [
        _raw(rng) if rng.random() < 0.6 else rng.choice(ESCAPES) for _ in range(rng.randrange(0, 8))
    ]
    return '"' + "".join(parts) + '"'


def _value(rng: random.Random, depth: int) -> str:
    r = rng.random()
    if depth > 5 or r < 0.4:
        return _string(rng) if rng.random() < 0.7 else rng.choice(SCALARS)
    if r < 0.7:
        items = [_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
        return "[" + rng.choice([",", ", ", " ,\n"]).join(items) + "]"
    keys = [_string(rng) for _ in range(rng.randrange(0, 5))]
    if keys and rng.random() < 0.2:
        keys.append(keys[0])  # a key given twice
    members = [k + rng.choice([":", ": ", " : "]) + _value(rng, depth + 1) for k in keys]
    return "{" + ",".join(members) + "}"


def _document(rng: random.Random) -> bytes:
    doc = _value(rng, 0)
    r = rng.random()
    if r < 0.03:
        doc = "\ufeff" + doc  # a BOM: json refuses it
    elif r < 0.06:
        doc = doc + " x"  # trailing garbage
    elif r < 0.09:
        doc = doc[: len(doc) // 2]  # cut short
    elif r < 0.12:
        doc = " \r\n\t" + doc + "\r"
    data = doc.encode("utf-8", "surrogatepass")
    if rng.random() < 0.02:
        data += b"\xff"  # not UTF-8: no text at all
    if rng.random() < 0.02:
        data += b"\0"
    return data


def _reference_index_words(ps: list[str]) -> list[str]:
    out: list[str] = []
    for p in ps:
        out.extend(text.words(p))
    return sorted(out)


def _same(data: bytes, k: int) -> None:
    want = text.pieces_json(data, k)
    got = text.pieces(data, k)
    assert got == want, data[:300]
    if want is not None:
        assert sorted(text.index_text(got or []).split()) == _reference_index_words(want), data[
            :300
        ]


@pytest.mark.parametrize("seed", range(8))
def test_random_json_documents_give_the_same_pieces(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        _same(_document(rng), text.JSON)


@pytest.mark.parametrize("seed", range(8))
def test_random_jsonl_files_give_the_same_pieces(seed: int) -> None:
    rng = random.Random(1000 + seed)
    for _ in range(100):
        lines = [_document(rng) for _ in range(rng.randrange(0, 12))]
        if rng.random() < 0.3:
            lines.append(b"")  # a file ending in a newline
        _same(b"\n".join(lines), text.JSONL)


CORNERS = [
    b'{"a": "x", "a": "y"}',  # a key twice: both values
    b'{"a": "x", "a": 1}',  # a key twice, the last not a string
    b'{"a": {"b": "x"}, "a": {"b": "y", "c": "z"}}',
    b'["\\ud800"]',  # a lone surrogate: json takes it, msgspec does not
    b'["\\ud83d\\ude00", "\\ude00\\ud83d"]',
    b'["\\u00c9T\\u00c9", "\\u03a3\\u039f\\u03a3"]',  # capital sigma, by escape
    '["ΟΔΟΣ ΣΑΣ", "İstanbul ǅemal"]'.encode(),
    b'[NaN, Infinity, -Infinity, "w"]',
    b'[1e400, "w"]',
    b"[" + b"1" * 5000 + b', "w"]',  # more digits than int() takes: not JSON
    b"[" + b"1" * 4300 + b', "w"]',
    b'["a\x01b"]',  # a raw control character: not JSON
    b'"\\\\\\"" ',  # escaped backslash then escaped quote
    b'{"k\\\\": "v\\\\", "q\\"": "\\"x\\\\\\""}',
    b'\xef\xbb\xbf["bom"]',
    b'"just a string"',
    b"42",
    b"",
    b"   ",
    b'{"a": "b"} {"c": "d"}',
    b"[" * 99 + b'"deep"' + b"]" * 99,
    b"[" * 101 + b'"deeper"' + b"]" * 101,
    b"[" * 3000 + b'"too deep"' + b"]" * 3000,
    b'{"x": [' + b"[" * 150 + b'"mid"' + b"]" * 150 + b"]}",
    b'{"s": "' + b"word " * 200_000 + b'"}',  # a huge string
    b'["caf\xc3\xa9", "\xe2\x80\x94", "\xed\xa0\x80"]',  # the last is no UTF-8
    b'{"a": "b\x00"}',
]


@pytest.mark.parametrize("data", CORNERS, ids=range(len(CORNERS)))
def test_corner_documents_give_the_same_pieces(data: bytes) -> None:
    _same(data, text.JSON)
    _same(data + b"\n" + data + b"\n", text.JSONL)
    _same(data, text.PLAIN)


def test_index_text_of_many_distinct_characters_and_sigma() -> None:
    rng = random.Random(5)
    pool = [chr(c) for c in range(0x100, 0x3000) if not 0xD800 <= c < 0xE000]
    for n in (10, 200, 2000):
        s = "".join(rng.choice(pool + list(" abcABC_1")) for _ in range(n * 5))
        assert sorted(text.index_text([s, s.upper()]).split()) == _reference_index_words(
            [s, s.upper()]
        )
    for s in ["ΟΔΟΣ", "ΣΑΣ Σ", "aΣb", "ΣΣ", "É\u0301É", "İİ ı", "\ud800é\udc00"]:
        assert sorted(text.index_text([s]).split()) == _reference_index_words([s]), s

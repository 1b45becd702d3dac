"""What a file's text is and what a word is (store/text.py), case by case."""

from __future__ import annotations

import json

from ferryfs.store import text
from ferryfs.store.search import parse_query


def test_word_is_a_run_of_word_characters_lowercased() -> None:
    assert text.words("Hello, wörld! snake_case x2 — ÉTÉ 3.14") == [
        "hello",
        "wörld",
        "snake_case",
        "x2",
        "été",
        "3",
        "14",
    ]


def test_kind_follows_the_name() -> None:
    assert text.kind(b"a.jsonl") == text.JSONL
    assert text.kind(b"a.json") == text.JSON
    assert text.kind(b"a.json.txt") == text.PLAIN
    assert text.kind(b"jsonl") == text.PLAIN


def test_jsonl_string_values_only_not_keys_numbers_or_booleans() -> None:
    data = b"\n".join(
        [
            json.dumps({"role": "user", "content": "alpha beta", "n": 42, "ok": True}).encode(),
            b"this line is { not json",
            json.dumps(["gamma", {"tool": "grep_tool", "args": {"pattern": "delta"}}]).encode(),
            b"",
        ]
    )
    got = text.file_words(data, text.JSONL)
    assert got == [
        "user",
        "alpha",
        "beta",
        "this",
        "line",
        "is",
        "not",
        "json",
        "gamma",
        "grep_tool",
        "delta",
    ]
    assert "role" not in got and "content" not in got and "42" not in got and "true" not in got


def test_json_whole_document_and_duplicate_keys_keep_both_values() -> None:
    data = b'{"title": "first", "title": "second", "k": null}'
    assert text.file_words(data, text.JSON) == ["first", "second"]
    # Malformed JSON is plain text, keys and all.
    assert text.file_words(b'{"title": "x",', text.JSON) == ["title", "x"]


def test_binary_and_non_utf8_have_no_text() -> None:
    assert text.file_words(b"abc\0def", text.PLAIN) is None
    assert text.file_words(b"caf\xe9 latin-1", text.PLAIN) is None
    assert text.file_words(b'{"a": "b"}\0', text.JSON) is None
    assert text.file_words(b"", text.PLAIN) == []


def test_phrase_is_consecutive_words() -> None:
    ws = text.words("the connection was reset; connection reset by peer")
    assert text.has_phrase(ws, ["connection", "reset"])
    assert not text.has_phrase(ws, ["reset", "connection", "was"])
    assert text.has_phrase(ws, ["reset", "connection"])  # across the ';'


def test_query_parsing() -> None:
    q = parse_query(['"Connection  reset"', "Peer", "peer"])
    assert q.elements == [["connection", "reset"], ["peer"]]
    assert q.needs_check
    assert not parse_query(["a", "b"]).needs_check
    assert not parse_query(["x" * 2000]).indexable  # longer than an index term


def test_index_text_has_the_same_words() -> None:
    cases = [
        "Hello, World_2 x-y",
        "Été—x_1 ÀB naïve café",
        "a\u00a0b x\u2028y İstanbul ǅ Ⅻ ½ ٣ 漢字かな",
        "mixed ascii_and_ünïcode-words; CAPS\ttabs\nnewlines",
        "",
        "\ud800 lone surrogate",
    ]
    for s in cases:
        assert sorted(text.index_text([s, s[::-1]]).split()) == sorted(
            text.words(s) + text.words(s[::-1])
        ), s

"""What a file's text is, and what a word is: the one definition that indexing,
query-time reads and phrase checks all use.

- A file has text only if its bytes are valid UTF-8 and hold no NUL byte;
  anything else (images, PDFs, binary blobs) has none and is never a hit.
- `.jsonl`: each line that parses as JSON gives its string values (never its
  keys, numbers, booleans or nulls), in document order; a line that does not
  parse counts as plain text. `.json`: the same for the whole document.
- Any other such file: its whole text.
- A word is a maximal run of Unicode word characters (Python's `\\w`: letters,
  digits, underscore), lowercased with `str.lower()`. A file's words are the
  words of its text pieces, in order; a phrase matches consecutive words.

Which rule applies depends on the name a file is reached by (`kind`), so the
index records the kind it used alongside the content version.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

WORD = re.compile(r"\w+")

PLAIN, JSON, JSONL = 0, 1, 2

# Terms longer than this are stored cut to it: a query word longer than it is
# looked up by its prefix and checked against the file's words.
MAX_TERM = 64


def kind(name: bytes) -> int:
    """How a file reached by `name` is read (PLAIN, JSON or JSONL)."""
    if name.endswith(b".jsonl"):
        return JSONL
    if name.endswith(b".json"):
        return JSON
    return PLAIN


def words(s: str) -> list[str]:
    """The words of `s`, lowercased, in order."""
    return [w.lower() for w in WORD.findall(s)]


def term(word: str) -> str:
    """The index term of a (lowercased) word."""
    return word[:MAX_TERM]


def decode(data: bytes) -> str | None:
    """The text of `data`, or None if it is not text (NUL byte or invalid UTF-8)."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _values(pairs: list[tuple[str, Any]]) -> list[Any]:
    # Objects become the list of their values: keys are not text, and a key
    # given twice keeps both values (json.loads would keep only the last).
    return [v for _, v in pairs]


def _strings(doc: Any, out: list[str]) -> None:
    stack = [doc]
    while stack:  # iterative: a deeply nested document is no recursion error
        x = stack.pop()
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, list):
            stack.extend(reversed(x))


def _json_strings(s: str) -> list[str] | None:
    try:
        doc = json.loads(s, object_pairs_hook=_values)
    except (ValueError, RecursionError):
        return None
    out: list[str] = []
    _strings(doc, out)
    return out


def pieces(data: bytes, k: int) -> list[str] | None:
    """The text pieces of a file's bytes read as kind `k`; None if it has no text."""
    s = decode(data)
    if s is None:
        return None
    if k == JSON:
        got = _json_strings(s)
        return [s] if got is None else got
    if k == JSONL:
        out: list[str] = []
        for line in s.split("\n"):
            got = _json_strings(line)
            if got is None:
                out.append(line)
            else:
                out.extend(got)
        return out
    return [s]


def file_words(data: bytes, k: int) -> list[str] | None:
    """The words of a file, in order; None if it has no text."""
    ps = pieces(data, k)
    if ps is None:
        return None
    out: list[str] = []
    for p in ps:
        out.extend(words(p))
    return out


def has_phrase(seq: list[str], phrase: list[str]) -> bool:
    """Whether `phrase` occurs as consecutive words of `seq`."""
    n = len(phrase)
    if n == 0:
        return True
    first = phrase[0]
    return any(w == first and seq[i : i + n] == phrase for i, w in enumerate(seq))


def snippet(data: bytes, k: int, wanted: set[str], width: int = 120) -> str:
    """A short piece of the file's text around the first wanted word."""
    ps = pieces(data, k) or []
    for p in ps:
        for m in WORD.finditer(p):
            if m.group().lower() in wanted:
                lo = max(0, m.start() - width // 3)
                return " ".join(p[lo : lo + width].split())
    return " ".join(ps[0][:width].split()) if ps else ""


def iter_terms(ws: list[str]) -> Iterator[str]:
    for w in ws:
        yield term(w)

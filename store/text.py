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

import re
from typing import Any

WORD = re.compile(r"\w+")

PLAIN, JSON, JSONL = 0, 1, 2

# A word longer than this may be missing from the index (tantivy's terms are
# at most 64 KB): a query with such a word reads every file instead.
MAX_TERM = 1000

# For index_text: ASCII bytes that are not word characters become spaces and
# capitals become small letters; bytes of non-ASCII characters stay as they are.
_ASCII_WORDS = bytes(
    (c + 32 if 65 <= c <= 90 else c) if c >= 128 or chr(c).isalnum() or c == 95 else 32
    for c in range(256)
)
_HIGH = re.compile(rb"[\x80-\xff]+")


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


def index_text(ps: list[str]) -> str:
    """The words of text pieces, lowercased, separated by spaces, in no promised
    order: what the index's whitespace tokenizer takes. The same words as
    `words` (a test holds it to that), at C speed for ASCII text: a byte table
    does the ASCII words, and only the runs holding other characters go
    through the regular expression."""
    b = "\n".join(ps).encode("utf-8", "surrogatepass").translate(_ASCII_WORDS)
    if b.isascii():
        return b.decode("ascii")
    out: list[str] = []
    pos = 0
    for m in _HIGH.finditer(b):
        if m.start() < pos:
            continue  # inside a run already done
        start = b.rfind(b" ", 0, m.start()) + 1
        end = b.find(b" ", m.end())
        end = len(b) if end < 0 else end
        out.append(b[pos:start].decode("ascii"))
        out.append(" ".join(words(b[start:end].decode("utf-8", "surrogatepass"))))
        pos = end
    out.append(b[pos:].decode("ascii"))
    return "".join(out)


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
    import json  # here: a search that reads no file does not pay for importing it

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
    """About `width` characters of the file's text around the first wanted word."""
    s = " ".join(pieces(data, k) or [])
    for m in WORD.finditer(s):
        if m.group().lower() in wanted:
            lo = max(0, m.start() - width // 3)
            return " ".join(s[lo : lo + width].split())
    return " ".join(s[:width].split())

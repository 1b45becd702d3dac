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
from collections.abc import Callable
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
_ASCII = bytes(range(128))
# More distinct non-ASCII characters than this in one text (CJK punctuation,
# Greek or Cyrillic capitals by the dozen) and each run of words holding them
# is done alone instead: each replacement is a pass over the whole text.
_MAX_REPLACEMENTS = 128
# JSON nesting that msgspec's decoder answers for (see _json_strings_fast).
_FAST_DEPTH = 200
_LITERAL = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_DECODE: Callable[[bytes], Any] | None = None


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
    `words` (a test holds it to that), at C speed: a byte table does the ASCII
    words; the few distinct other characters a text holds are each replaced
    throughout by a space (not a word character) or by their small letters."""
    b = "\n".join(ps).encode("utf-8", "surrogatepass")
    high = b.translate(None, _ASCII)
    b = b.translate(_ASCII_WORDS)
    if not high:
        return b.decode("ascii")
    plan = _replacements(high)
    if plan is None:
        return _index_text_by_word(b)
    for old, new in plan:
        b = b.replace(old, new)
    return b.decode("utf-8", "surrogatepass")


def _replacements(high: bytes) -> list[tuple[bytes, bytes]] | None:
    """For the non-ASCII bytes of a text (`high`, in order), the replacements
    that make its words: each non-word character by a space first, then each
    capital by its small letters. Per character, as UTF-8 allows (no
    character's bytes occur inside another's). None where that is not
    `str.lower` of each word: a capital sigma (its small letter depends on
    the letters after it), a small form that would itself be changed by a
    later replacement, or too many distinct characters to pass over the
    text once each."""
    chars = set(high.decode("utf-8", "surrogatepass"))
    if len(chars) > _MAX_REPLACEMENTS or "\u03a3" in chars:
        return None
    spaces: list[tuple[bytes, bytes]] = []
    lowers: list[tuple[bytes, bytes]] = []
    capitals = set()
    for c in chars:
        if not WORD.match(c):
            spaces.append((c.encode("utf-8", "surrogatepass"), b" "))
        else:
            small = c.lower()
            if small != c:
                capitals.add(c)
                lowers.append((c.encode("utf-8"), small.encode("utf-8")))
    if any(ch in capitals for _, new in lowers for ch in new.decode("utf-8")):
        return None
    return spaces + lowers


def _index_text_by_word(b: bytes) -> str:
    """`index_text` of a text whose ASCII is already done (`b`): each run of
    words holding other characters goes through `words`."""
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


def _json_strings_fast(b: bytes) -> list[str] | None:
    """`_json_strings` of the text whose UTF-8 is `b` (valid, no NUL byte): the
    same list, from msgspec's decoder, several times faster than json's with
    a hook. msgspec is no more lenient than json (it refuses NaN, lone
    surrogates, numbers past a float and the like), so what it refuses, and
    what it cannot be trusted with, json decides as before: a key given twice
    (msgspec keeps the last value only: the string literals then outnumber
    the keys and strings found) and nesting deep enough for the recursion
    limit to matter."""
    decode_json = _msgspec_decode()
    try:
        doc = decode_json(b)
    except (ValueError, RecursionError, OverflowError):
        return _json_strings(b.decode("utf-8"))
    out: list[str] = []
    if b.count(b"[") + b.count(b"{") <= _FAST_DEPTH:
        members = _values_of(doc, out)
    else:
        got = _values_of_shallow(doc, out)
        if got is None:
            return _json_strings(b.decode("utf-8"))
        members = got
    if members + len(out) != _literals(b):
        return _json_strings(b.decode("utf-8"))
    return out


def _values_of(doc: Any, out: list[str]) -> int:
    """Append the strings of a decoded document to `out` (never its keys), in
    document order; the number of object members seen."""
    members = 0
    stack = [doc]
    while stack:
        x = stack.pop()
        if type(x) is str:
            out.append(x)
        elif type(x) is list:
            stack.extend(reversed(x))
        elif type(x) is dict:
            members += len(x)
            stack.extend(reversed(x.values()))
    return members


def _values_of_shallow(doc: Any, out: list[str]) -> int | None:
    """`_values_of`, or None if the document nests deeper than _FAST_DEPTH."""
    members = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        x, depth = stack.pop()
        if type(x) is str:
            out.append(x)
        elif type(x) is list or type(x) is dict:
            if depth >= _FAST_DEPTH:
                return None
            if type(x) is dict:
                members += len(x)
                x = x.values()
            stack.extend((v, depth + 1) for v in reversed(x))
    return members


def _literals(b: bytes) -> int:
    """The number of string literals (keys and values) in valid JSON `b`."""
    quotes = b.count(b'"')
    escaped = b.count(b'\\"')
    if not escaped:
        return quotes // 2
    if b"\\\\" not in b:
        # Outside a literal a JSON text has no backslash, and inside one each
        # starts an escape: with no escaped backslash, every backslash-quote
        # is an escaped quote.
        return (quotes - escaped) // 2
    return len(_LITERAL.findall(b))


def _msgspec_decode() -> Callable[[bytes], Any]:
    global _DECODE
    if _DECODE is None:
        import msgspec  # here: a search that reads no file does not pay for importing it

        _DECODE = msgspec.json.decode
    return _DECODE


def pieces(data: bytes, k: int) -> list[str] | None:
    """The text pieces of a file's bytes read as kind `k`; None if it has no text."""
    s = decode(data)
    if s is None:
        return None
    if k == JSON:
        got = _json_strings_fast(data)
        return [s] if got is None else got
    if k == JSONL:
        out: list[str] = []
        for line in data.split(b"\n"):
            got = _json_strings_fast(line) if line else None
            if got is None:
                out.append(line.decode("utf-8"))
            else:
                out.extend(got)
        return out
    return [s]


def pieces_json(data: bytes, k: int) -> list[str] | None:
    """`pieces` with json's decoder alone: what `pieces` was before msgspec's
    decoder, kept for the tests that hold the two to the same answers."""
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

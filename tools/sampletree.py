"""A realistic Phase 3 session tree, generated deterministically from a seed.

Owns the sample data the demo, the tests and the benchmark migrate. The tree
looks like what a chat/agent app leaves behind:

    DIR/index.json                                    the app's session list
    DIR/sessions/<yyyy>/<mm>/<session-id>.jsonl       agent logs, one event a line
    DIR/sessions/<yyyy>/<mm>/<session-id>.json        chat exports, one document
    DIR/attachments/<session-id>/[sub/dirs/]<name>    .png, .pdf, .bin blobs
    DIR/sessions/imported/...                         odd names and damaged files

and has the properties the store is built to exploit or survive:

- resumed sessions: a new .jsonl that starts with every byte of an earlier one
  and appends new turns, so content-defined chunking shares the prefix;
- attachments re-attached under other names (identical bytes), blobs that do not
  compress (random bytes behind real PNG/PDF/EBML headers), text that does;
- odd names: spaces, Unicode in NFC and NFD, a Latin-1 byte that is not UTF-8,
  a 255-byte name, a leading dash; a truncated .jsonl, an empty file, an empty
  directory;
- mtimes spread over the 90 days before now, so cold files exist.

The same seed gives the same bytes and names. File *contents* are dated relative
to REFERENCE_END, not to today, so they never change; only the mtimes follow the
clock (pass `now_ns` to pin those too). `attachment_mb` scales attachment sizes
only: the session text of a seed is the same whatever it is.
"""

from __future__ import annotations

import json
import os
import random
import time
import unicodedata
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import blake3

from . import sampletext

# The newest session of every tree ends before this moment; see the module docstring.
REFERENCE_END = datetime(2025, 3, 31, tzinfo=UTC)
SPAN = timedelta(days=90)

RESUME_RATE = 0.15  # share of sessions that resume an earlier one
JSON_EXPORT_RATE = 0.25  # share of fresh sessions saved as one .json document
LONG_SESSION_RATE = 0.03  # share of fresh sessions with hundreds of turns
DUPLICATE_RATE = 0.3  # share of attachments that re-attach an earlier blob
RESUME_MIN_PARENT = 128 * 1024  # prefer parents spanning a few 64 KiB chunks
ATTACHMENT_MEDIAN = 40_000  # bytes, lognormal
ATTACHMENT_CAP = 8_000_000  # before scaling by attachment_mb

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # WebM/Matroska: screen recordings


@dataclass(frozen=True)
class Summary:
    """What `generate` wrote. `files` and `bytes` count regular files only."""

    files: int
    bytes: int
    dirs: int
    sessions: int
    resumed: int
    attachments: int
    duplicate_attachments: int
    odd_names: int


@dataclass
class _Session:
    sid: str
    start: datetime
    end: datetime
    title: str
    ext: str  # "jsonl" or "json"
    data: bytes = b""
    relpath: str = ""
    parent: _Session | None = None  # the session this one resumes
    attachments: list[_Attachment] = field(default_factory=list)


@dataclass
class _Blob:
    seed: int
    kind: str  # "png", "pdf" or "bin"
    base_size: int
    size: int = 0


@dataclass
class _Attachment:
    relpath: str
    blob: _Blob
    when: datetime


# ---------------------------------------------------------------------------
# Formats


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class SessionLog:
    """Builds one session's turns; `events` for .jsonl, `messages` for .json."""

    def __init__(self, rng: random.Random, sid: str, start: datetime) -> None:
        self.rng = rng
        self.sid = sid
        self.t = start
        self.project = rng.choice(sampletext.PROJECTS)
        self.model = rng.choice(sampletext.MODELS)
        self.files = [
            f"src/{rng.choice(sampletext.IDENT_NOUNS)}/{sampletext.ident(rng)}.py"
            for _ in range(rng.randint(3, 12))
        ]
        self.parent: str | None = None

    def _tick(self, lo: float, hi: float) -> str:
        self.t += timedelta(seconds=self.rng.uniform(lo, hi))
        return _iso(self.t)

    def _event(self, **fields: Any) -> bytes:
        uid = random_uuid(self.rng)
        ev = {
            "uuid": uid,
            "parentUuid": self.parent,
            "sessionId": self.sid,
            "cwd": f"/home/dev/work/{self.project}",
            "version": "3.2.1",
            **fields,
        }
        self.parent = uid
        return _dumps(ev)

    def header(self) -> bytes:
        return _dumps(
            {"type": "session", "id": self.sid, "created": _iso(self.t), "model": self.model}
        )

    def turn(self) -> bytes:
        """One user message, the assistant's answer, and its tool calls, as JSONL."""
        rng = self.rng
        out = [
            self._event(
                type="message",
                role="user",
                timestamp=self._tick(20, 600),
                content=sampletext.prose(rng, int(rng.lognormvariate(3.3, 0.7))),
            )
        ]
        parts: list[dict[str, Any]] = [{"type": "text", "text": self.answer()}]
        calls = []
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
            tool, path = rng.choice(sampletext.TOOLS), rng.choice(self.files)
            call_id = "call_" + random_uuid(rng).replace("-", "")[:24]
            parts.append({"type": "tool_use", "id": call_id, "name": tool, "input": {"path": path}})
            calls.append((call_id, tool, path))
        out.append(
            self._event(
                type="message",
                role="assistant",
                timestamp=self._tick(2, 60),
                model=self.model,
                content=parts,
                usage={
                    "input_tokens": rng.randint(200, 90000),
                    "output_tokens": rng.randint(20, 4000),
                },
            )
        )
        for call_id, tool, path in calls:
            out.append(
                self._event(
                    type="tool_result",
                    tool_use_id=call_id,
                    timestamp=self._tick(0.1, 20),
                    content=sampletext.tool_output(rng, tool, path),
                    is_error=rng.random() < 0.05,
                )
            )
        return b"".join(out)

    def answer(self) -> str:
        rng = self.rng
        text = sampletext.prose(rng, int(rng.lognormvariate(4.0, 0.8)))
        if rng.random() < 0.35:
            text += (
                "\n\n"
                + sampletext.code_block(rng)
                + "\n\n"
                + sampletext.prose(rng, rng.randint(8, 40))
            )
        return text

    def jsonl(self, turns: int) -> bytes:
        """A whole agent log: a header line, then `turns` turns."""
        return self.header() + b"".join(self.turn() for _ in range(turns))

    def export(self, title: str, turns: int) -> bytes:
        """A whole chat export: one indented JSON document of `turns` exchanges."""
        created = _iso(self.t)
        messages = [m for _ in range(turns) for m in self.message()]
        doc = {
            "id": self.sid,
            "title": title,
            "created": created,
            "updated": _iso(self.t),
            "model": self.model,
            "messages": messages,
        }
        return json.dumps(doc, ensure_ascii=False, indent=2).encode() + b"\n"

    def message(self) -> list[dict[str, str]]:
        """One exchange for a .json chat export."""
        rng = self.rng
        q = sampletext.prose(rng, int(rng.lognormvariate(3.3, 0.7)))
        return [
            {"role": "user", "timestamp": self._tick(20, 600), "content": q},
            {"role": "assistant", "timestamp": self._tick(2, 60), "content": self.answer()},
        ]


def _turn_count(rng: random.Random) -> int:
    if rng.random() < LONG_SESSION_RATE:
        return rng.randint(150, 500)
    return max(1, int(rng.lognormvariate(2.0, 1.0)))


def random_title(rng: random.Random) -> str:
    return " ".join(rng.choices(sampletext.WORDS, k=rng.randint(2, 7))).capitalize()


# ---------------------------------------------------------------------------
# Blobs


def _blob_bytes(blob: _Blob) -> bytes:
    """Incompressible bytes behind the header of the blob's format."""
    key = blob.seed.to_bytes(8, "little")

    def noise(n: int) -> bytes:
        return blake3.blake3(key).digest(length=max(0, n))

    if blob.kind == "png":
        w, h = 640 + blob.seed % 1280, 480 + blob.seed % 720
        ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + b"\x08\x06\x00\x00\x00"

        def chunk(tag: bytes, body: bytes) -> bytes:
            crc = zlib.crc32(tag + body).to_bytes(4, "big")
            return len(body).to_bytes(4, "big") + tag + body + crc

        head = _PNG_SIGNATURE + chunk(b"IHDR", ihdr)
        tail = chunk(b"IEND", b"")
        return head + chunk(b"IDAT", noise(blob.size - len(head) - len(tail) - 12)) + tail
    if blob.kind == "pdf":
        head = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Filter /FlateDecode >>\nstream\n"
        tail = b"\nendstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
        return head + noise(blob.size - len(head) - len(tail)) + tail
    return _EBML_MAGIC + noise(blob.size - len(_EBML_MAGIC))


_ATTACHMENT_NAMES = {
    "png": ["Screenshot {d} at {t}.png", "image.png", "image ({n}).png", "diagram-{n}.png"],
    "pdf": ["invoice-{n}.pdf", "Report {d}.pdf", "spec.pdf", "scan_{n:04d}.pdf"],
    "bin": ["recording-{n}.bin", "screen capture {d}.bin", "audio.bin"],
}
_SUBDIRS = ["", "", "", "screenshots/", "exports/{m}/", "uploads/originals/"]


def _attachment_name(rng: random.Random, kind: str, when: datetime, taken: set[str]) -> str:
    sub = rng.choice(_SUBDIRS).format(m=when.strftime("%Y-%m"))
    while True:
        name = rng.choice(_ATTACHMENT_NAMES[kind]).format(
            d=when.strftime("%Y-%m-%d"), t=when.strftime("%H.%M.%S"), n=rng.randint(1, 9999)
        )
        if sub + name not in taken:
            taken.add(sub + name)
            return sub + name


# ---------------------------------------------------------------------------
# Plan, then write


def _plan_sessions(rng: random.Random, sessions: int) -> tuple[list[_Session], int]:
    span = SPAN.total_seconds() - 86400  # leave a day for the last session to end in
    starts = sorted(rng.uniform(0, span) for _ in range(sessions))
    plan: list[_Session] = []
    resumed = 0
    for off in starts:
        start = REFERENCE_END - SPAN + timedelta(seconds=off)
        sid = random_uuid(rng)
        s = _Session(sid, start, start, random_title(rng), "jsonl")
        log = SessionLog(rng, sid, start)
        parents = [p for p in plan if p.ext == "jsonl"]
        big = [p for p in parents if len(p.data) >= RESUME_MIN_PARENT]
        if len(parents) >= 2 and rng.random() < RESUME_RATE:
            parent = rng.choice(big or parents)
            marker = _dumps(
                {"type": "resume", "from": parent.sid, "session": sid, "timestamp": _iso(start)}
            )
            turns = b"".join(log.turn() for _ in range(rng.randint(1, 12)))
            s.data = parent.data + marker + turns
            s.title = parent.title + " (continued)"
            s.parent = parent
            resumed += 1
        elif rng.random() < JSON_EXPORT_RATE:
            s.ext = "json"
            s.data = log.export(s.title, _turn_count(rng))
        else:
            s.data = log.jsonl(_turn_count(rng))
        s.end = log.t
        s.relpath = f"sessions/{start:%Y}/{start:%m}/{sid}.{s.ext}"
        plan.append(s)
    return plan, resumed


def _plan_attachments(rng: random.Random, plan: list[_Session]) -> list[_Blob]:
    blobs: list[_Blob] = []
    for s in plan:  # in time order, so a parent's attachments are planned first
        taken: set[str] = set()
        if s.parent is not None and s.parent.attachments:
            # A resumed session carries one of its parent's attachments along.
            carried = rng.choice(s.parent.attachments)
            name = carried.relpath.split("/", 1)[1]
            taken.add(name)
            s.attachments.append(_Attachment(f"{s.sid}/{name}", carried.blob, s.start))
        n = 0 if rng.random() < 0.5 else min(6, 1 + int(rng.expovariate(0.7)))
        for _ in range(n):
            when = s.start + (s.end - s.start) * rng.random()
            if blobs and rng.random() < DUPLICATE_RATE:
                blob = rng.choice(blobs)
            else:
                kind = rng.choices(["png", "pdf", "bin"], weights=[5, 2, 3])[0]
                size = min(ATTACHMENT_CAP, int(rng.lognormvariate(10.6, 1.1)))
                blob = _Blob(rng.getrandbits(64), kind, max(256, size))
                blobs.append(blob)
            name = _attachment_name(rng, blob.kind, when, taken)
            s.attachments.append(_Attachment(f"{s.sid}/{name}", blob, when))
    return blobs


class TreeWriter:
    """Writes files by bytes path (names need not be UTF-8) and remembers mtimes."""

    def __init__(self, root: Path, now_ns: int) -> None:
        self.root = os.fsencode(root)
        self.now_ns = now_ns
        self.files = 0
        self.bytes = 0
        self.dir_mtimes: dict[bytes, int] = {}

    def mtime_ns(self, when: datetime) -> int:
        age = REFERENCE_END - when
        return self.now_ns - (age // timedelta(microseconds=1)) * 1000

    def mkdir(self, rel: bytes, when: datetime) -> bytes:
        path = os.path.join(self.root, rel)
        os.makedirs(path, exist_ok=True)
        self._touch_parents(rel + b"/x", self.mtime_ns(when))
        return path

    def write(self, rel: bytes | str, data: bytes, when: datetime) -> None:
        rel_b = os.fsencode(rel)
        path = os.path.join(self.root, rel_b)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        ns = self.mtime_ns(when)
        os.utime(path, ns=(ns, ns))
        self._touch_parents(rel_b, ns)
        self.files += 1
        self.bytes += len(data)

    def _touch_parents(self, rel: bytes, ns: int) -> None:
        parent = os.path.dirname(rel)
        while parent:
            if self.dir_mtimes.get(parent, -1) < ns:
                self.dir_mtimes[parent] = ns
            parent = os.path.dirname(parent)

    def finish(self) -> int:
        """Give every directory its newest entry's mtime; return how many there are."""
        for rel, ns in sorted(self.dir_mtimes.items(), key=lambda kv: -kv[0].count(b"/")):
            os.utime(os.path.join(self.root, rel), ns=(ns, ns))
        return len(self.dir_mtimes)


_Odd = tuple[bytes, bytes, datetime]  # relative path, content, time


def _odd_files(rng: random.Random) -> tuple[list[_Odd], list[_Odd]]:
    """Files whose names, then files whose bytes, a careless migrator gets wrong."""
    d = b"sessions/imported/"

    def small(name: bytes, title: str) -> _Odd:
        log = SessionLog(rng, random_uuid(rng), REFERENCE_END - timedelta(days=rng.uniform(2, 89)))
        turns = rng.randint(1, 4)
        data = log.export(title, turns) if name.endswith(b".json") else log.jsonl(turns)
        return d + name, data, log.t

    words = b"-".join(w.encode() for w in rng.choices(sampletext.WORDS[:200], k=60))
    long_name = (b"session-export-" + words).ljust(249, b"-")[:249] + b".jsonl"  # NAME_MAX
    names = [
        small(b"Old Client Export/Meeting notes (final) 2.json", "spaces"),
        small("résumé – 東京 ✓.jsonl".encode(), "unicode"),
        small(unicodedata.normalize("NFC", "café.json").encode(), "composed"),
        small(unicodedata.normalize("NFD", "café.json").encode(), "decomposed"),
        small(b"caf\xe9.json", "latin-1 name"),
        small(long_name, "255-byte name"),
        small(b"-draft.json", "leading dash"),
    ]
    rel, crashed, when = small(b"crashed-mid-write.jsonl", "crashed")
    cut = crashed.rstrip(b"\n").rfind(b"\n") + 40  # a few bytes into the last line
    contents = [(rel, crashed[:cut], when), (d + b"empty.json", b"", when)]
    return names, contents


def generate(
    root: Path,
    sessions: int,
    seed: int,
    attachment_mb: float | None = None,
    *,
    now_ns: int | None = None,
) -> Summary:
    """Write a sample Phase 3 tree into `root` (created if missing; should be empty).

    `sessions` session logs (about 190 KB each with their attachments, on
    average); `attachment_mb`, if given, rescales attachment sizes so that the
    attachment files (duplicates included) total about that many megabytes
    (10^6 bytes). Raises FileExistsError rather than overwrite a file.
    """
    if sessions < 0:
        raise ValueError("sessions must be >= 0")
    if attachment_mb is not None and attachment_mb < 0:
        raise ValueError("attachment_mb must be >= 0")
    rng = random.Random(seed)
    plan, resumed = _plan_sessions(rng, sessions)
    blobs = _plan_attachments(rng, plan)
    odd_names, odd_contents = _odd_files(rng)

    if attachment_mb is not None and attachment_mb > 0 and not blobs and plan:
        # Too few sessions drew an attachment: give the first one a screenshot.
        blob = _Blob(rng.getrandbits(64), "png", ATTACHMENT_MEDIAN)
        plan[0].attachments.append(_Attachment(f"{plan[0].sid}/image.png", blob, plan[0].start))
        blobs.append(blob)
    planned = sum(a.blob.base_size for s in plan for a in s.attachments)
    scale = 1.0 if attachment_mb is None or planned == 0 else attachment_mb * 1e6 / planned
    for b in blobs:
        b.size = max(64, round(b.base_size * scale))

    root.mkdir(parents=True, exist_ok=True)
    w = TreeWriter(root, now_ns if now_ns is not None else time.time_ns())
    attachments = duplicates = 0
    seen: set[int] = set()
    for s in plan:
        w.write(s.relpath, s.data, s.end)
        for a in s.attachments:
            duplicates += a.blob.seed in seen
            seen.add(a.blob.seed)
            w.write("attachments/" + a.relpath, _blob_bytes(a.blob), a.when)
            attachments += 1
    for rel, data, when in odd_names + odd_contents:
        w.write(rel, data, when)
    w.mkdir(b"sessions/imported/empty", REFERENCE_END - SPAN)
    index = {
        "version": 3,
        "sessions": [
            {"id": s.sid, "title": s.title, "path": s.relpath, "updated": _iso(s.end)} for s in plan
        ],
    }
    w.write("index.json", json.dumps(index, ensure_ascii=False, indent=1).encode(), REFERENCE_END)
    dirs = w.finish()
    return Summary(
        files=w.files,
        bytes=w.bytes,
        dirs=dirs,
        # Every odd file but empty.json is a session log.
        sessions=len(plan) + len(odd_names) + len(odd_contents) - 1,
        resumed=resumed,
        attachments=attachments,
        duplicate_attachments=duplicates,
        odd_names=len(odd_names),
    )

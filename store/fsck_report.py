"""What fsck found: a `Problem` per finding, the `Report` of one run, and the
kinds of problem that repair.py treats alike."""

from __future__ import annotations

from dataclasses import dataclass, field

REIMPORT = (
    "extent-gap",
    "extent-overlap",
    "extents-past-end",
    "content-differs",
    "malformed-extent",
    "extent-length-differs",
)
STRAY_EXTENTS = ("extents-of-missing-inode", "extents-of-non-file", "extents-of-legacy-file")
REFS = ("bad-refcount", "dangling-ref", "orphan-chunk")
PACKS = (
    "pack-accounting",
    "dead-pack",
    "chunks-overlap",
    "chunk-outside-pack",
    "chunk-header-differs",
)


@dataclass
class Problem:
    kind: str
    path: str  # "/a/b" of the file or directory it affects; "" for a chunk no file names
    detail: str
    repairable: bool
    ino: int | None = None
    digest: bytes | None = None
    key: bytes | None = field(default=None, repr=False)  # what a repair acts on
    origin: tuple[str, bytes] | None = field(default=None, repr=False)  # resumable item

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "kind": self.kind,
            "path": self.path,
            "detail": self.detail,
            "repairable": self.repairable,
        }
        if self.ino is not None:
            d["ino"] = self.ino
        if self.digest is not None:
            d["chunk"] = self.digest.hex()
        return d

    def ident(self) -> tuple[str, int | None, bytes | None, str]:
        return self.kind, self.ino, self.digest, self.path


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    partial: bool = False
    point: int | None = None
    chunks_checked: int = 0
    files_checked: int = 0
    rows_checked: int = 0
    file_bytes: int = 0  # logical bytes of files whose stored content was verified
    store_bytes: int = 0  # plain bytes decoded from the store and hashed
    phase3_bytes: int = 0  # bytes read from Phase 3 and hashed
    seconds: float = 0.0

"""Per-file migration errors: why a file is not migrated, for `status`, recorded
in the store's `errors` db and pruned once they no longer apply (the file was
deleted, rewritten or migrated since)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from . import namespace as ns
from .kv import Backend, Txn
from .records import U64, ino_key

T = TypeVar("T")


class Host(Protocol):
    """What these need of a store (migration.Host has more)."""

    backend: Backend
    readonly: bool
    failsafe: str | None

    def transact(self, fn: Callable[[Txn], T]) -> T: ...


def record_error(s: Host, ino: int, message: str) -> None:
    """Say in status why `ino` is not migrated; nothing if it was deleted meanwhile."""

    def op(txn: Txn) -> None:
        if txn.get("inodes", ino_key(ino)) is not None:
            ns.record_error(txn, ino, message)

    if not s.readonly and s.failsafe is None:
        s.transact(op)


def errors(s: Host) -> list[tuple[int, str]]:
    """The per-file errors that still apply (see `namespace.error_applies`)."""
    with s.backend.read() as txn:
        return [
            (ino, bytes(v).decode(errors="replace"))
            for k, v in txn.range("errors", b"")
            if ns.error_applies(txn, ino := U64.unpack(k)[0])
        ]


def prune_errors(s: Host) -> int:
    """Delete the error records that no longer apply; returns how many."""

    def stale(txn: Txn) -> list[bytes]:
        return [
            bytes(k)
            for k, _ in txn.range("errors", b"")
            if not ns.error_applies(txn, U64.unpack(k)[0])
        ]

    def op(txn: Txn) -> int:
        keys = stale(txn)
        for k in keys:
            txn.delete("errors", k)
        return len(keys)

    if s.readonly or s.failsafe is not None:
        return 0
    with s.backend.read() as txn:
        if not stale(txn):
            return 0
    return s.transact(op)

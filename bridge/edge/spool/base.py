"""The spool's shared vocabulary: constants, errors, the records it stores, small helpers and
the one transaction helper every write goes through."""

from __future__ import annotations

import builtins
import contextlib
import sqlite3
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from bridge.edge.spool.clock import SpoolClock
from bridge.edge.spool.fresh import FreshTail
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.kinds import ReadingClass

R = TypeVar("R")
SCHEMA_VERSION = 2
WAL_LIMIT = 4 << 20
HEADROOM = 2 * WAL_LIMIT  # free disk kept for deletes: a whole WAL and its checkpoint
_PAGE = 4096
_TABLES = {"meta", "readings", "dead_letters", "recent", "drops"}
TOMBSTONE = 99
PRIORITIES = {c: c.rank for c in ReadingClass}  # a row's prio column, by class
_CORRUPT = {"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CORRUPT_INDEX", "SQLITE_CORRUPT_SEQUENCE",
            "SQLITE_CORRUPT_VTAB", "SQLITE_IOERR_SHORT_READ"}


class _Corrupt(Exception):
    pass


@dataclass(frozen=True, slots=True)
class DeadLetter:
    source: str
    topic: str
    payload: bytes
    reason: str
    detail: str
    size: int | None = None  # the message's full length when ``payload`` is a prefix


@dataclass(frozen=True, slots=True)
class DeadRow:
    """A stored dead letter with its row id and its re-drive attempts (``bridge.edge.redrive``)."""

    id: int
    at_ns: int
    letter: DeadLetter
    attempts: int


@dataclass(frozen=True, slots=True)
class Pending:
    """One message to append: its envelope, complete but for the identity the spool gives it
    in the commit (``bridge.edge.envelope.seal``: this file's epoch and the next seq)."""

    envelope: pb.Envelope
    prio: int = 0


@dataclass(frozen=True, slots=True)
class Quarantine:
    moved_to: Path
    reason: str
    salvaged: int
    unreadable: int


def _text(s: str) -> str:
    """A str SQLite can bind: lone surrogates (from a broken topic) become escapes."""
    try:
        s.encode()
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode()
    return s


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "full" in str(exc)


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name in _CORRUPT or "malformed" in str(exc) or "not a database" in str(exc)


def _within(rid: int, held: list[tuple[int, int]]) -> bool:
    return any(a <= rid <= b for a, b in held)


def _is_tombstone(blob: bytes) -> bool:
    return pb.Envelope.FromString(blob).HasField("dropped")


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception (a failed COMMIT included) rolls the
    transaction back if it is still open, then propagates: nothing is half-written."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SpoolState:
    """The attributes every part of ``Spool`` shares, declared once for the type checker; the
    mixins (schema, recovery, headroom, bounds, send side, dead letters) inherit it and
    ``Spool.__init__`` sets them. Methods one part calls on another are declared here too."""

    path: Path
    site_id: str
    max_bytes: int
    max_age_s: float
    clock: SpoolClock
    reserve: Path
    reserve_bytes: int
    generation: int
    quarantines: list[Quarantine]
    sent_through: int
    dead_payload_bytes: int
    dead_max: int
    dead_max_bytes: int
    dead_bytes: int
    epoch: int
    next_seq: int
    readings: int
    bytes: int
    _db: sqlite3.Connection
    _next_rid: int
    _held: dict[int, int]
    fresh: FreshTail
    _tight: bool
    _dead: deque[tuple[int, int]]
    _drop_totals: Counter[str]
    _on_evict: Callable[[int], None]

    if TYPE_CHECKING:  # implemented by one part, called by another
        def save_clock(self) -> None: ...
        def _open(self) -> None: ...
        def _recover(self, reason: str) -> None: ...
        def _guard(self, fn: Callable[[], R]) -> R: ...
        def _ensure_reserve(self) -> None: ...
        def _keep_headroom(self, size: int) -> None: ...
        def _give_up_reserve(self) -> None: ...
        def _truncate_wal(self) -> None: ...
        def _holds(self) -> list[tuple[int, int]]: ...
        def _insert_dead(self, dead: Sequence[DeadLetter]
                         ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]: ...
        def _dead_committed(self, added: list[tuple[int, int]],
                            evicted: list[tuple[int, int]]) -> None: ...
        def _reload_dead(self) -> None: ...
        def _commit(self, pending: Sequence[Pending], dead: Sequence[DeadLetter],
                    state: Mapping[str, builtins.bytes | None],
                    ring: Sequence[tuple[str, int, int, builtins.bytes]] = (),
                    resolve: Callable[[sqlite3.Connection], None] | None = None
                    ) -> list[int]: ...

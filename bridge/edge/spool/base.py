"""The spool's shared vocabulary: constants, errors, the records it stores, small helpers and
the one transaction helper every write goes through. The state the parts share is
``bridge.edge.spool.file.SpoolFile``."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.kinds import ReadingClass

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


@dataclass(frozen=True, slots=True)
class SpoolFigures:
    """One instant of the spool's figures, as /status, the metrics, the readiness check and
    the sender see them from the event loop: the spool publishes a new one after every
    operation, on its own thread (``Spool.published``)."""

    path: Path
    epoch: int
    generation: int  # bumped when a corrupt file is replaced: positions (rids) are void
    last_rid: int    # the newest row's rid (0 when none was ever written to this file)
    readings: int
    bytes: int
    dead_bytes: int
    max_bytes: int
    next_seq: int
    quarantines: tuple[Quarantine, ...]
    reads_memory: int = 0  # batches the sender took from the fresh tail (the facade's count)
    reads_file: int = 0    # ... and from the file (the backlog)

    @property
    def fill(self) -> float:
        return (self.bytes + self.dead_bytes) / self.max_bytes

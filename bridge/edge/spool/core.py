"""``Spool``: the durable bounded queue between the intake and the uplink (format, invariants
and recovery: the package docstring). The append path lives here (the seal that gives each
envelope its identity, and the redelivery ring's rows the intake hands in); each other concern
is a mixin in its own module."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import orjson

from bridge.edge.envelope import seal
from bridge.edge.spool.base import (
    DeadLetter,
    Pending,
    Quarantine,
    _Corrupt,
    _is_full,
    transaction,
)
from bridge.edge.spool.bounds import Bounds
from bridge.edge.spool.clock import SpoolClock
from bridge.edge.spool.deadletters import DeadLetters
from bridge.edge.spool.fresh import FreshTail
from bridge.edge.spool.headroom import Headroom
from bridge.edge.spool.recovery import Recovery
from bridge.edge.spool.schema import Schema
from bridge.edge.spool.send import SendSide
from bridge.shared import defaults as D
from bridge.shared.errors import SpoolError, SpoolFull
from bridge.shared.files import OwnerLock

R = TypeVar("R")


class Spool(Schema, Recovery, Headroom, Bounds, SendSide, DeadLetters):
    """One site's spool file; every method on one thread (``AsyncSpool`` provides it)."""

    def __init__(self, *, path: Path, site_id: str, max_bytes: int,
                 reserve_bytes: int = 0,
                 max_age_s: float = D.MAX_AGE_S, clock: SpoolClock | None = None,
                 dead_letter_payload_bytes: int = D.DEAD_LETTER_PAYLOAD_BYTES,
                 dead_letters_max: int = D.DEAD_LETTERS_MAX,
                 dead_letters_max_bytes: int | None = None,
                 on_evict: Callable[[int], None] | None = None) -> None:
        self.path = path
        self.dead_payload_bytes = dead_letter_payload_bytes
        self.dead_max = dead_letters_max
        cap = max_bytes // 10
        self.dead_max_bytes = cap if dead_letters_max_bytes is None else \
            min(dead_letters_max_bytes, cap)
        self._on_evict = on_evict or (lambda n: None)
        self.max_age_s = max_age_s
        self.clock = clock or SpoolClock()
        self.sent_through = 0  # rids at or below were handed to the uplink: never dropped
        # Batches in flight, first rid -> last rid: never dropped either, whichever lane
        # (live or backlog) sent them. Written by ``read_after(hold=True)`` on the spool
        # thread, removed by ``unhold`` when the batch is done.
        self._held: dict[int, int] = {}
        self.fresh = FreshTail()  # the newest rows, for the sender (bridge.edge.spool.fresh)
        self.site_id = site_id
        self.max_bytes = max_bytes
        self.reserve_bytes = reserve_bytes
        self.reserve = path.with_name(path.name + ".reserve")
        self._tight = False  # the disk was found full: checkpoint after every release
        self.generation = 0
        self.quarantines: list[Quarantine] = []
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"{path.parent}: cannot create the spool directory: {exc}") \
                from exc
        # One owner before anything is read: two agents on one file would number readings
        # from the same next_seq, and the ingest would answer the second copy DUPLICATE.
        self._owner = OwnerLock(path, what=f"spool {path}")
        self._owner.acquire()
        try:
            try:
                self._open()
            except _Corrupt as exc:
                self._recover(str(exc))
            self._ensure_reserve()
        except BaseException:
            self._owner.release()
            raise

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.save_clock()
        self._db.close()
        self._owner.release()

    def save_clock(self) -> None:
        """Persist the spool clock (also done by every commit), so ages survive a restart."""
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('clock', ?)",
                         (orjson.dumps(self.clock.snapshot()).decode(),))

    def commit(self, pending: Sequence[Pending], dead: Sequence[DeadLetter] = (),
               state: Mapping[str, bytes | None] | None = None,
               ring: Sequence[tuple[str, int, int, bytes]] = ()) -> list[int]:
        """Append envelopes and dead letters in one durable transaction; returns their rids.

        ``state`` maps ``<source>/<key>`` to a decoder's new state (None deletes it); ``ring``
        is the redelivery ring's rows for these messages (``RedeliveryRing.rows_for``).
        """
        return self._guard(lambda: self._commit(pending, dead, state or {}, ring))

    def load_ring(self, source: str) -> list[tuple[int, bytes]]:
        """A source's redelivery ring as committed: (n, digest) rows."""
        return [(int(n), bytes(d)) for n, d in self._guard(lambda: self._db.execute(
            "SELECT n, digest FROM recent WHERE source=?", (source,)).fetchall())]

    def load_state(self, source: str) -> dict[str, bytes]:
        """A source's decoder state, by key (without the ``state/<source>/`` prefix)."""
        prefix = f"state/{source}/"
        rows = self._guard(lambda: self._db.execute(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
            (len(prefix), prefix)).fetchall())
        return {str(k)[len(prefix):]: bytes(v) for k, v in rows}

    def _commit(self, pending: Sequence[Pending], dead: Sequence[DeadLetter],
                state: Mapping[str, bytes | None],
                ring: Sequence[tuple[str, int, int, bytes]] = (),
                resolve: Callable[[sqlite3.Connection], None] | None = None) -> list[int]:
        """``resolve`` runs inside the transaction, after the appends (dead letters
        re-driven: ``bridge.edge.spool.deadletters``)."""
        seq, rid = self.next_seq, self._next_rid
        at = self.clock.now()
        rows: list[tuple[int, bytes, int, float]] = []
        size = 0
        for p in pending:
            blob = seal(p.envelope, self.epoch, seq)
            rows.append((rid, blob, p.prio, at))
            size += len(blob)
            seq += 1
            rid += 1
        if rows and self.bytes + self.dead_bytes + size > self.max_bytes:
            raise SpoolFull(f"{self.bytes + self.dead_bytes + size} bytes (dead letters "
                            f"included) would exceed max_bytes={self.max_bytes}")
        if rows:
            self._keep_headroom(size)
        db = self._db
        try:
            with transaction(db):
                if rows:
                    db.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)", rows)
                dead_rows = self._insert_dead(dead) if dead else None
                if ring:
                    db.executemany("INSERT OR REPLACE INTO recent VALUES (?, ?, ?, ?)", ring)
                for key, value in state.items():
                    if value is None:
                        db.execute("DELETE FROM meta WHERE key=?", (f"state/{key}",))
                    else:
                        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                   (f"state/{key}", value))
                db.executemany("UPDATE meta SET value=? WHERE key=?", [
                    (seq, "next_seq"), (self.readings + len(rows), "readings"),
                    (self.bytes + size, "bytes")])
                if resolve is not None:
                    resolve(db)
                self.save_clock()
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                self._tight = True
                self._truncate_wal()
                raise SpoolFull(str(exc)) from exc
            raise
        if dead_rows is not None:
            self._dead_committed(*dead_rows)
        with self.fresh.lock:
            self.fresh.add([(r, b) for r, b, _, _ in rows])
        self.next_seq = seq
        self._next_rid = rid
        self.readings += len(rows)
        self.bytes += size
        return [r for r, _, _, _ in rows]

    @property
    def last_rid(self) -> int:
        """The rid of the newest row (0 when none was ever written to this file)."""
        return self._next_rid - 1


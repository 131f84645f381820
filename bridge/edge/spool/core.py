"""``Spool``: the durable bounded queue between the intake and the uplink (format, invariants
and recovery: the package docstring).

The spool owns one ``SpoolFile`` (the connection and the figures of its meta row) and the
parts that work on it, each an object it holds: ``Headroom``, ``DeadLetters``, ``Holds`` and
``SendSide``, ``Bounds``, ``Recovery``. The append path is here (the seal that gives each
envelope its identity, the redelivery ring's rows the intake hands in). A call from one part
to another is made here, in the open: a part is handed the parts it uses when it is built
and never calls back into the spool. Every operation runs through ``_op``, which turns
corruption into a quarantine (Recovery) and publishes the figures the event loop reads.
"""

from __future__ import annotations

import builtins
import contextlib
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from bridge.edge.envelope import seal
from bridge.edge.spool.base import (
    DeadLetter,
    DeadRow,
    Pending,
    Quarantine,
    SpoolFigures,
    _Corrupt,
    _is_corruption,
    _is_full,
    transaction,
)
from bridge.edge.spool.bounds import Bounds
from bridge.edge.spool.clock import SpoolClock
from bridge.edge.spool.deadletters import DeadLetters
from bridge.edge.spool.file import SpoolFile
from bridge.edge.spool.fresh import FreshTail
from bridge.edge.spool.headroom import Headroom
from bridge.edge.spool.recovery import Recovery
from bridge.edge.spool.schema import open_file
from bridge.edge.spool.send import Holds, SendSide
from bridge.shared import defaults as D
from bridge.shared.errors import SpoolError, SpoolFull, SpoolReset
from bridge.shared.files import OwnerLock

R = TypeVar("R")


class Spool:
    """One site's spool file; every method on one thread (``AsyncSpool`` provides it), but
    ``take_fresh`` and ``unhold`` (their own locks) and ``published`` (swapped whole)."""

    published: SpoolFigures  # the figures after the latest operation, for other threads

    def __init__(self, *, path: Path, site_id: str, max_bytes: int,
                 reserve_bytes: int = 0,
                 max_age_s: float = D.MAX_AGE_S, clock: SpoolClock | None = None,
                 dead_letter_payload_bytes: int = D.DEAD_LETTER_PAYLOAD_BYTES,
                 dead_letters_max: int = D.DEAD_LETTERS_MAX,
                 dead_letters_max_bytes: int | None = None,
                 on_evict: Callable[[int], None] | None = None) -> None:
        self.file = f = SpoolFile(path=path, site_id=site_id, max_bytes=max_bytes,
                                  max_age_s=max_age_s, clock=clock or SpoolClock())
        cap = max_bytes // 10  # dead letters never take more than a tenth (invariant 5)
        self.dead = DeadLetters(
            file=f, payload_bytes=dead_letter_payload_bytes, max_count=dead_letters_max,
            max_bytes=cap if dead_letters_max_bytes is None else min(dead_letters_max_bytes,
                                                                     cap),
            on_evict=on_evict)
        self.headroom = Headroom(file=f, reserve_bytes=reserve_bytes)
        self.holds = Holds()
        self.send = SendSide(file=f, holds=self.holds, dead=self.dead)
        self.bounds = Bounds(file=f, holds=self.holds)
        self.recovery = Recovery(file=f, reopen=self._open)
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
                self._replace(str(exc))
            self.headroom.ensure_reserve()
        except BaseException:
            self._owner.release()
            raise
        self.published = self._figures()

    # -- live figures, for the spool's own thread (tests, the offline tools) ---------------
    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def max_bytes(self) -> int:
        return self.file.max_bytes

    @property
    def epoch(self) -> int:
        return self.file.epoch

    @property
    def next_seq(self) -> int:
        return self.file.next_seq

    @property
    def readings(self) -> int:
        return self.file.readings

    @property
    def bytes(self) -> int:
        return self.file.bytes

    @property
    def generation(self) -> int:
        return self.file.generation

    @property
    def fresh(self) -> FreshTail:
        return self.file.fresh

    @property
    def dead_bytes(self) -> int:
        return self.dead.bytes

    @property
    def quarantines(self) -> list[Quarantine]:
        return self.recovery.quarantines

    def _figures(self) -> SpoolFigures:
        f = self.file
        return SpoolFigures(path=f.path, epoch=f.epoch, generation=f.generation,
                            last_rid=f.last_rid, readings=f.readings, bytes=f.bytes,
                            dead_bytes=self.dead.bytes, max_bytes=f.max_bytes,
                            next_seq=f.next_seq,
                            quarantines=tuple(self.recovery.quarantines))

    def _open(self) -> None:
        open_file(self.file, load=(self.dead.reload, self.bounds.load_totals))

    def _replace(self, reason: str) -> None:
        self.recovery.replace(reason)
        self.holds.clear()  # the old file's rids mean nothing now

    def _op(self, fn: Callable[[], R]) -> R:
        """Run one operation on the file: corruption replaces the file and raises
        SpoolReset; either way, the figures after it are published (one reference, swapped
        whole: a reader on another thread sees the old set or the new one)."""
        try:
            return fn()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            with contextlib.suppress(sqlite3.Error):
                self.file.db.close()
            self._replace(f"{type(exc).__name__}: {exc}")
            raise SpoolReset(str(exc)) from exc
        finally:
            self.published = self._figures()

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.file.save_clock()
        self.file.db.close()
        self._owner.release()

    # -- the append path ---------------------------------------------------------------------
    def commit(self, pending: Sequence[Pending], dead: Sequence[DeadLetter] = (),
               state: Mapping[str, builtins.bytes | None] | None = None,
               ring: Sequence[tuple[str, int, int, builtins.bytes]] = ()) -> list[int]:
        """Append envelopes and dead letters in one durable transaction; returns their rids.

        ``state`` maps ``<source>/<key>`` to a decoder's new state (None deletes it); ``ring``
        is the redelivery ring's rows for these messages (``RedeliveryRing.rows_for``).
        """
        return self._op(lambda: self._commit(pending, dead, state or {}, ring))

    def load_ring(self, source: str) -> list[tuple[int, builtins.bytes]]:
        """A source's redelivery ring as committed: (n, digest) rows."""
        return [(int(n), bytes(d)) for n, d in self._op(lambda: self.file.db.execute(
            "SELECT n, digest FROM recent WHERE source=?", (source,)).fetchall())]

    def load_state(self, source: str) -> dict[str, builtins.bytes]:
        """A source's decoder state, by key (without the ``state/<source>/`` prefix)."""
        prefix = f"state/{source}/"
        rows = self._op(lambda: self.file.db.execute(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
            (len(prefix), prefix)).fetchall())
        return {str(k)[len(prefix):]: bytes(v) for k, v in rows}

    def _commit(self, pending: Sequence[Pending], dead: Sequence[DeadLetter],
                state: Mapping[str, builtins.bytes | None],
                ring: Sequence[tuple[str, int, int, builtins.bytes]] = (),
                resolve: Callable[[sqlite3.Connection], None] | None = None) -> list[int]:
        """``resolve`` runs inside the transaction, after the appends (dead letters
        re-driven: ``DeadLetters.resolve_replay``)."""
        f = self.file
        seq, rid = f.next_seq, f.next_rid
        at = f.clock.now()
        rows: list[tuple[int, builtins.bytes, int, float]] = []
        size = 0
        for p in pending:
            blob = seal(p.envelope, f.epoch, seq)
            rows.append((rid, blob, p.prio, at))
            size += len(blob)
            seq += 1
            rid += 1
        if rows and f.bytes + self.dead.bytes + size > f.max_bytes:
            raise SpoolFull(f"{f.bytes + self.dead.bytes + size} bytes (dead letters "
                            f"included) would exceed max_bytes={f.max_bytes}")
        if rows:
            self.headroom.keep(size)
        db = f.db
        try:
            with transaction(db):
                if rows:
                    db.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)", rows)
                dead_rows = self.dead.insert(dead) if dead else None
                if ring:
                    db.executemany("INSERT OR REPLACE INTO recent VALUES (?, ?, ?, ?)", ring)
                for key, value in state.items():
                    if value is None:
                        db.execute("DELETE FROM meta WHERE key=?", (f"state/{key}",))
                    else:
                        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                   (f"state/{key}", value))
                db.executemany("UPDATE meta SET value=? WHERE key=?", [
                    (seq, "next_seq"), (f.readings + len(rows), "readings"),
                    (f.bytes + size, "bytes")])
                if resolve is not None:
                    resolve(db)
                f.save_clock()
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                f.tight = True
                f.truncate_wal()
                raise SpoolFull(str(exc)) from exc
            raise
        if dead_rows is not None:
            self.dead.committed(*dead_rows)
        with f.fresh.lock:
            f.fresh.add([(r, b) for r, b, _, _ in rows])
        f.next_seq = seq
        f.next_rid = rid
        f.readings += len(rows)
        f.bytes += size
        return [r for r, _, _, _ in rows]

    # -- the bounds ----------------------------------------------------------------------------
    def expire(self, *, limit: int = 10_000) -> int:
        """Drop readings older than ``max_age_s`` (spool clock) as ``ttl``; returns how many."""
        try:
            self._op(self.file.save_clock)
        except sqlite3.OperationalError as exc:
            if not _is_full(exc):
                raise  # a full disk only delays the save: every commit saves it too
        return self._op(lambda: self.bounds.expire(limit=limit))

    def make_room(self, need_bytes: int) -> int:
        """``drop_oldest``: drop the lowest class first, oldest first, to free ``need_bytes``."""
        return self._op(lambda: self.bounds.make_room(need_bytes))

    def commit_dropped(self, pending: Sequence[Pending], reason: str) -> int:
        """``reject_new``: number the messages but keep only tombstones; returns how many."""
        return self._op(lambda: self.bounds.commit_dropped(pending, reason))

    def drop_totals(self) -> dict[str, int]:
        """Readings dropped by reason over this file's life (kept in memory, loaded at open)."""
        return self.bounds.drop_totals()

    def oldest_age_s(self) -> float | None:
        return self._op(self.bounds.oldest_age_s)

    # -- the send side ------------------------------------------------------------------------
    def take_fresh(self, rid: int, *, max_rows: int, max_bytes: int, hold: bool = False,
                   through: int | None = None) -> list[tuple[int, builtins.bytes]] | None:
        """``read_after`` from the fresh tail on the calling thread, or None (read the file)."""
        return self.send.take_fresh(rid, max_rows=max_rows, max_bytes=max_bytes, hold=hold,
                                    through=through)

    def read_after(self, rid: int, *, max_rows: int, max_bytes: int, hold: bool = False,
                   through: int | None = None) -> list[tuple[int, builtins.bytes]]:
        """The next rows with rid > ``rid`` (and at most ``through``), in order, at most
        ``max_bytes`` (at least one).

        ``hold``: the rows go into a batch; no bound drops them until ``unhold``.
        """
        return self._op(lambda: self.send.read_after(rid, max_rows=max_rows,
                                                     max_bytes=max_bytes, hold=hold,
                                                     through=through))

    def unhold(self, first: int) -> None:
        """The batch starting at rid ``first`` is done (acked or abandoned at shutdown)."""
        self.holds.unhold(first)

    def release(self, first: int, last: int, rejected: Sequence[tuple[int, str]] = (), *,
                generation: int | None = None) -> None:
        """Forget rids ``first..last`` (acked); rejected ones are copied to dead letters first.

        ``generation`` is the file generation the rids were read from: after a quarantine the
        old rids mean nothing and the call does nothing. On a full disk the WAL is truncated,
        then the reserve given up, before the delete is retried (see Headroom).
        """
        if generation is not None and generation != self.file.generation:
            return
        remedies = [self.file.truncate_wal, self.headroom.give_up_reserve]
        while True:
            try:
                self._op(lambda: self.send.release(first, last, rejected))
                break
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                self.file.tight = True
                if not remedies:
                    raise SpoolFull(f"cannot delete acknowledged rows: {exc}") from exc
                remedies.pop(0)()
        self.headroom.after_release()

    # -- dead letters ---------------------------------------------------------------------------
    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self._op(lambda: self.dead.newest(limit))

    def dead_rows(self, *, ids: Sequence[int] = (), reasons: Sequence[str] = (),
                  before_ns: int | None = None) -> list[DeadRow]:
        """Stored dead letters, oldest first, each selector narrowing the set (none: all)."""
        return self._op(lambda: self.dead.rows(ids=ids, reasons=reasons, before_ns=before_ns))

    def replay_dead(self, pending: Sequence[Pending], replayed: Sequence[int],
                    failed: Sequence[tuple[int, str, str]], now_ns: int) -> list[int]:
        """One durable transaction: append ``pending`` (fresh seqs, in order), delete the
        ``replayed`` rows, and record an attempt on each ``failed`` (id, reason, detail)."""
        resolve = self.dead.resolve_replay(replayed, failed, now_ns)
        rids = self._op(lambda: self._commit(pending, (), {}, resolve=resolve))
        self._op(self.dead.reload)
        return rids

    def purge_dead(self, ids: Sequence[int]) -> int:
        """Delete these dead letters (one durable transaction); how many were deleted."""
        return self._op(lambda: self.dead.purge(ids))

    def dead_counter(self, key: str) -> int:
        """``dead_replayed`` or ``dead_purged``: dead letters re-driven or purged, ever."""
        return self.dead.counter(key)

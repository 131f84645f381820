"""The send side: batches after a position, the rows the uplink holds, release."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from bridge.edge.spool.base import DeadLetter, transaction
from bridge.edge.spool.deadletters import DeadLetters
from bridge.edge.spool.file import SpoolFile

_LAST_RID = (1 << 63) - 1  # the largest rid SQLite can store: no upper bound


class Holds:
    """The rows the uplink has in hand, which no bound may drop: every batch in flight (first
    rid -> last rid), whichever lane (live or backlog) read it, from the moment it is read
    until it is done. A batch is held by the read that takes it (under the fresh tail's lock,
    or on the spool's thread: either way a bound cannot drop its rows between the read and the
    hold) and unheld only after its release has deleted the rows, or when it is abandoned at
    shutdown; so this is the one record of what is in flight.

    Written on the event loop (takes from the fresh tail, unholds) and on the spool's thread
    (reads from the file), read by the bounds on the spool's thread: every access is under one
    lock, so a bound sees one consistent set.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}

    def hold(self, first: int, last: int) -> None:
        with self._lock:
            self._held[first] = last

    def unhold(self, first: int) -> None:
        """The batch starting at rid ``first`` is done (acked or abandoned at shutdown)."""
        with self._lock:
            self._held.pop(first, None)

    def spans(self) -> list[tuple[int, int]]:
        """The batches in flight, as (first, last) rids."""
        with self._lock:
            return list(self._held.items())

    def clear(self) -> None:
        """The file was replaced: its rids mean nothing now."""
        with self._lock:
            self._held.clear()


class SendSide:
    """Reads for the sender (from the fresh tail or the file) and deletes what was acked."""

    def __init__(self, *, file: SpoolFile, holds: Holds, dead: DeadLetters) -> None:
        self.file, self.holds, self.dead = file, holds, dead

    def take_fresh(self, rid: int, *, max_rows: int, max_bytes: int, hold: bool = False,
                   through: int | None = None) -> list[tuple[int, bytes]] | None:
        """``read_after`` from the fresh tail, on any thread, or None when the tail does not
        hold what follows ``rid`` (then read the file). Never waits: while a bound holds the
        tail's lock to drop rows on the spool's thread, the caller (the event loop) reads
        the file on that thread instead, behind the drop."""
        fresh = self.file.fresh
        if not fresh.lock.acquire(blocking=False):
            return None
        try:
            out = fresh.take(rid, max_rows=max_rows, max_bytes=max_bytes, through=through)
            if hold and out:
                self.holds.hold(out[0][0], out[-1][0])
            return out
        finally:
            fresh.lock.release()

    def read_after(self, rid: int, *, max_rows: int, max_bytes: int,
                   hold: bool = False, through: int | None = None) -> list[tuple[int, bytes]]:
        """The next rows with rid > ``rid`` (and at most ``through``), in order, at most
        ``max_bytes`` (at least one).

        ``hold``: the rows go into a batch; no bound drops them until ``unhold``.
        """
        cur = self.file.db.execute(
            "SELECT rid, envelope FROM readings WHERE rid > ? AND rid <= ? ORDER BY rid "
            "LIMIT ?", (rid, _LAST_RID if through is None else through, max_rows))
        out: list[tuple[int, bytes]] = []
        total = 0
        for r, blob in cur:
            if out and total + len(blob) > max_bytes:
                break
            out.append((r, blob))
            total += len(blob)
        cur.close()
        if hold and out:
            self.holds.hold(out[0][0], out[-1][0])
        return out

    def release(self, first: int, last: int, rejected: Sequence[tuple[int, str]]) -> None:
        """Delete rids ``first..last`` (acked), rejected ones copied to dead letters first, in
        one transaction; deletes are not fsynced (invariant 3 of the package docstring)."""
        f = self.file
        with f.fresh.lock:  # before the delete: the tail never holds a deleted row
            f.fresh.forget_through(last)
        db = f.db
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            with transaction(db):
                dead_rows = None
                if rejected:
                    blobs = dict(db.execute(
                        "SELECT rid, envelope FROM readings WHERE rid BETWEEN ? AND ?",
                        (min(r for r, _ in rejected), max(r for r, _ in rejected))))
                    dead_rows = self.dead.insert([
                        DeadLetter("uplink", "", bytes(blobs[r]), "rejected", reason)
                        for r, reason in rejected if r in blobs])
                n, size = db.execute("SELECT count(*), coalesce(sum(length(envelope)), 0) "
                                     "FROM readings WHERE rid BETWEEN ? AND ?",
                                     (first, last)).fetchone()
                db.execute("DELETE FROM readings WHERE rid BETWEEN ? AND ?", (first, last))
                db.executemany("UPDATE meta SET value=? WHERE key=?", [
                    (f.readings - n, "readings"), (f.bytes - size, "bytes")])
            f.readings -= n
            f.bytes -= size
            if dead_rows is not None:
                self.dead.committed(*dead_rows)
        finally:
            db.execute("PRAGMA synchronous=FULL")

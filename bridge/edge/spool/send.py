"""The send side: batches after a position, holds on batches in flight, release."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence

from bridge.edge.spool.base import DeadLetter, SpoolState, _is_full, transaction
from bridge.shared.errors import SpoolFull


class SendSide(SpoolState):
    """Mixed into ``Spool``; see the package docstring."""

    def _holds(self) -> list[tuple[int, int]]:
        return list(self._held.items())  # one C call: atomic against the loop's unhold

    def unhold(self, first: int) -> None:
        """The batch starting at rid ``first`` is done (acked or abandoned at shutdown)."""
        self._held.pop(first, None)

    def take_fresh(self, rid: int, *, max_rows: int, max_bytes: int, hold: bool = False
                   ) -> list[tuple[int, bytes]] | None:
        """``read_after`` from the fresh tail, on any thread, or None when the tail does not
        hold what follows ``rid`` (then read the file). Never waits: while a bound holds the
        tail's lock to drop rows on the spool's thread, the caller (the event loop) reads
        the file on that thread instead, behind the drop."""
        if not self.fresh.lock.acquire(blocking=False):
            return None
        try:
            out = self.fresh.take(rid, max_rows=max_rows, max_bytes=max_bytes)
            if hold and out:
                self._held[out[0][0]] = out[-1][0]
            return out
        finally:
            self.fresh.lock.release()

    def read_after(self, rid: int, *, max_rows: int, max_bytes: int,
                   hold: bool = False) -> list[tuple[int, bytes]]:
        """The next rows with rid > ``rid``, in order, at most ``max_bytes`` (at least one).

        ``hold``: the rows go into a batch; no bound drops them until ``unhold``.
        """
        def read() -> list[tuple[int, bytes]]:
            cur = self._db.execute("SELECT rid, envelope FROM readings WHERE rid > ? "
                                   "ORDER BY rid LIMIT ?", (rid, max_rows))
            out: list[tuple[int, bytes]] = []
            total = 0
            for r, blob in cur:
                if out and total + len(blob) > max_bytes:
                    break
                out.append((r, blob))
                total += len(blob)
            cur.close()
            if hold and out:
                self._held[out[0][0]] = out[-1][0]
            return out
        return self._guard(read)

    def release(self, first: int, last: int, rejected: Sequence[tuple[int, str]] = (), *,
                generation: int | None = None) -> None:
        """Forget rids ``first..last`` (acked); rejected ones are copied to dead letters first.

        ``generation`` is the file generation the rids were read from: after a quarantine the
        old rids mean nothing and the call does nothing.
        """
        if generation is not None and generation != self.generation:
            return
        with self.fresh.lock:  # before the delete: the tail never holds a deleted row
            self.fresh.forget_through(last)
        remedies = [self._truncate_wal, self._give_up_reserve]
        while True:
            try:
                self._guard(lambda: self._release(first, last, rejected))
                break
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                self._tight = True
                if not remedies:
                    raise SpoolFull(f"cannot delete acknowledged rows: {exc}") from exc
                remedies.pop(0)()
        if self._tight:
            self._truncate_wal()
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize >= 2 * max(self.reserve_bytes, 1 << 20):
                self._tight = False
                self._ensure_reserve()

    def _release(self, first: int, last: int, rejected: Sequence[tuple[int, str]]) -> None:
        db = self._db
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            with transaction(db):
                dead_rows = None
                if rejected:
                    blobs = dict(db.execute(
                        "SELECT rid, envelope FROM readings WHERE rid BETWEEN ? AND ?",
                        (min(r for r, _ in rejected), max(r for r, _ in rejected))))
                    dead_rows = self._insert_dead([
                        DeadLetter("uplink", "", bytes(blobs[r]), "rejected", reason)
                        for r, reason in rejected if r in blobs])
                n, size = db.execute("SELECT count(*), coalesce(sum(length(envelope)), 0) "
                                     "FROM readings WHERE rid BETWEEN ? AND ?",
                                     (first, last)).fetchone()
                db.execute("DELETE FROM readings WHERE rid BETWEEN ? AND ?", (first, last))
                db.executemany("UPDATE meta SET value=? WHERE key=?", [
                    (self.readings - n, "readings"), (self.bytes - size, "bytes")])
            self.readings -= n
            self.bytes -= size
            if dead_rows is not None:
                self._dead_committed(*dead_rows)
        finally:
            db.execute("PRAGMA synchronous=FULL")

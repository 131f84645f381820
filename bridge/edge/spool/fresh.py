"""The fresh tail: the newest committed rows, kept in memory for the sender.

Without it every batch the sender takes is read back from the file it was written to a
moment before, on the spool's thread: a round trip through that thread and a query per
batch. The tail holds the rows of the latest commits as they were inserted, so the sender's
next batch comes from memory, on the event loop; the file is read only for the backlog
(after a restart, an outage, or when the sender is behind by more than the tail holds).

Invariant: *the tail is a dense run of rids ending at the newest row of ``readings``, and each
row in it is in ``readings`` with these bytes.* So a read after ``rid`` that finds ``rid + 1``
in the tail (or finds ``rid`` to be its end) returns exactly what the query would. Kept by:

1. a commit appends its rows after its transaction, contiguous with the tail or replacing it;
2. a release forgets every row at or below its last rid (rows the sender took already);
3. a drop (ttl, spool full, reject new) and a quarantine empty it, under the same lock as the
   read here, so a bound never drops a row between its read and its hold (a read that finds
   the lock taken does not wait: it reads the file on the spool's thread, behind the drop);
4. past ``max_bytes`` the oldest rows leave it first (they are read from the file instead).

Anything not found here is read from the file: the tail makes reads cheaper, never different.
"""

from __future__ import annotations

import collections
import threading

FRESH_MAX_BYTES = 2 * 1024 * 1024  # a few batches ahead of the sender; the rest is backlog


class FreshTail:
    """Shared by the spool's thread (adds, forgets, clears) and the event loop (takes)."""

    def __init__(self, *, max_bytes: int = FRESH_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.lock = threading.RLock()  # also held by a bound from its pick to its delete
        self._rows: collections.deque[tuple[int, bytes]] = collections.deque()
        self._bytes = 0
        self.hits = 0    # reads answered here
        self.misses = 0  # reads left to the file

    def add(self, rows: list[tuple[int, bytes]]) -> None:
        """Rows just committed (rule 1); the caller holds ``lock``."""
        if not rows:
            return
        if self._rows and self._rows[-1][0] + 1 != rows[0][0]:
            self.clear()
        self._rows.extend(rows)
        self._bytes += sum(len(b) for _, b in rows)
        while self._bytes > self.max_bytes:  # a commit larger than the tail keeps its newest
            self._bytes -= len(self._rows.popleft()[1])

    def forget_through(self, rid: int) -> None:
        """Rows at or below ``rid`` are of no use here any more (rule 2); caller holds ``lock``."""
        rows = self._rows
        while rows and rows[0][0] <= rid:
            self._bytes -= len(rows.popleft()[1])

    def clear(self) -> None:
        self._rows.clear()
        self._bytes = 0

    def take(self, rid: int, *, max_rows: int, max_bytes: int, through: int | None = None
             ) -> list[tuple[int, bytes]] | None:
        """The rows after ``rid`` (and at most ``through``) as ``read_after`` gives them, or
        None when the tail does not hold ``rid + 1`` (nor ends at ``rid``); caller holds
        ``lock``."""
        rows = self._rows
        if not rows or not rows[0][0] <= rid + 1 <= rows[-1][0] + 1:
            self.misses += 1
            return None
        self.hits += 1
        self.forget_through(rid)
        out: list[tuple[int, bytes]] = []
        total = 0
        for row in rows:
            if len(out) >= max_rows or (out and total + len(row[1]) > max_bytes) or \
                    (through is not None and row[0] > through):
                break
            out.append(row)
            total += len(row[1])
        return out

"""Dead letters: bounded by count and bytes, oldest evicted first; the offline reader; and
the spool side of re-driving them (``bridge.edge.redrive``): replayed ones leave the table in the
transaction that appends their envelopes, failed attempts are recorded on their rows."""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from bridge.edge.spool.base import DeadLetter, DeadRow, _text, transaction
from bridge.edge.spool.file import SpoolFile
from bridge.shared.errors import SpoolError
from bridge.shared.telemetry import event

_NEWEST = ("SELECT id, at_ns, source, topic, payload, reason, detail, "
           "coalesce(size, length(payload)), attempts FROM dead_letters ORDER BY id DESC "
           "LIMIT ?")
# a file no agent of this version has opened yet (read-only: not migrated here)
_NEWEST_BEFORE_ATTEMPTS = _NEWEST.replace(", attempts FROM", ", 0 FROM")


def read_dead_letters(path: Path, *, limit: int = 100) -> list[DeadRow]:
    """The newest dead letters of a spool file, newest first, for ``bridge dead-letters``.

    Read-only and safe while the agent runs (WAL readers do not block the writer).
    """
    if not path.exists():
        raise SpoolError(f"{path}: no spool file here (is spool.path right?)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            columns = {r[1] for r in db.execute("PRAGMA table_info(dead_letters)")}
            query = _NEWEST if "attempts" in columns else _NEWEST_BEFORE_ATTEMPTS
            rows = db.execute(query, (limit,)).fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise SpoolError(f"{path}: cannot read dead letters: {exc}") from exc
    return [DeadRow(int(r[0]), int(r[1]), DeadLetter(r[2], r[3], bytes(r[4]), r[5], r[6],
                                                      int(r[7])), int(r[8])) for r in rows]


class DeadLetters:
    """The ``dead_letters`` table and its bounds, kept in memory as (id, bytes), oldest first,
    so a commit knows what to evict without a query."""

    def __init__(self, *, file: SpoolFile, payload_bytes: int, max_count: int, max_bytes: int,
                 on_evict: Callable[[int], None] | None = None) -> None:
        self.file = file
        self.payload_bytes, self.max_count, self.max_bytes = payload_bytes, max_count, max_bytes
        self._on_evict = on_evict or (lambda n: None)
        self._kept: deque[tuple[int, int]] = deque()
        self.bytes = 0

    def insert(self, dead: Sequence[DeadLetter]
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Insert (truncated) dead letters and evict the oldest past the bounds, inside the
        caller's transaction; returns (added, evicted) as (id, bytes) for ``committed``."""
        db = self.file.db
        now = time.time_ns()
        keep = self.payload_bytes
        added: list[tuple[int, int]] = []
        for d in dead:
            topic, detail = _text(d.topic)[:1024], _text(d.detail)[:1024]
            payload = d.payload[:keep]
            cur = db.execute(
                "INSERT INTO dead_letters(at_ns, source, topic, payload, reason, detail, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (now, _text(d.source), topic, payload, _text(d.reason), detail, len(d.payload)))
            added.append((int(cur.lastrowid or 0),
                          len(payload) + len(topic.encode()) + len(detail.encode())))
        return added, self._evict(added)

    def _evict(self, added: list[tuple[int, int]]) -> list[tuple[int, int]]:
        count = len(self._kept) + len(added)
        size = self.bytes + sum(n for _, n in added)
        evicted: list[tuple[int, int]] = []
        for item in itertools.chain(self._kept, added):  # oldest first
            if count <= self.max_count and size <= self.max_bytes:
                break
            evicted.append(item)
            count -= 1
            size -= item[1]
        if evicted:
            self.file.db.execute("DELETE FROM dead_letters WHERE id <= ?", (evicted[-1][0],))
        return evicted

    def committed(self, added: list[tuple[int, int]], evicted: list[tuple[int, int]]) -> None:
        """The transaction of an ``insert`` committed: the memory follows the table."""
        self._kept.extend(added)
        self.bytes += sum(n for _, n in added)
        for _ in evicted:
            self.bytes -= self._kept.popleft()[1]
        if evicted:
            self._on_evict(len(evicted))
            event("spool.dead_letters_evicted", level=logging.WARNING, evicted=len(evicted),
                  kept=len(self._kept), bytes=self.bytes, max=self.max_count,
                  max_bytes=self.max_bytes)

    def newest(self, limit: int = 100) -> list[DeadLetter]:
        rows = self.file.db.execute(
            "SELECT source, topic, payload, reason, detail FROM dead_letters ORDER BY id DESC "
            "LIMIT ?", (limit,)).fetchall()
        return [DeadLetter(*r) for r in rows]

    def rows(self, *, ids: Sequence[int] = (), reasons: Sequence[str] = (),
             before_ns: int | None = None) -> list[DeadRow]:
        """Stored dead letters, oldest first (their arrival order), each selector narrowing
        the set (none: all). The table is bounded (``dead_letters_max``): read whole."""
        rows = self.file.db.execute(
            "SELECT id, at_ns, source, topic, payload, reason, detail, "
            "coalesce(size, length(payload)), attempts FROM dead_letters ORDER BY id"
        ).fetchall()
        want_ids, want_reasons = set(ids), set(reasons)
        return [DeadRow(int(r[0]), int(r[1]), DeadLetter(r[2], r[3], bytes(r[4]), r[5], r[6],
                                                          int(r[7])), int(r[8]))
                for r in rows
                if (not want_ids or int(r[0]) in want_ids)
                and (not want_reasons or r[5] in want_reasons)
                and (before_ns is None or int(r[1]) < before_ns)]

    def resolve_replay(self, replayed: Sequence[int], failed: Sequence[tuple[int, str, str]],
                       now_ns: int) -> Callable[[sqlite3.Connection], None]:
        """What a replay does to the table, run inside the transaction that appends the
        replayed envelopes: delete the ``replayed`` rows, record an attempt on each
        ``failed`` (id, reason, detail), count them."""
        def resolve(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM dead_letters WHERE id=?", [(i,) for i in replayed])
            db.executemany("UPDATE dead_letters SET reason=?, detail=?, attempts=attempts+1, "
                           "last_attempt_ns=? WHERE id=?",
                           [(_text(r), _text(d)[:1024], now_ns, i) for i, r, d in failed])
            db.execute("INSERT OR REPLACE INTO meta VALUES ('dead_replayed', ?)",
                       (self.counter("dead_replayed") + len(replayed),))
        return resolve

    def purge(self, ids: Sequence[int]) -> int:
        """Delete these dead letters (one durable transaction); how many were deleted."""
        db = self.file.db
        with transaction(db):
            n = sum(db.execute("DELETE FROM dead_letters WHERE id=?", (i,)).rowcount
                    for i in ids)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('dead_purged', ?)",
                       (self.counter("dead_purged") + n,))
        self.reload()
        return n

    def counter(self, key: str) -> int:
        """``dead_replayed`` or ``dead_purged``: dead letters re-driven or purged, ever."""
        row = self.file.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def reload(self) -> None:
        """Read the table's (id, bytes) into memory: at open, and after a replay or purge."""
        self._kept = deque((int(i), int(n)) for i, n in self.file.db.execute(
            "SELECT id, length(payload) + length(topic) + length(detail) FROM dead_letters"
            " ORDER BY id"))
        self.bytes = sum(n for _, n in self._kept)

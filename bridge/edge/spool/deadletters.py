"""Dead letters: bounded by count and bytes, oldest evicted first; the offline reader; and
the spool side of re-driving them (``bridge.edge.redrive``): replayed ones leave the table in the
transaction that appends their envelopes, failed attempts are recorded on their rows."""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from bridge.edge.spool.base import DeadLetter, DeadRow, Pending, SpoolState, _text, transaction
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


class DeadLetters(SpoolState):
    """Mixed into ``Spool``; see the package docstring."""

    def _insert_dead(self, dead: Sequence[DeadLetter]
                     ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Insert (truncated) dead letters and evict the oldest past the bounds, inside the
        caller's transaction; returns (added, evicted) as (id, bytes) for ``_dead_committed``."""
        db = self._db
        now = time.time_ns()
        keep = self.dead_payload_bytes
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
        return added, self._evict_dead(added)

    def _evict_dead(self, added: list[tuple[int, int]]) -> list[tuple[int, int]]:
        count = len(self._dead) + len(added)
        size = self.dead_bytes + sum(n for _, n in added)
        evicted: list[tuple[int, int]] = []
        for item in itertools.chain(self._dead, added):  # oldest first
            if count <= self.dead_max and size <= self.dead_max_bytes:
                break
            evicted.append(item)
            count -= 1
            size -= item[1]
        if evicted:
            self._db.execute("DELETE FROM dead_letters WHERE id <= ?", (evicted[-1][0],))
        return evicted

    def _dead_committed(self, added: list[tuple[int, int]],
                        evicted: list[tuple[int, int]]) -> None:
        self._dead.extend(added)
        self.dead_bytes += sum(n for _, n in added)
        for _ in evicted:
            self.dead_bytes -= self._dead.popleft()[1]
        if evicted:
            self._on_evict(len(evicted))
            event("spool.dead_letters_evicted", level=logging.WARNING, evicted=len(evicted),
                  kept=len(self._dead), bytes=self.dead_bytes, max=self.dead_max,
                  max_bytes=self.dead_max_bytes)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._guard(lambda: self._db.execute(
            "SELECT source, topic, payload, reason, detail FROM dead_letters ORDER BY id DESC "
            "LIMIT ?", (limit,)).fetchall())
        return [DeadLetter(*r) for r in rows]

    def dead_rows(self, *, ids: Sequence[int] = (), reasons: Sequence[str] = (),
                  before_ns: int | None = None) -> list[DeadRow]:
        """Stored dead letters, oldest first (their arrival order), each selector narrowing
        the set (none: all). The table is bounded (``dead_letters_max``): read whole."""
        rows = self._guard(lambda: self._db.execute(
            "SELECT id, at_ns, source, topic, payload, reason, detail, "
            "coalesce(size, length(payload)), attempts FROM dead_letters ORDER BY id"
        ).fetchall())
        want_ids, want_reasons = set(ids), set(reasons)
        return [DeadRow(int(r[0]), int(r[1]), DeadLetter(r[2], r[3], bytes(r[4]), r[5], r[6],
                                                          int(r[7])), int(r[8]))
                for r in rows
                if (not want_ids or int(r[0]) in want_ids)
                and (not want_reasons or r[5] in want_reasons)
                and (before_ns is None or int(r[1]) < before_ns)]

    def replay_dead(self, pending: Sequence[Pending], replayed: Sequence[int],
                    failed: Sequence[tuple[int, str, str]], now_ns: int) -> list[int]:
        """One durable transaction: append ``pending`` (fresh seqs, in order), delete the
        ``replayed`` rows, and record an attempt on each ``failed`` (id, reason, detail)."""
        def resolve(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM dead_letters WHERE id=?", [(i,) for i in replayed])
            db.executemany("UPDATE dead_letters SET reason=?, detail=?, attempts=attempts+1, "
                           "last_attempt_ns=? WHERE id=?",
                           [(_text(r), _text(d)[:1024], now_ns, i) for i, r, d in failed])
            db.execute("INSERT OR REPLACE INTO meta VALUES ('dead_replayed', ?)",
                       (self.dead_counter("dead_replayed") + len(replayed),))

        rids = self._guard(lambda: self._commit(pending, (), {}, resolve=resolve))
        self._reload_dead()
        return rids

    def purge_dead(self, ids: Sequence[int]) -> int:
        """Delete these dead letters (one durable transaction); how many were deleted."""
        def purge() -> int:
            with transaction(self._db):
                n = sum(self._db.execute("DELETE FROM dead_letters WHERE id=?", (i,)).rowcount
                        for i in ids)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dead_purged', ?)",
                                 (self.dead_counter("dead_purged") + n,))
            return n

        n = self._guard(purge)
        self._reload_dead()
        return n

    def dead_counter(self, key: str) -> int:
        """``dead_replayed`` or ``dead_purged``: dead letters re-driven or purged, ever."""
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _reload_dead(self) -> None:
        self._dead = deque((int(i), int(n)) for i, n in self._db.execute(
            "SELECT id, length(payload) + length(topic) + length(detail) FROM dead_letters"
            " ORDER BY id"))
        self.dead_bytes = sum(n for _, n in self._dead)

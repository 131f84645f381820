"""Dead letters: bounded by count and bytes, oldest evicted first; the offline reader."""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from bridge.errors import SpoolError
from bridge.spool.base import DeadLetter, SpoolState, _text
from bridge.telemetry import event


def read_dead_letters(path: Path, *, limit: int = 100) -> list[tuple[int, DeadLetter]]:
    """The newest dead letters of a spool file, (at_ns, letter), for ``bridge dead-letters``.

    Read-only and safe while the agent runs (WAL readers do not block the writer).
    """
    if not path.exists():
        raise SpoolError(f"{path}: no spool file here (is spool.path right?)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT at_ns, source, topic, payload, reason, detail, "
                              "coalesce(size, length(payload)) FROM dead_letters "
                              "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise SpoolError(f"{path}: cannot read dead letters: {exc}") from exc
    return [(int(r[0]), DeadLetter(r[1], r[2], bytes(r[3]), r[4], r[5], int(r[6])))
            for r in rows]


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

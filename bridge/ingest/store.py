"""The ingest node's SQLite store: committed readings plus the durable dedupe ledger.

Format: ``readings(offset INTEGER PRIMARY KEY AUTOINCREMENT, site_id, epoch, seq, envelope,
commit_ns, last_seq, reason)`` with ``UNIQUE(site_id, epoch, seq)``; ``ledger(site_id, epoch,
watermark, committed)`` holds each stream's ``bridge.ingest.ledger`` watermark and count. One
transaction per batch (``synchronous=FULL``) holds the new rows and the ledger change together,
so after a crash the ledger and the rows agree. ``offset`` is this node's commit order, used to
follow new commits; epochs are unsigned 64-bit on the wire and stored as signed 64-bit.

The ledger's sparse set above the watermark is not stored separately: it is exactly the
stream's readings (and tombstone ranges ``seq..last_seq``) above the watermark, read back
through the unique index at open. Writing it as rows as well cost an insert and a later
delete per out-of-order seq (the insert alone: 13.6 % of the ingest's py-spy samples in a 1M
drain). Files from before this change still hold a ``ledger_above`` table; it is no longer
read or written.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bridge.ingest.ledger import Key, Ledger, StreamLedger


def to_i64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def to_u64(i: int) -> int:
    return i + (1 << 64) if i < 0 else i


@dataclass(frozen=True, slots=True)
class Incoming:
    site_id: str
    epoch: int
    seq: int
    envelope: bytes
    last_seq: int | None = None  # set for a tombstone: seqs seq..last_seq were dropped
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Row:
    offset: int
    site_id: str
    epoch: int
    seq: int
    envelope: bytes
    commit_ns: int


class Store:
    """Single-writer; ``commit`` runs on one thread, readers use ``Reader`` connections."""

    def __init__(self, *, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        db = self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS readings(offset INTEGER PRIMARY KEY AUTOINCREMENT,"
                   " site_id TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,"
                   " envelope BLOB NOT NULL, commit_ns INTEGER NOT NULL,"
                   " last_seq INTEGER, reason TEXT, UNIQUE(site_id, epoch, seq))")
        db.execute("CREATE TABLE IF NOT EXISTS ledger(site_id TEXT, epoch INTEGER,"
                   " watermark INTEGER, committed INTEGER, PRIMARY KEY(site_id, epoch))"
                   " WITHOUT ROWID")
        self.ledger = Ledger()
        for site, epoch, wm, committed in db.execute("SELECT * FROM ledger"):
            s = self.ledger.stream((site, to_u64(epoch)))
            s.watermark, s.committed = wm, committed
        for (site, epoch), stream in self.ledger.streams.items():
            for seq, last in db.execute("SELECT seq, last_seq FROM readings WHERE site_id=?"
                                        " AND epoch=? AND seq>?",
                                        (site, to_i64(epoch), stream.watermark)):
                stream.above.update(range(seq, (seq if last is None else last) + 1))

    def commit(self, batch: Sequence[Incoming]) -> list[bool]:
        """Commit what is new; returns, per item, True if newly committed, False if duplicate."""
        fresh: list[bool] = []
        rows = []
        touched: dict[Key, list[tuple[int, int]]] = {}
        seen_in_batch: set[tuple[str, int, int]] = set()
        now = time.time_ns()
        for item in batch:
            key = (item.site_id, item.epoch)
            ident = (item.site_id, item.epoch, item.seq)
            stream = self.ledger.streams.get(key)
            last = item.seq if item.last_seq is None else item.last_seq
            dup = ident in seen_in_batch or (stream is not None and stream.has_all(item.seq,
                                                                                  last))
            fresh.append(not dup)
            if not dup:
                seen_in_batch.add(ident)
                rows.append((item.site_id, to_i64(item.epoch), item.seq, item.envelope, now,
                             item.last_seq, item.reason or None))
                touched.setdefault(key, []).append((item.seq, last))
        if not rows:
            return fresh
        # Work out the ledger's new state before writing, apply it only after COMMIT.
        updates = []
        for key, seqs in touched.items():
            cur = self.ledger.streams.get(key)
            trial = StreamLedger() if cur is None else cur.copy()
            for first, last in seqs:
                if first == last:
                    if not trial.has(first):
                        trial.add(first)
                else:
                    trial.add_range(first, last)
            updates.append((key, trial))
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR IGNORE INTO readings(site_id, epoch, seq, envelope,"
                           " commit_ns, last_seq, reason) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            db.executemany("INSERT OR REPLACE INTO ledger VALUES (?, ?, ?, ?)",
                           [(site, to_i64(epoch), trial.watermark, trial.committed)
                            for (site, epoch), trial in updates])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for key, trial in updates:
            self.ledger.streams[key] = trial
        return fresh

    def close(self) -> None:
        self._db.close()


class Reader:
    """A read-only connection for Subscribe streams (WAL readers never block the writer)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    def max_offset(self) -> int:
        (n,) = self._db.execute("SELECT coalesce(max(offset), 0) FROM readings").fetchone()
        return int(n)

    def dropped(self) -> list[tuple[str, int, int, int, str]]:
        """(site_id, epoch, first_seq, last_seq, reason) of every tombstone."""
        rows = self._db.execute("SELECT site_id, epoch, seq, last_seq, reason FROM readings"
                                " WHERE last_seq IS NOT NULL ORDER BY site_id, epoch, seq")
        return [(s, to_u64(e), f, last, r or "") for s, e, f, last, r in rows]

    def page(self, after_offset: int, limit: int = 1000) -> list[Row]:
        rows = self._db.execute("SELECT offset, site_id, epoch, seq, envelope, commit_ns"
                                " FROM readings WHERE offset > ? ORDER BY offset LIMIT ?",
                                (after_offset, limit)).fetchall()
        return [Row(o, s, to_u64(e), q, env, c) for o, s, e, q, env, c in rows]

    def close(self) -> None:
        self._db.close()

"""The bounds: expiry by age, room made by dropping the lowest class first (Bounds)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence

from bridge.edge.spool.base import (
    PRIORITIES,
    TOMBSTONE,
    Pending,
    _is_full,
    _within,
    transaction,
)
from bridge.edge.spool.file import SpoolFile
from bridge.edge.spool.send import Holds
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import SpoolFull
from bridge.shared.telemetry import event


class Bounds:
    """Drops readings a bound forces out (age, a full spool, ``reject_new``) and writes the
    tombstones and drop records that stand for them; never a row the uplink holds."""

    def __init__(self, *, file: SpoolFile, holds: Holds) -> None:
        self.file, self.holds = file, holds
        self._totals: Counter[str] = Counter()

    def load_totals(self) -> None:
        """Readings dropped by reason over the file's life, from its ``drops`` table."""
        self._totals = Counter({str(r): int(n) for r, n in self.file.db.execute(
            "SELECT reason, sum(count) FROM drops GROUP BY reason")})

    def expire(self, *, limit: int = 10_000) -> int:
        """Drop readings older than ``max_age_s`` (spool clock) as ``ttl``; returns how many."""
        f = self.file
        if f.max_age_s <= 0:
            return 0
        cutoff = f.clock.now() - f.max_age_s

        def pick() -> list[tuple[int, bytes, int]]:
            out: list[tuple[int, bytes, int]] = []
            held = self.holds.spans()
            # Tombstones are never dropped: left out before the limit, so however many an
            # outage piles up at the front, the readings behind them still expire.
            cur = f.db.execute("SELECT rid, envelope, prio, at FROM readings WHERE prio != ?"
                               " ORDER BY rid LIMIT ?", (TOMBSTONE, limit))
            for rid, blob, prio, at in cur:
                if at >= cutoff:  # rows are appended in clock order: the rest are younger
                    break
                if not _within(rid, held):
                    out.append((rid, blob, prio))
            cur.close()
            return out

        return self._picked_drop(pick, "ttl")

    def make_room(self, need_bytes: int) -> int:
        """``drop_oldest``: drop the lowest class first, oldest first, to free ``need_bytes``."""
        def pick() -> list[tuple[int, bytes, int]]:
            out: list[tuple[int, bytes, int]] = []
            freed = 0
            held = self.holds.spans()
            for prio in sorted(PRIORITIES.values()):
                cur = self.file.db.execute("SELECT rid, envelope FROM readings WHERE prio = ? "
                                           "ORDER BY rid", (prio,))
                for rid, blob in cur:
                    if _within(rid, held):
                        continue
                    out.append((rid, blob, prio))
                    freed += len(blob)
                    if freed >= need_bytes:
                        break
                cur.close()
                if freed >= need_bytes:
                    break
            return out

        return self._picked_drop(pick, "spool_full")

    def commit_dropped(self, pending: Sequence[Pending], reason: str) -> int:
        """``reject_new``: number the messages but keep only tombstones; returns how many."""
        if not pending:
            return 0
        # next_seq moves only with the transaction that records the tombstone: a failed
        # commit must not leave numbered seqs that no row and no tombstone accounts for.
        first = self.file.next_seq
        return self._picked_drop(list, reason,
                                 extra=[(self.file.epoch, first, first + len(pending) - 1)],
                                 next_seq=first + len(pending))

    def _picked_drop(self, pick: Callable[[], list[tuple[int, bytes, int]]], reason: str, *,
                     extra: Sequence[tuple[int, int, int]] = (), next_seq: int | None = None
                     ) -> int:
        """``_drop`` of what ``pick`` chose, both under the fresh tail's lock: the sender
        cannot take and hold a row from the tail between the pick and the delete."""
        with self.file.fresh.lock:
            return self._drop(pick(), reason, extra=extra, next_seq=next_seq)

    def _drop(self, rows: list[tuple[int, bytes, int]], reason: str, *,
              extra: Sequence[tuple[int, int, int]] = (), next_seq: int | None = None) -> int:
        """Replace rows (and ``extra`` new seq ranges) by tombstones, in one transaction."""
        seqs: dict[int, list[int]] = {}
        kept: list[tuple[int, bytes, int]] = []
        for row in rows:
            env = pb.Envelope.FromString(row[1])
            if env.HasField("dropped"):
                continue  # already a tombstone: re-dropping it would lose its range
            kept.append(row)
            seqs.setdefault(env.epoch, []).append(env.seq)
        rows = kept
        ranges: list[tuple[int, int, int]] = list(extra)
        for epoch, ss in seqs.items():
            ss.sort()
            start = prev = ss[0]
            for s in ss[1:]:
                if s != prev + 1:
                    ranges.append((epoch, start, prev))
                    start = s
                prev = s
            ranges.append((epoch, start, prev))
        if not ranges:
            return 0
        f = self.file
        now_ns, at = time.time_ns(), f.clock.now()
        stones = [pb.Envelope(site_id=f.site_id, epoch=e, seq=a, gateway_time_ns=now_ns,
                              dropped=pb.DropNotice(reason=reason, last_seq=b,
                                                    count=b - a + 1)).SerializeToString()
                  for e, a, b in ranges]
        try:
            self._write_drop(rows, stones, ranges, reason, now_ns, at,
                             f.next_seq if next_seq is None else next_seq)
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                f.tight = True
                f.truncate_wal()
                raise SpoolFull(f"cannot record the drop: {exc}") from exc
            raise
        count = sum(b - a + 1 for _, a, b in ranges)
        event("spool.dropped", level=logging.WARNING, reason=reason, readings=count,
              ranges=[[f"{e:016x}", a, b] for e, a, b in ranges[:10]])
        return count

    def _write_drop(self, rows: list[tuple[int, bytes, int]], stones: list[bytes],
                    ranges: list[tuple[int, int, int]], reason: str, now_ns: int,
                    at: float, next_seq: int) -> None:
        f = self.file
        rid = f.next_rid
        f.fresh.clear()  # rule 3 of bridge.edge.spool.fresh (the caller holds its lock)
        freed = sum(len(b) for _, b, _ in rows)
        added = sum(len(s) for s in stones)
        db = f.db
        with transaction(db):
            db.executemany("DELETE FROM readings WHERE rid = ?", [(r,) for r, _, _ in rows])
            db.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)",
                           [(rid + i, s, TOMBSTONE, at) for i, s in enumerate(stones)])
            db.executemany("INSERT INTO drops(at_ns, reason, epoch, first_seq, last_seq, count)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           [(now_ns, reason, e, a, b, b - a + 1) for e, a, b in ranges])
            readings = f.readings - len(rows) + len(stones)
            size = f.bytes - freed + added
            db.executemany("UPDATE meta SET value=? WHERE key=?", [
                (next_seq, "next_seq"), (readings, "readings"), (size, "bytes")])
        f.next_seq = next_seq
        f.next_rid += len(stones)
        f.readings, f.bytes = readings, size
        for _, a, b in ranges:
            self._totals[reason] += b - a + 1

    def drop_totals(self) -> dict[str, int]:
        """Readings dropped by reason over this file's life (kept in memory, loaded at open)."""
        return dict(self._totals)

    def oldest_age_s(self) -> float | None:
        row = self.file.db.execute(
            "SELECT at FROM readings WHERE prio != ? ORDER BY rid LIMIT 1",
            (TOMBSTONE,)).fetchone()
        return None if row is None else max(0.0, self.file.clock.now() - row[0])

"""The bounds: expiry by age, room made by dropping the lowest class first (Bounds)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence

from bridge.edge.spool.base import (
    PRIORITIES,
    TOMBSTONE,
    Pending,
    SpoolState,
    _is_full,
    _within,
    transaction,
)
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import SpoolFull
from bridge.shared.telemetry import event


class Bounds(SpoolState):
    """Mixed into ``Spool``; see the package docstring."""

    def expire(self, *, limit: int = 10_000) -> int:
        """Drop readings older than ``max_age_s`` (spool clock) as ``ttl``; returns how many."""
        try:
            self._guard(self.save_clock)
        except sqlite3.OperationalError as exc:
            if not _is_full(exc):
                raise  # a full disk only delays the save: every commit saves it too
        if self.max_age_s <= 0:
            return 0
        cutoff = self.clock.now() - self.max_age_s

        def pick() -> list[tuple[int, bytes, int]]:
            out: list[tuple[int, bytes, int]] = []
            held = self._holds()
            cur = self._db.execute("SELECT rid, envelope, prio, at FROM readings WHERE rid > ?"
                                   " ORDER BY rid LIMIT ?", (self.sent_through, limit))
            for rid, blob, prio, at in cur:
                if at >= cutoff:  # rows are appended in clock order: the rest are younger
                    break
                if prio != TOMBSTONE and not _within(rid, held):
                    out.append((rid, blob, prio))
            cur.close()
            return out

        return self._guard(lambda: self._picked_drop(pick, "ttl"))

    def make_room(self, need_bytes: int) -> int:
        """``drop_oldest``: drop the lowest class first, oldest first, to free ``need_bytes``."""
        def pick() -> list[tuple[int, bytes, int]]:
            out: list[tuple[int, bytes, int]] = []
            freed = 0
            held = self._holds()
            for prio in sorted(PRIORITIES.values()):
                cur = self._db.execute("SELECT rid, envelope FROM readings WHERE prio = ? AND "
                                       "rid > ? ORDER BY rid", (prio, self.sent_through))
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

        return self._guard(lambda: self._picked_drop(pick, "spool_full"))

    def commit_dropped(self, pending: Sequence[Pending], reason: str) -> int:
        """``reject_new``: number the messages but keep only tombstones; returns how many."""
        def run() -> int:
            # next_seq moves only with the transaction that records the tombstone: a failed
            # commit must not leave numbered seqs that no row and no tombstone accounts for.
            first = self.next_seq
            return self._picked_drop(list, reason,
                                     extra=[(self.epoch, first, first + len(pending) - 1)],
                                     next_seq=first + len(pending))
        return self._guard(run) if pending else 0

    def _picked_drop(self, pick: Callable[[], list[tuple[int, bytes, int]]], reason: str, *,
                     extra: Sequence[tuple[int, int, int]] = (), next_seq: int | None = None
                     ) -> int:
        """``_drop`` of what ``pick`` chose, both under the fresh tail's lock: the sender
        cannot take and hold a row from the tail between the pick and the delete."""
        with self.fresh.lock:
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
        now_ns, at = time.time_ns(), self.clock.now()
        stones = [pb.Envelope(site_id=self.site_id, epoch=e, seq=a, gateway_time_ns=now_ns,
                              dropped=pb.DropNotice(reason=reason, last_seq=b,
                                                    count=b - a + 1)).SerializeToString()
                  for e, a, b in ranges]
        try:
            self._write_drop(rows, stones, ranges, reason, now_ns, at,
                             self.next_seq if next_seq is None else next_seq)
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                self._tight = True
                self._truncate_wal()
                raise SpoolFull(f"cannot record the drop: {exc}") from exc
            raise
        count = sum(b - a + 1 for _, a, b in ranges)
        event("spool.dropped", level=logging.WARNING, reason=reason, readings=count,
              ranges=[[f"{e:016x}", a, b] for e, a, b in ranges[:10]])
        return count

    def _write_drop(self, rows: list[tuple[int, bytes, int]], stones: list[bytes],
                    ranges: list[tuple[int, int, int]], reason: str, now_ns: int,
                    at: float, next_seq: int) -> None:
        rid = self._next_rid
        self.fresh.clear()  # rule 3 of bridge.edge.spool.fresh (the caller holds its lock)
        freed = sum(len(b) for _, b, _ in rows)
        added = sum(len(s) for s in stones)
        db = self._db
        with transaction(db):
            db.executemany("DELETE FROM readings WHERE rid = ?", [(r,) for r, _, _ in rows])
            db.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)",
                           [(rid + i, s, TOMBSTONE, at) for i, s in enumerate(stones)])
            db.executemany("INSERT INTO drops(at_ns, reason, epoch, first_seq, last_seq, count)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           [(now_ns, reason, e, a, b, b - a + 1) for e, a, b in ranges])
            readings = self.readings - len(rows) + len(stones)
            size = self.bytes - freed + added
            db.executemany("UPDATE meta SET value=? WHERE key=?", [
                (next_seq, "next_seq"), (readings, "readings"), (size, "bytes")])
        self.next_seq = next_seq
        self._next_rid += len(stones)
        self.readings, self.bytes = readings, size
        for _, a, b in ranges:
            self._drop_totals[reason] += b - a + 1

    def drop_totals(self) -> dict[str, int]:
        """Readings dropped by reason over this file's life (kept in memory, loaded at open)."""
        return dict(self._drop_totals)

    def oldest_age_s(self) -> float | None:
        row = self._guard(lambda: self._db.execute(
            "SELECT at FROM readings WHERE prio != ? ORDER BY rid LIMIT 1",
            (TOMBSTONE,)).fetchone())
        return None if row is None else max(0.0, self.clock.now() - row[0])

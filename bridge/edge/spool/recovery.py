"""Corruption: move the file aside, start afresh, salvage what can be read (Recovery)."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bridge.edge.spool.base import (
    TOMBSTONE,
    Quarantine,
    SpoolState,
    _Corrupt,
    _is_corruption,
    _is_tombstone,
    transaction,
)
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import SpoolError, SpoolReset
from bridge.shared.telemetry import event

R = TypeVar("R")


def _salvage(path: Path, site_id: str) -> tuple[list[bytes], int]:
    """Every readable envelope of ``site_id`` in a quarantined file, in rid order.

    Returns (envelopes, unreadable) where unreadable counts rows or row ranges lost.
    """
    out: list[bytes] = []
    unreadable = 0
    try:
        # Not mode=ro: a WAL file needs its -shm (created on open) and WAL recovery to be read.
        db = sqlite3.connect(path)
        db.execute("PRAGMA query_only=1")
        # A truncated file has fewer pages than its header says; SQLite refuses to read it at
        # all unless writable_schema is on, and then reads the pages that are there.
        db.execute("PRAGMA writable_schema=ON")
    except sqlite3.Error:
        return out, 1
    try:
        try:
            lo, hi = db.execute("SELECT min(rid), max(rid) FROM readings").fetchone()
        except sqlite3.Error:
            lo = hi = None
        if lo is None or hi is None:
            # No usable rid range: try one plain scan and keep what comes out before an error.
            return _scan(db, "SELECT envelope FROM readings", (), site_id, out), 1
        chunk = 1000
        for start in range(lo, hi + 1, chunk):
            before = len(out)
            try:
                _scan(db, "SELECT envelope FROM readings WHERE rid >= ? AND rid < ? ORDER BY rid",
                      (start, start + chunk), site_id, out, strict=True)
            except sqlite3.Error:
                del out[before:]
                # Retry the chunk row by row to keep what is readable.
                for rid in range(start, min(start + chunk, hi + 1)):
                    try:
                        row = db.execute("SELECT envelope FROM readings WHERE rid = ?",
                                         (rid,)).fetchone()
                    except sqlite3.Error:
                        unreadable += 1
                        continue
                    if row is not None and not _keep(row[0], site_id, out):
                        unreadable += 1
    finally:
        db.close()
    return out, unreadable


def _scan(db: sqlite3.Connection, sql: str, args: tuple[int, ...], site_id: str,
          out: list[bytes], *, strict: bool = False) -> list[bytes]:
    try:
        for (blob,) in db.execute(sql, args):
            _keep(blob, site_id, out)
    except sqlite3.Error:
        if strict:
            raise
    return out


def _keep(blob: object, site_id: str, out: list[bytes]) -> bool:
    if not isinstance(blob, bytes):
        return False
    try:
        env = pb.Envelope.FromString(blob)
    except Exception:  # noqa: BLE001 - any garbage is simply not salvageable
        return False
    if env.site_id != site_id or env.epoch == 0 or env.seq == 0:
        return False
    out.append(blob)
    return True


class Recovery(SpoolState):
    """Mixed into ``Spool``; see the package docstring."""

    def _recover(self, reason: str) -> None:
        """Move the file aside, start a fresh one, copy in what can be salvaged (see Recovery)."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.rename(Path(f"{moved}{suffix}"))
        salvage, unreadable = _salvage(moved, self.site_id)
        try:
            self._open()
        except _Corrupt as exc:  # a fresh file cannot be corrupt: the directory is unusable
            raise SpoolError(f"{self.path}: cannot create a fresh spool: {exc}") from exc
        if salvage:
            self._append_salvaged(salvage)
        q = Quarantine(moved_to=moved, reason=reason, salvaged=len(salvage),
                       unreadable=unreadable)
        self.quarantines.append(q)
        self.generation += 1
        self._held = {}  # the old file's rids mean nothing now
        with self.fresh.lock:
            self.fresh.clear()
        event("spool.quarantined", level=logging.ERROR, spool=str(self.path),
              moved_to=str(moved), reason=reason, salvaged=q.salvaged, unreadable=unreadable,
              new_epoch=f"{self.epoch:016x}")

    def _append_salvaged(self, blobs: list[bytes]) -> None:
        db = self._db
        size = sum(len(b) for b in blobs)
        first = self._next_rid
        with transaction(db):
            now = self.clock.now()
            # A salvaged tombstone stays a tombstone (never dropped again, so its range
            # survives); readings start over in the lowest class.
            db.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)",
                           [(first + i, b, TOMBSTONE if _is_tombstone(b) else 0, now)
                            for i, b in enumerate(blobs)])
            db.executemany("UPDATE meta SET value=? WHERE key=?", [
                (self.readings + len(blobs), "readings"), (self.bytes + size, "bytes")])
        self._next_rid += len(blobs)
        self.readings += len(blobs)
        self.bytes += size

    def _guard(self, fn: Callable[[], R]) -> R:
        """Run a database operation; corruption replaces the file and raises SpoolReset."""
        try:
            return fn()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._recover(f"{type(exc).__name__}: {exc}")
            raise SpoolReset(str(exc)) from exc

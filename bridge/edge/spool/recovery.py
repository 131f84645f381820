"""Corruption: move the file aside, start afresh, salvage what can be read (Recovery)."""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

from bridge.edge.spool.base import (
    TOMBSTONE,
    Quarantine,
    _Corrupt,
    _is_tombstone,
    transaction,
)
from bridge.edge.spool.file import SpoolFile
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import SpoolError
from bridge.shared.telemetry import event


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


class Recovery:
    """Replaces a corrupt file (see Recovery in the package docstring); keeps the record of
    every replacement for /status."""

    def __init__(self, *, file: SpoolFile, reopen: Callable[[], None]) -> None:
        self.file = file
        self._reopen = reopen  # the spool's open: the schema and the parts' loaders
        self.quarantines: list[Quarantine] = []

    def replace(self, reason: str) -> Quarantine:
        """Move the file aside, start a fresh one, copy in what can be salvaged; the file's
        generation moves on, so positions (rids) in the old one are void."""
        f = self.file
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        moved = f.path.with_name(f"{f.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{f.path}{suffix}")
            if src.exists():
                src.rename(Path(f"{moved}{suffix}"))
        salvage, unreadable = _salvage(moved, f.site_id)
        try:
            self._reopen()
        except _Corrupt as exc:  # a fresh file cannot be corrupt: the directory is unusable
            raise SpoolError(f"{f.path}: cannot create a fresh spool: {exc}") from exc
        if salvage:
            self._append_salvaged(salvage)
        q = Quarantine(moved_to=moved, reason=reason, salvaged=len(salvage),
                       unreadable=unreadable)
        self.quarantines.append(q)
        f.generation += 1
        with f.fresh.lock:
            f.fresh.clear()
        event("spool.quarantined", level=logging.ERROR, spool=str(f.path),
              moved_to=str(moved), reason=reason, salvaged=q.salvaged, unreadable=unreadable,
              new_epoch=f"{f.epoch:016x}")
        return q

    def _append_salvaged(self, blobs: list[bytes]) -> None:
        f = self.file
        db = f.db
        size = sum(len(b) for b in blobs)
        first = f.next_rid
        with transaction(db):
            now = f.clock.now()
            # A salvaged tombstone stays a tombstone (never dropped again, so its range
            # survives); readings start over in the lowest class.
            db.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)",
                           [(first + i, b, TOMBSTONE if _is_tombstone(b) else 0, now)
                            for i, b in enumerate(blobs)])
            db.executemany("UPDATE meta SET value=? WHERE key=?", [
                (f.readings + len(blobs), "readings"), (f.bytes + size, "bytes")])
        f.next_rid += len(blobs)
        f.readings += len(blobs)
        f.bytes += size

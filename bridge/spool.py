"""The agent's durable, bounded queue of envelopes between the plant broker and the uplink.

On-disk format (SQLite 3, one file, WAL mode, ``synchronous=FULL`` for appends)
==============================================================================

``meta(key TEXT PRIMARY KEY, value)``
    ``schema_version`` = 1; ``site_id``; ``epoch`` (random, 1..2^63-1, chosen at creation);
    ``next_seq`` (the seq the next appended envelope gets; never decreases); ``readings`` and
    ``bytes`` (running totals of the ``readings`` table, kept in the same transactions so that
    opening a large spool does not scan it).
``readings(seq INTEGER PRIMARY KEY, envelope BLOB)``
    One row per message: the serialised ``bridge.v1.Envelope`` whose own ``seq`` field equals
    the row's ``seq``. Rows are appended in increasing seq and deleted only once an ingest node
    has answered COMMITTED or DUPLICATE for them (or REJECTED, after they were copied to
    ``dead_letters``).
``dead_letters(id INTEGER PRIMARY KEY, at_ns, source, topic, payload BLOB, reason, detail)``
    Messages that will never be sent (undecodable payloads, ingest rejections), kept for an
    operator; written in the same transaction that lets the broker message be acked.
``recent(source TEXT, slot INTEGER, n INTEGER, digest BLOB, PRIMARY KEY (source, slot))``
    A ring, per source, of the digests of the last ``ring_size`` messages committed (``n``
    counts messages per source; ``slot`` = ``n`` mod ``ring_size``). A broker
    redelivers (MQTT DUP=1, AMQP ``redelivered``) only messages it sent but saw no ack for, and
    it never has more unacked than the receive window, so a ring twice that size holds every
    message that can come back. A *flagged* redelivery whose digest is in the ring is acked
    without being stored again; unflagged identical payloads are separate readings.

Invariants
==========
1. A broker message is acked only after the transaction holding its envelope (or its dead
   letter, or its ring match) has committed with ``synchronous=FULL``: an acked message survives
   a crash or power loss.
2. ``seq`` is dense and strictly increasing per (site_id, epoch), and never reused: ``next_seq``
   is stored in the same transaction as the rows it numbers.
3. Deletes are not fsynced on their own (``synchronous=NORMAL`` for them); the WAL is
   append-only, so a crash can only undo recent deletes, whose rows are then resent and
   answered DUPLICATE by the ingest. Never a loss, never a double in the consumed stream.
4. ``meta.readings``/``meta.bytes`` equal the count and total envelope length of ``readings``.

Bounds
======
``max_bytes`` bounds the envelope bytes held. A commit that would exceed it raises
``SpoolFull`` and nothing of it is written: the caller stops acking the broker (backpressure),
so readings wait in the broker's persistent session. ``PRAGMA max_page_count`` caps the file a
little above ``max_bytes`` so that a full disk surfaces as ``SQLITE_FULL`` (also ``SpoolFull``)
before the filesystem is exhausted.

Recovery
========
Opening checks ``schema_version`` and ``site_id``; a mismatch is a ``SpoolError`` naming the
file (the operator decides; nothing is deleted). SQLite's WAL recovery handles torn writes.

All methods are synchronous and must be called from one thread (``AsyncSpool`` runs them on a
dedicated thread so fsyncs never block the event loop).
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

SCHEMA_VERSION = 1
_PAGE = 4096

P = ParamSpec("P")
R = TypeVar("R")


class SpoolError(Exception):
    """The spool file cannot be used (wrong site, unknown schema, unreadable)."""


class SpoolFull(Exception):
    """The commit would exceed ``max_bytes`` or the disk is full; nothing was written."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    source: str
    topic: str
    payload: bytes
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Pending:
    """One message to append: ``build(seq)`` returns its serialised envelope."""

    source: str
    digest: bytes
    build: Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class SpoolStats:
    readings: int
    bytes: int
    next_seq: int
    epoch: int
    dead_letters: int


class RedeliveryRing:
    """In-memory mirror of one source's ``recent`` ring (a multiset of digests)."""

    def __init__(self, size: int, rows: Sequence[tuple[int, bytes]]) -> None:
        self.size = size
        ordered = sorted(rows)[-size:]
        self._slots: deque[bytes] = deque(d for _, d in ordered)
        self._count: Counter[bytes] = Counter(self._slots)
        self.next_n = ordered[-1][0] + 1 if ordered else 0

    def claim(self, digest: bytes) -> bool:
        """True once per stored copy: a redelivery consumes the match."""
        if self._count[digest] > 0:
            self._count[digest] -= 1
            return True
        return False

    def push(self, digest: bytes) -> None:
        self.next_n += 1
        if len(self._slots) >= self.size:
            old = self._slots.popleft()
            if self._count[old] > 0:
                self._count[old] -= 1
        self._slots.append(digest)
        self._count[digest] += 1


class Spool:
    def __init__(self, *, path: Path, site_id: str, max_bytes: int,
                 ring_sizes: dict[str, int] | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA journal_size_limit=67108864")
            self._init_schema(site_id)
            # Headroom: the file may grow past max_bytes (indexes, free pages, the WAL's own
            # checkpoints) but not without limit.
            pages = max(2 * max_bytes // _PAGE + 4096, 8192)
            self._db.execute(f"PRAGMA max_page_count={pages}")
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"{path}: cannot open the spool: {exc}") from exc
        self.rings: dict[str, RedeliveryRing] = {}
        for source, size in (ring_sizes or {}).items():
            rows = self._db.execute("SELECT n, digest FROM recent WHERE source=?",
                                    (source,)).fetchall()
            self.rings[source] = RedeliveryRing(size, rows)

    def _init_schema(self, site_id: str) -> None:
        db = self._db
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value)")
            db.execute("CREATE TABLE readings(seq INTEGER PRIMARY KEY, envelope BLOB NOT NULL)")
            db.execute("CREATE TABLE dead_letters(id INTEGER PRIMARY KEY, at_ns INTEGER, "
                       "source TEXT, topic TEXT, payload BLOB, reason TEXT, detail TEXT)")
            db.execute("CREATE TABLE recent(source TEXT, slot INTEGER, n INTEGER, digest BLOB, "
                       "PRIMARY KEY (source, slot)) WITHOUT ROWID")
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema_version", SCHEMA_VERSION), ("site_id", site_id),
                ("epoch", secrets.randbelow(2**63 - 1) + 1), ("next_seq", 1),
                ("readings", 0), ("bytes", 0), ("created_ns", time.time_ns()),
            ])
            db.execute("COMMIT")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise SpoolError(f"{self.path}: schema version {meta.get('schema_version')!r}, "
                             f"this agent reads {SCHEMA_VERSION}")
        if meta.get("site_id") != site_id:
            raise SpoolError(f"{self.path}: spool belongs to site {meta.get('site_id')!r}, "
                             f"not {site_id!r}; point spool.path elsewhere")
        self.epoch: int = meta["epoch"]
        self.next_seq: int = meta["next_seq"]
        self.readings: int = meta["readings"]
        self.bytes: int = meta["bytes"]

    def close(self) -> None:
        self._db.close()

    # -- append side -----------------------------------------------------------------------

    def commit(self, pending: Sequence[Pending], dead: Sequence[DeadLetter] = ()) -> list[int]:
        """Append envelopes and dead letters in one durable transaction; returns their seqs."""
        seq = self.next_seq
        rows: list[tuple[int, bytes]] = []
        size = 0
        for p in pending:
            blob = p.build(seq)
            rows.append((seq, blob))
            size += len(blob)
            seq += 1
        if rows and self.bytes + size > self.max_bytes:
            raise SpoolFull(f"{self.bytes + size} bytes would exceed max_bytes={self.max_bytes}")
        ring_rows = []
        next_n: dict[str, int] = {}
        for p in pending:
            ring = self.rings.get(p.source)
            if ring is not None:
                n = next_n.get(p.source, ring.next_n)
                ring_rows.append((p.source, n % ring.size, n, p.digest))
                next_n[p.source] = n + 1
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    db.executemany("INSERT INTO readings VALUES (?, ?)", rows)
                if dead:
                    now = time.time_ns()
                    db.executemany(
                        "INSERT INTO dead_letters(at_ns, source, topic, payload, reason, detail)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        [(now, d.source, d.topic, d.payload, d.reason, d.detail) for d in dead])
                if ring_rows:
                    db.executemany("INSERT OR REPLACE INTO recent VALUES (?, ?, ?, ?)", ring_rows)
                db.executemany("UPDATE meta SET value=? WHERE key=?", [
                    (seq, "next_seq"), (self.readings + len(rows), "readings"),
                    (self.bytes + size, "bytes")])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if "full" in str(exc).lower():
                raise SpoolFull(str(exc)) from exc
            raise
        for source, _, _, digest in ring_rows:
            self.rings[source].push(digest)
        self.next_seq = seq
        self.readings += len(rows)
        self.bytes += size
        return [s for s, _ in rows]

    def claim_redelivery(self, source: str, digest: bytes) -> bool:
        ring = self.rings.get(source)
        return ring is not None and ring.claim(digest)

    # -- send side -------------------------------------------------------------------------

    def read_after(self, seq: int, *, max_rows: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """The next rows with seq > ``seq``, in order, at most ``max_bytes`` (at least one)."""
        cur = self._db.execute("SELECT seq, envelope FROM readings WHERE seq > ? ORDER BY seq "
                               "LIMIT ?", (seq, max_rows))
        out: list[tuple[int, bytes]] = []
        total = 0
        for s, blob in cur:
            if out and total + len(blob) > max_bytes:
                break
            out.append((s, blob))
            total += len(blob)
        cur.close()
        return out

    def release(self, first: int, last: int, rejected: Sequence[tuple[int, str]] = ()) -> None:
        """Forget seqs ``first..last`` (acked); rejected ones are copied to dead letters first."""
        db = self._db
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if rejected:
                    now = time.time_ns()
                    db.executemany(
                        "INSERT INTO dead_letters(at_ns, source, topic, payload, reason, detail)"
                        " SELECT ?, 'uplink', '', envelope, 'rejected', ? FROM readings"
                        " WHERE seq = ?", [(now, reason, s) for s, reason in rejected])
                n, size = db.execute("SELECT count(*), coalesce(sum(length(envelope)), 0) "
                                     "FROM readings WHERE seq BETWEEN ? AND ?",
                                     (first, last)).fetchone()
                db.execute("DELETE FROM readings WHERE seq BETWEEN ? AND ?", (first, last))
                db.executemany("UPDATE meta SET value=? WHERE key=?", [
                    (self.readings - n, "readings"), (self.bytes - size, "bytes")])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.readings -= n
            self.bytes -= size
        finally:
            db.execute("PRAGMA synchronous=FULL")

    def stats(self) -> SpoolStats:
        (dead,) = self._db.execute("SELECT count(*) FROM dead_letters").fetchone()
        return SpoolStats(readings=self.readings, bytes=self.bytes, next_seq=self.next_seq,
                          epoch=self.epoch, dead_letters=dead)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._db.execute("SELECT source, topic, payload, reason, detail FROM dead_letters "
                                "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [DeadLetter(*r) for r in rows]


class AsyncSpool:
    """Runs a ``Spool`` on its own thread; the event loop never waits on an fsync."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self.appended = asyncio.Event()

    async def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def close(self) -> None:
        await self.run(self.spool.close)
        self._pool.shutdown(wait=True)

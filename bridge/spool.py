"""The agent's durable, bounded queue of envelopes between the plant broker and the uplink.

On-disk format (SQLite 3, one file, WAL mode, ``synchronous=FULL`` for appends)
==============================================================================

``meta(key TEXT PRIMARY KEY, value)``
    ``schema_version`` = 1; ``site_id``; ``epoch`` (random, 1..2^63-1, chosen when the file is
    created); ``next_seq`` (the seq the next new envelope gets; never decreases); ``readings``
    and ``bytes`` (running totals of the ``readings`` table, kept in the same transactions so
    that opening a large spool does not scan it); ``created_ns``; ``clock`` (the spool clock's
    last snapshot, JSON, saved with every commit); ``state/<source>/<key>``: a decoder's state
    (Sparkplug birth certificates, see ``bridge.codecs.sparkplug``), written in the same
    transaction as the messages that changed it. A salvaged file starts without it.
``readings(rid INTEGER PRIMARY KEY, envelope BLOB, prio INTEGER, at REAL)``
    One row per message, in commit order (``rid``, local to this file). ``prio`` is its class (0
    telemetry, 1 event, 2 alarm; 99 a tombstone, never dropped); ``at`` is the spool clock
    (``bridge.spoolclock``: elapsed seconds, immune to wall-clock jumps) at commit. ``envelope`` is
    the serialised ``bridge.v1.Envelope``; its identity ``(site_id, epoch, seq)`` is what the ingest
    dedupes on. For envelopes created in this file ``epoch`` is the file's and ``seq`` runs with
    ``rid``; envelopes salvaged from a quarantined file keep their original identity, so a reading
    that was already delivered is recognised as a duplicate, never doubled. Rows are deleted only
    once an ingest node answered COMMITTED or DUPLICATE for them (or REJECTED, after they were
    copied to ``dead_letters``).
``drops(id INTEGER PRIMARY KEY, at_ns, reason, epoch, first_seq, last_seq, count)``
    Every reading a bound forced out (older than ``max_age_s``: ``ttl``; the spool full past
    the backpressure window: ``spool_full``), one row per contiguous seq range. The same range
    is sent on as a *tombstone* envelope (``dropped`` set, no values) in place of the readings,
    so the ingest and the consumers see the gap by name instead of waiting for it.
``dead_letters(id INTEGER PRIMARY KEY, at_ns, source, topic, payload BLOB, reason, detail,
size)``
    Messages that will never be sent (undecodable payloads, ingest rejections), kept for an
    operator; written in the same transaction that lets the broker message be acked.
    ``payload`` holds at most the first ``dead_letter_payload_bytes`` of the message and
    ``size`` its full length. The table is bounded by ``dead_letters_max`` rows and
    ``dead_letters_max_bytes`` (payload, topic and detail), oldest evicted first in the same
    transaction, each eviction counted; its bytes count inside ``max_bytes`` and their bound
    is at most a tenth of it, so dead letters can never fill the spool and stop readings.
    Schema version 1 files (no ``size``) are migrated in place at open.
``recent(source TEXT, slot INTEGER, n INTEGER, digest BLOB, PRIMARY KEY (source, slot))``
    A ring, per source, of the digests of the last ``ring_size`` messages committed (``n``
    counts messages per source; ``slot`` = ``n`` mod ``ring_size``). A broker redelivers
    (MQTT DUP=1, AMQP ``redelivered``) only messages it sent but saw no ack for, and it never
    has more unacked than the receive window, so a ring twice that size holds every message
    that can come back. A *flagged* redelivery whose digest is in the ring is acked without
    being stored again; unflagged identical payloads are separate readings.

Invariants
==========
1. A broker message is acked only after the transaction holding its envelope (or its dead
   letter, or its ring match) has committed with ``synchronous=FULL``: an acked message survives
   a crash or power loss.
2. New envelopes get dense, strictly increasing seqs per (site_id, epoch), never reused:
   ``next_seq`` is stored in the same transaction as the rows it numbers.
3. Deletes are not fsynced on their own (``synchronous=NORMAL`` for them); the WAL is
   append-only, so a crash can only undo recent deletes, whose rows are then resent and
   answered DUPLICATE by the ingest. Never a loss, never a double in the consumed stream.
4. ``meta.readings``/``meta.bytes`` equal the count and total envelope length of ``readings``.
5. ``readings`` bytes plus ``dead_letters`` bytes never exceed ``max_bytes`` through a commit.

Bounds
======
``max_bytes`` bounds the envelope bytes held. A commit that would exceed it raises
``SpoolFull`` and nothing of it is written: the caller stops acking the broker (backpressure),
so readings wait in the broker's persistent session. ``PRAGMA max_page_count`` caps the file a
little above ``max_bytes``, and a full disk (``SQLITE_FULL``, ENOSPC) is ``SpoolFull`` too.

Headroom: deleting rows still writes to the WAL, and a WAL never shrinks by itself. Appends
are refused (``SpoolFull``, backpressure) while the filesystem has less than ``HEADROOM`` (8
MiB, a whole WAL and its checkpoint) free beyond twice the append: the intake never takes the
space deletes need, so acknowledged rows can always be released. When the disk is full anyway
(another process filled it), the spool checkpoints with ``TRUNCATE`` (the WAL's space goes
back to the disk) and retries; ``<path>.reserve``, a preallocated file of ``reserve_bytes``,
is given up if that is not enough: it must cover a checkpoint of the whole WAL, which is kept
at or below 4 MiB (``wal_autocheckpoint`` 1000 pages, ``journal_size_limit``), so
``reserve_bytes`` >= 8 MiB. So the spool can always shrink, and a full disk never wedges it.
While space is tight every release is followed by an incremental vacuum (the file is created
with ``auto_vacuum=INCREMENTAL``) and a truncating checkpoint; the reserve is put back once
the disk has room for it twice over.

Recovery
========
SQLite's WAL recovery handles torn writes after a crash or power loss. A file that SQLite
reports as corrupt (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``: a wrong header, garbage pages, a
truncated file), or whose ``schema_version`` or tables are not this version's, is never
repaired in place and never stops the agent:

1. the file and its ``-wal``/``-shm`` are renamed ``<path>.corrupt-<UTC timestamp>`` (kept for
   an operator, never deleted);
2. every ``readings`` row that can still be read and parses as an envelope of this site is
   copied, in ``rid`` order and with its identity unchanged, into a fresh file with a new
   epoch; what could not be read is counted;
3. a ``spool.quarantined`` event (level error) and counters report it; the agent continues.

This happens at open or, when corruption shows up later, on the operation that hit it; that
operation raises ``SpoolReset`` so callers drop positions (rids) that belonged to the old file.
A spool of another ``site_id`` is a configuration mistake, not corruption: ``SpoolError``.

All methods are synchronous and must be called from one thread (``AsyncSpool`` runs them on a
dedicated thread so fsyncs never block the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import os
import secrets
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import orjson

from bridge._pb import bridge_pb2 as pb
from bridge.files import private_file
from bridge.spoolclock import SpoolClock
from bridge.telemetry import event

SCHEMA_VERSION = 2
DEAD_PAYLOAD_BYTES = 4096
DEAD_MAX = 10_000
WAL_LIMIT = 4 << 20
HEADROOM = 2 * WAL_LIMIT  # free disk kept for deletes: a whole WAL and its checkpoint
_PAGE = 4096
_TABLES = {"meta", "readings", "dead_letters", "recent", "drops"}
TOMBSTONE = 99
PRIORITIES = {"telemetry": 0, "event": 1, "alarm": 2}
_CORRUPT = {"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CORRUPT_INDEX", "SQLITE_CORRUPT_SEQUENCE",
            "SQLITE_CORRUPT_VTAB", "SQLITE_IOERR_SHORT_READ"}

P = ParamSpec("P")
R = TypeVar("R")


class SpoolError(Exception):
    """The spool file cannot be used (it belongs to another site, or its directory is unusable)."""


class SpoolFull(Exception):
    """The commit would exceed ``max_bytes`` or the disk is full; nothing was written."""


class SpoolReset(Exception):
    """The file was found corrupt and replaced (see Recovery); positions (rids) are void."""


class _Corrupt(Exception):
    pass


@dataclass(frozen=True, slots=True)
class DeadLetter:
    source: str
    topic: str
    payload: bytes
    reason: str
    detail: str
    size: int | None = None  # the message's full length when ``payload`` is a prefix


@dataclass(frozen=True, slots=True)
class Pending:
    """One message to append: ``build(seq)`` returns its serialised envelope."""

    source: str
    digest: bytes
    build: Callable[[int], bytes]
    prio: int = 0


@dataclass(frozen=True, slots=True)
class Quarantine:
    moved_to: Path
    reason: str
    salvaged: int
    unreadable: int


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
        if self._count.get(digest, 0) > 0:
            self._drop(digest)
            return True
        return False

    def holds(self, digest: bytes) -> bool:
        """Whether a message with this digest was committed within the ring (consumes nothing)."""
        return digest in self._count

    def push(self, digest: bytes) -> None:
        self.next_n += 1
        if len(self._slots) >= self.size:
            old = self._slots.popleft()
            if self._count.get(old, 0) > 0:
                self._drop(old)
        self._slots.append(digest)
        self._count[digest] += 1

    def __len__(self) -> int:
        """Distinct digests held: bounded by ``size`` (a key at zero is deleted, not kept)."""
        return len(self._count)

    def _drop(self, digest: bytes) -> None:
        n = self._count[digest] - 1
        if n:
            self._count[digest] = n
        else:
            del self._count[digest]


def _text(s: str) -> str:
    """A str SQLite can bind: lone surrogates (from a broken topic) become escapes."""
    try:
        s.encode()
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode()
    return s


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "full" in str(exc)


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name in _CORRUPT or "malformed" in str(exc) or "not a database" in str(exc)


class Spool:
    def __init__(self, *, path: Path, site_id: str, max_bytes: int,
                 ring_sizes: dict[str, int] | None = None, reserve_bytes: int = 0,
                 max_age_s: float = 0.0, clock: SpoolClock | None = None,
                 dead_letter_payload_bytes: int = DEAD_PAYLOAD_BYTES,
                 dead_letters_max: int = DEAD_MAX, dead_letters_max_bytes: int | None = None,
                 on_evict: Callable[[int], None] | None = None) -> None:
        self.path = path
        self.dead_payload_bytes = dead_letter_payload_bytes
        self.dead_max = dead_letters_max
        cap = max_bytes // 10
        self.dead_max_bytes = cap if dead_letters_max_bytes is None else \
            min(dead_letters_max_bytes, cap)
        self._on_evict = on_evict or (lambda n: None)
        self.max_age_s = max_age_s
        self.clock = clock or SpoolClock()
        self.sent_through = 0  # rids at or below were handed to the uplink: never dropped
        # Batches in flight, first rid -> last rid: never dropped either, whichever lane
        # (live or backlog) sent them. Written by ``read_after(hold=True)`` on the spool
        # thread, removed by ``unhold`` when the batch is done.
        self._held: dict[int, int] = {}
        self.site_id = site_id
        self.max_bytes = max_bytes
        self.reserve_bytes = reserve_bytes
        self.reserve = path.with_name(path.name + ".reserve")
        self._tight = False  # the disk was found full: checkpoint after every release
        self.ring_sizes = dict(ring_sizes or {})
        self.generation = 0
        self.quarantines: list[Quarantine] = []
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"{path.parent}: cannot create the spool directory: {exc}") \
                from exc
        try:
            self._open()
        except _Corrupt as exc:
            self._recover(str(exc))
        self._ensure_reserve()

    def _ensure_reserve(self) -> None:
        """Preallocate the headroom file if it is missing and the disk has room for it."""
        if self.reserve_bytes <= 0 or self.reserve.exists():
            return
        st = os.statvfs(self.path.parent)
        if st.f_bavail * st.f_frsize < 2 * self.reserve_bytes:
            return
        try:
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.reserve.unlink(missing_ok=True)
            event("spool.reserve_failed", level=logging.WARNING, path=str(self.reserve),
                  reason=str(exc))
            return
        event("spool.reserve_created", path=str(self.reserve), bytes=self.reserve_bytes)

    # -- opening and recovery ----------------------------------------------------------------

    def _open(self) -> None:
        """Open or create the file; ``_Corrupt`` if it is not a usable spool of this version."""
        try:
            private_file(self.path)  # 0600 (its -wal and -shm follow its mode)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise SpoolError(f"{self.path}: cannot open the spool: {exc}") from exc
        try:
            # Only takes effect on a new file, and must come before anything writes to it:
            # lets a drained spool give its pages back to the disk (see Bounds).
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # The WAL is checkpointed at 1000 pages (4 MiB) and truncated back to 4 MiB after,
            # so it never holds more than the reserve can cover on a full disk.
            self._db.execute("PRAGMA wal_autocheckpoint=1000")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            self._init_schema()
            pages = max(2 * self.max_bytes // _PAGE + 4096, 8192)
            self._db.execute(f"PRAGMA max_page_count={pages}")
            (next_rid,) = self._db.execute(
                "SELECT coalesce(max(rid), 0) + 1 FROM readings").fetchone()
            self._next_rid = int(next_rid)
            self._dead = deque((int(i), int(n)) for i, n in self._db.execute(
                "SELECT id, length(payload) + length(topic) + length(detail) FROM dead_letters"
                " ORDER BY id"))
            self.dead_bytes = sum(n for _, n in self._dead)
            self._drop_totals: Counter[str] = Counter({
                str(r): int(n) for r, n in self._db.execute(
                    "SELECT reason, sum(count) FROM drops GROUP BY reason")})
            self.rings = {}
            for source, size in self.ring_sizes.items():
                rows = self._db.execute("SELECT n, digest FROM recent WHERE source=?",
                                        (source,)).fetchall()
                self.rings[source] = RedeliveryRing(size, rows)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError) and not _is_corruption(exc):
                raise SpoolError(f"{self.path}: cannot open the spool: {exc}") from exc
            raise _Corrupt(f"{type(exc).__name__}: {exc}") from exc
        except _Corrupt:
            self._db.close()
            raise

    def _init_schema(self) -> None:
        db = self._db
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value)")
            db.execute("CREATE TABLE readings(rid INTEGER PRIMARY KEY, envelope BLOB NOT NULL, "
                       "prio INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL DEFAULT 0)")
            db.execute("CREATE TABLE drops(id INTEGER PRIMARY KEY, at_ns INTEGER, reason TEXT, "
                       "epoch INTEGER, first_seq INTEGER, last_seq INTEGER, count INTEGER)")
            db.execute("CREATE TABLE dead_letters(id INTEGER PRIMARY KEY, at_ns INTEGER, "
                       "source TEXT, topic TEXT, payload BLOB, reason TEXT, detail TEXT, "
                       "size INTEGER)")
            db.execute("CREATE TABLE recent(source TEXT, slot INTEGER, n INTEGER, digest BLOB, "
                       "PRIMARY KEY (source, slot)) WITHOUT ROWID")
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema_version", SCHEMA_VERSION), ("site_id", self.site_id),
                ("epoch", secrets.randbelow(2**63 - 1) + 1), ("next_seq", 1),
                ("readings", 0), ("bytes", 0), ("created_ns", time.time_ns()),
            ])
            db.execute("COMMIT")
            tables = set(_TABLES)
        if not tables.issuperset(_TABLES):
            raise _Corrupt(f"missing tables {sorted(_TABLES - tables)}")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema_version") == 1:  # v1 -> v2: dead letters record their full size
            db.execute("BEGIN IMMEDIATE")
            db.execute("ALTER TABLE dead_letters ADD COLUMN size INTEGER")
            db.execute("UPDATE dead_letters SET size = length(payload)")
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,))
            db.execute("COMMIT")
            meta["schema_version"] = SCHEMA_VERSION
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise _Corrupt(f"schema version {meta.get('schema_version')!r}, this agent reads "
                           f"{SCHEMA_VERSION}")
        if meta.get("site_id") != self.site_id:
            db.close()
            raise SpoolError(f"{self.path}: spool belongs to site {meta.get('site_id')!r}, "
                             f"not {self.site_id!r}; point spool.path elsewhere")
        try:
            saved = meta.get("clock")
            self.clock.resume(orjson.loads(saved) if saved else None,
                              max_credit_s=self.max_age_s or 7 * 86400)
            self.epoch: int = int(meta["epoch"])
            self.next_seq: int = int(meta["next_seq"])
            self.readings: int = int(meta["readings"])
            self.bytes: int = int(meta["bytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _Corrupt(f"unreadable meta: {exc}") from exc

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
        event("spool.quarantined", level=logging.ERROR, spool=str(self.path),
              moved_to=str(moved), reason=reason, salvaged=q.salvaged, unreadable=unreadable,
              new_epoch=f"{self.epoch:016x}")

    def _append_salvaged(self, blobs: list[bytes]) -> None:
        db = self._db
        size = sum(len(b) for b in blobs)
        first = self._next_rid
        db.execute("BEGIN IMMEDIATE")
        try:
            now = self.clock.now()
            # A salvaged tombstone stays a tombstone (never dropped again, so its range
            # survives); readings start over in the lowest class.
            db.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)",
                           [(first + i, b, TOMBSTONE if _is_tombstone(b) else 0, now)
                            for i, b in enumerate(blobs)])
            db.executemany("UPDATE meta SET value=? WHERE key=?", [
                (self.readings + len(blobs), "readings"), (self.bytes + size, "bytes")])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
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

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.save_clock()
        self._db.close()

    def save_clock(self) -> None:
        """Persist the spool clock (also done by every commit), so ages survive a restart."""
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('clock', ?)",
                         (orjson.dumps(self.clock.snapshot()).decode(),))

    # -- append side -----------------------------------------------------------------------

    def commit(self, pending: Sequence[Pending], dead: Sequence[DeadLetter] = (),
               state: Mapping[str, bytes | None] | None = None) -> list[int]:
        """Append envelopes and dead letters in one durable transaction; returns their rids.

        ``state`` maps ``<source>/<key>`` to a decoder's new state (None deletes it).
        """
        return self._guard(lambda: self._commit(pending, dead, state or {}))

    def load_state(self, source: str) -> dict[str, bytes]:
        """A source's decoder state, by key (without the ``state/<source>/`` prefix)."""
        prefix = f"state/{source}/"
        rows = self._guard(lambda: self._db.execute(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
            (len(prefix), prefix)).fetchall())
        return {str(k)[len(prefix):]: bytes(v) for k, v in rows}

    def _commit(self, pending: Sequence[Pending], dead: Sequence[DeadLetter],
                state: Mapping[str, bytes | None]) -> list[int]:
        seq, rid = self.next_seq, self._next_rid
        at = self.clock.now()
        rows: list[tuple[int, bytes, int, float]] = []
        size = 0
        for p in pending:
            blob = p.build(seq)
            rows.append((rid, blob, p.prio, at))
            size += len(blob)
            seq += 1
            rid += 1
        if rows and self.bytes + self.dead_bytes + size > self.max_bytes:
            raise SpoolFull(f"{self.bytes + self.dead_bytes + size} bytes (dead letters "
                            f"included) would exceed max_bytes={self.max_bytes}")
        if rows:
            self._keep_headroom(size)
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
                    db.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)", rows)
                dead_rows = self._insert_dead(dead) if dead else None
                if ring_rows:
                    db.executemany("INSERT OR REPLACE INTO recent VALUES (?, ?, ?, ?)", ring_rows)
                for key, value in state.items():
                    if value is None:
                        db.execute("DELETE FROM meta WHERE key=?", (f"state/{key}",))
                    else:
                        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                   (f"state/{key}", value))
                db.executemany("UPDATE meta SET value=? WHERE key=?", [
                    (seq, "next_seq"), (self.readings + len(rows), "readings"),
                    (self.bytes + size, "bytes")])
                self.save_clock()
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                self._tight = True
                self._truncate_wal()
                raise SpoolFull(str(exc)) from exc
            raise
        if dead_rows is not None:
            self._dead_committed(*dead_rows)
        for source, _, _, digest in ring_rows:
            self.rings[source].push(digest)
        self.next_seq = seq
        self._next_rid = rid
        self.readings += len(rows)
        self.bytes += size
        return [r for r, _, _, _ in rows]

    def _keep_headroom(self, size: int) -> None:
        """Refuse an append that would leave the filesystem less than ``HEADROOM`` free.

        Deletes of acknowledged rows need WAL space on the disk (see Headroom); pages freed
        inside the file do not help them. The intake never takes that space, so however long
        the disk stays full, the uplink can always release what the clouds acknowledged, and
        the freed space lets the intake move again: the spool cannot wedge itself.
        """
        st = os.statvfs(self.path.parent)
        free = st.f_bavail * st.f_frsize
        # A commit of ``size`` bytes writes them to the WAL and later into the file's pages.
        if free - 2 * size < HEADROOM:
            self._tight = True
            raise SpoolFull(f"disk: {free} bytes free; an append of {size} bytes would leave "
                            f"less than the {HEADROOM} that deletes need")

    # -- dead letters -----------------------------------------------------------------------

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

    # -- drops ------------------------------------------------------------------------------

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

        return self._guard(lambda: self._drop(pick(), "ttl"))

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

        return self._guard(lambda: self._drop(pick(), "spool_full"))

    def commit_dropped(self, pending: Sequence[Pending], reason: str) -> int:
        """``reject_new``: number the messages but keep only tombstones; returns how many."""
        def run() -> int:
            # next_seq moves only with the transaction that records the tombstone: a failed
            # commit must not leave numbered seqs that no row and no tombstone accounts for.
            first = self.next_seq
            return self._drop([], reason, extra=[(self.epoch, first, first + len(pending) - 1)],
                              next_seq=first + len(pending))
        return self._guard(run) if pending else 0

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
        freed = sum(len(b) for _, b, _ in rows)
        added = sum(len(s) for s in stones)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
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
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
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

    @property
    def last_rid(self) -> int:
        """The rid of the newest row (0 when none was ever written to this file)."""
        return self._next_rid - 1

    def claim_redelivery(self, source: str, digest: bytes) -> bool:
        ring = self.rings.get(source)
        return ring is not None and ring.claim(digest)

    def recently_committed(self, source: str, digest: bytes) -> bool:
        ring = self.rings.get(source)
        return ring is not None and ring.holds(digest)

    # -- send side -------------------------------------------------------------------------

    def _holds(self) -> list[tuple[int, int]]:
        return list(self._held.items())  # one C call: atomic against the loop's unhold

    def unhold(self, first: int) -> None:
        """The batch starting at rid ``first`` is done (acked or abandoned at shutdown)."""
        self._held.pop(first, None)

    def read_after(self, rid: int, *, max_rows: int, max_bytes: int,
                   hold: bool = False) -> list[tuple[int, bytes]]:
        """The next rows with rid > ``rid``, in order, at most ``max_bytes`` (at least one).

        ``hold``: the rows go into a batch; no bound drops them until ``unhold``.
        """
        def read() -> list[tuple[int, bytes]]:
            cur = self._db.execute("SELECT rid, envelope FROM readings WHERE rid > ? "
                                   "ORDER BY rid LIMIT ?", (rid, max_rows))
            out: list[tuple[int, bytes]] = []
            total = 0
            for r, blob in cur:
                if out and total + len(blob) > max_bytes:
                    break
                out.append((r, blob))
                total += len(blob)
            cur.close()
            if hold and out:
                self._held[out[0][0]] = out[-1][0]
            return out
        return self._guard(read)

    def release(self, first: int, last: int, rejected: Sequence[tuple[int, str]] = (), *,
                generation: int | None = None) -> None:
        """Forget rids ``first..last`` (acked); rejected ones are copied to dead letters first.

        ``generation`` is the file generation the rids were read from: after a quarantine the
        old rids mean nothing and the call does nothing.
        """
        if generation is not None and generation != self.generation:
            return
        remedies = [self._truncate_wal, self._give_up_reserve]
        while True:
            try:
                self._guard(lambda: self._release(first, last, rejected))
                break
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                self._tight = True
                if not remedies:
                    raise SpoolFull(f"cannot delete acknowledged rows: {exc}") from exc
                remedies.pop(0)()
        if self._tight:
            self._truncate_wal()
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize >= 2 * max(self.reserve_bytes, 1 << 20):
                self._tight = False
                self._ensure_reserve()

    def _give_up_reserve(self) -> None:
        if self.reserve.exists():
            self.reserve.unlink()
            event("spool.reserve_used", level=logging.WARNING, path=str(self.reserve),
                  reason="disk full: headroom released so acknowledged rows can be deleted")
        self._truncate_wal()

    def _truncate_wal(self) -> None:
        """Return free pages and the WAL's space to the filesystem (checkpoint, truncate)."""
        with contextlib.suppress(sqlite3.Error):
            # executescript steps it to completion; execute() frees a single page.
            self._db.executescript("PRAGMA incremental_vacuum;")
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _release(self, first: int, last: int, rejected: Sequence[tuple[int, str]]) -> None:
        db = self._db
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                dead_rows = None
                if rejected:
                    blobs = dict(db.execute(
                        "SELECT rid, envelope FROM readings WHERE rid BETWEEN ? AND ?",
                        (min(r for r, _ in rejected), max(r for r, _ in rejected))))
                    dead_rows = self._insert_dead([
                        DeadLetter("uplink", "", bytes(blobs[r]), "rejected", reason)
                        for r, reason in rejected if r in blobs])
                n, size = db.execute("SELECT count(*), coalesce(sum(length(envelope)), 0) "
                                     "FROM readings WHERE rid BETWEEN ? AND ?",
                                     (first, last)).fetchone()
                db.execute("DELETE FROM readings WHERE rid BETWEEN ? AND ?", (first, last))
                db.executemany("UPDATE meta SET value=? WHERE key=?", [
                    (self.readings - n, "readings"), (self.bytes - size, "bytes")])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self.readings -= n
            self.bytes -= size
            if dead_rows is not None:
                self._dead_committed(*dead_rows)
        finally:
            db.execute("PRAGMA synchronous=FULL")

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._guard(lambda: self._db.execute(
            "SELECT source, topic, payload, reason, detail FROM dead_letters ORDER BY id DESC "
            "LIMIT ?", (limit,)).fetchall())
        return [DeadLetter(*r) for r in rows]


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


def _within(rid: int, held: list[tuple[int, int]]) -> bool:
    return any(a <= rid <= b for a, b in held)


def _is_tombstone(blob: bytes) -> bool:
    return pb.Envelope.FromString(blob).HasField("dropped")


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

"""The ingest node's SQLite store: committed readings plus the durable dedupe ledger.

Format: ``readings(offset INTEGER PRIMARY KEY AUTOINCREMENT, site_id, epoch, seq, envelope,
commit_ns, last_seq, reason)`` with ``UNIQUE(site_id, epoch, seq)``; ``ledger(site_id, epoch,
watermark, committed)`` holds each stream's ``bridge.cloud.store.ledger`` watermark and count. One
transaction per batch (``synchronous=FULL``) holds the new rows and the ledger change together,
so after a crash the ledger and the rows agree. ``offset`` is this node's commit order, used to
follow new commits; epochs are unsigned 64-bit on the wire and stored as signed 64-bit.

The ledger's intervals above the watermark are not stored separately: they are exactly the
stream's rows above the watermark (a reading is its seq, a tombstone its range
``seq..last_seq``), read back through the unique index at open. Rows never overlap: a
tombstone that overlaps known seqs is stored as its new sub-ranges only (``Store.commit``), so
rows and ledger agree in either order of arrival and across a reopen. A stream is created by
its first commit; at most ``max_epochs_per_site`` exist per site (``too_many_epochs``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bridge.cloud.store.backend import StreamState
from bridge.cloud.store.fair import FairExecutor
from bridge.cloud.store.ledger import TOO_MANY_GAPS, Key, Ledger, Overlay, StreamLedger
from bridge.cloud.store.records import COMMITTED, DUPLICATE, Incoming, narrow
from bridge.shared import defaults as D
from bridge.shared.files import private_file
from bridge.shared.pacing import wait_event


def to_i64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def to_u64(i: int) -> int:
    return i + (1 << 64) if i < 0 else i


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

    def __init__(self, *, path: Path, max_epochs_per_site: int = D.MAX_EPOCHS_PER_SITE,
                 max_gaps_per_stream: int = D.MAX_GAPS_PER_STREAM,
                 busy_timeout_s: float = 2.0) -> None:
        self.path = path
        self.max_epochs_per_site = max_epochs_per_site
        self.max_gaps_per_stream = max_gaps_per_stream
        path.parent.mkdir(parents=True, exist_ok=True)
        private_file(path)
        db = self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                        timeout=busy_timeout_s)
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
            known = stream.committed
            for seq, last in db.execute("SELECT seq, last_seq FROM readings WHERE site_id=?"
                                        " AND epoch=? AND seq>? ORDER BY seq",
                                        (site, to_i64(epoch), stream.watermark)):
                stream.add_range(seq, seq if last is None else last)
            stream.committed = known  # the stored count already includes them

    def commit(self, batch: Sequence[Incoming]) -> list[str]:
        """Commit what is new; per item ``COMMITTED``, ``DUPLICATE`` or a rejection reason.

        A tombstone that overlaps seqs already known (readings or other tombstones, stored or
        earlier in this batch) is stored as the sub-ranges that are new, each as a row of its
        own, so the rows are always exactly the ledger's known set above the watermark and the
        two agree after a reopen, whatever the order of arrival. A reading covered by a known
        tombstone is a DUPLICATE: its seq is already accounted for.
        """
        out: list[str] = []
        rows = []
        plans: dict[Key, Overlay] = {}
        fresh: dict[Key, StreamLedger] = {}  # streams this batch creates
        now = time.time_ns()
        for item in batch:
            key = (item.site_id, item.epoch)
            plan = plans.get(key)
            if plan is None:
                cur = self.ledger.streams.get(key)
                if cur is None:
                    if self.ledger.epochs(item.site_id) + sum(
                            1 for k in fresh if k[0] == item.site_id) >= \
                            self.max_epochs_per_site:
                        out.append("too_many_epochs")
                        continue
                    cur = fresh[key] = StreamLedger()
                plan = plans[key] = Overlay(cur, max_gaps=self.max_gaps_per_stream)
            last = item.seq if item.last_seq is None else item.last_seq
            new = plan.take(item.seq, last)
            if new is None:
                out.append(TOO_MANY_GAPS)
                continue
            if not new:
                out.append(DUPLICATE)
                continue
            out.append(COMMITTED)
            for a, b in new:
                blob = item.envelope if (a, b) == (item.seq, last) else \
                    narrow(item.envelope, a, b)
                rows.append((item.site_id, to_i64(item.epoch), a, blob, now,
                             None if item.last_seq is None else b, item.reason or None))
        if not rows:
            return out
        after = {key: plan.after() for key, plan in plans.items() if plan.adding.above}
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO readings(site_id, epoch, seq, envelope,"
                           " commit_ns, last_seq, reason) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            db.executemany("INSERT OR REPLACE INTO ledger VALUES (?, ?, ?, ?)",
                           [(site, to_i64(epoch), wm, n)
                            for (site, epoch), (wm, n) in after.items()])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        for key, plan in plans.items():
            plan.apply()
            if key in fresh and plan.adding.above:
                self.ledger.put(key, plan.base)
        return out

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

    KEY_PAGE = ("SELECT offset, site_id, epoch, seq, envelope, commit_ns FROM readings"
                " WHERE site_id = ? AND epoch = ? AND seq > ? AND offset <= ?"
                " ORDER BY seq LIMIT ?")

    def key_page(self, site: str, epoch: int, after_seq: int, upto_offset: int,
                 limit: int = 1000) -> list[Row]:
        """One (site, epoch)'s rows with seq > ``after_seq``, by seq, through the unique
        index: a cursor seeks, it never scans what it has already read."""
        rows = self._db.execute(self.KEY_PAGE, (site, to_i64(epoch), after_seq, upto_offset,
                                                limit)).fetchall()
        return [Row(o, s, to_u64(e), q, env, c) for o, s, e, q, env, c in rows]

    def plan(self, sql: str, args: tuple[object, ...]) -> str:
        """SQLite's query plan for ``sql`` (tests check that cursors use the index)."""
        return " ".join(str(r[-1]) for r in self._db.execute(f"EXPLAIN QUERY PLAN {sql}", args))

    def close(self) -> None:
        self._db.close()


_PAGE = 1000


class SqliteBackend:
    """``Store`` behind the seam: one writer thread (every commit), a small reader pool."""

    def __init__(self, *, store: Store) -> None:
        self.store = store
        self.max_epochs_per_site = store.max_epochs_per_site
        self.max_gaps_per_stream = store.max_gaps_per_stream
        self.ledger: Ledger = store.ledger
        self._writer = FairExecutor(name="store-writer")
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-reader")
        self._committed = asyncio.Event()
        self.inline_commit: Callable[[Sequence[Incoming]], list[str]] | None = store.commit
        self.executor = self._writer

    def committed_now(self) -> None:
        """Wake followers after an inline commit (called on the event loop)."""
        ev, self._committed = self._committed, asyncio.Event()
        ev.set()

    def watermark(self, key: Key) -> int | None:
        s = self.ledger.streams.get(key)
        return s.watermark if s is not None else None

    def sites(self) -> dict[str, tuple[int, int]]:
        newest: dict[str, tuple[int, int]] = {}
        count: dict[str, int] = {}
        for (site, epoch), stream in list(self.ledger.streams.items()):
            count[site] = count.get(site, 0) + 1
            if site not in newest or epoch > newest[site][0]:
                newest[site] = (epoch, stream.watermark)
        return {site: (wm, count[site]) for site, (_, wm) in newest.items()}

    async def start(self) -> None:
        return None

    async def commit(self, batch: Sequence[Incoming]) -> list[str]:
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._writer, self.store.commit, batch)
        if COMMITTED in out:
            ev, self._committed = self._committed, asyncio.Event()
            ev.set()
        return out

    async def status(self) -> list[StreamState]:
        loop = asyncio.get_running_loop()
        reader = Reader(self.store.path)
        try:
            dropped = await loop.run_in_executor(self._readers, reader.dropped)
        finally:
            await loop.run_in_executor(self._readers, reader.close)
        by_key: dict[Key, list[tuple[int, int, str]]] = {}
        for site, epoch, first, last, reason in dropped:
            by_key.setdefault((site, epoch), []).append((first, last, reason))
        return [(key, s.copy(), by_key.get(key, []))
                for key, s in sorted(list(self.ledger.streams.items()))]

    async def read(self, *, follow: bool, cursors: dict[Key, int] | None = None
                   ) -> AsyncIterator[tuple[bytes, int]]:
        """What was committed up to now, stream by stream from each cursor (an index seek
        per (site, epoch): the cost grows with what is read, not with what is stored); then,
        with ``follow``, every later commit in commit order."""
        loop = asyncio.get_running_loop()
        reader = Reader(self.store.path)
        cursors = cursors or {}
        try:
            upto = await loop.run_in_executor(self._readers, reader.max_offset)
            for site, epoch in sorted(list(self.ledger.streams)):
                after = cursors.get((site, epoch), 0)
                while True:
                    rows = await loop.run_in_executor(self._readers, reader.key_page, site,
                                                      epoch, after, upto, _PAGE)
                    for r in rows:
                        yield r.envelope, r.commit_ns
                    if len(rows) < _PAGE:
                        break
                    after = rows[-1].seq
            if not follow:
                return
            offset = upto
            while True:
                waiter = self._committed
                rows = await loop.run_in_executor(self._readers, reader.page, offset, _PAGE)
                for r in rows:
                    offset = r.offset
                    yield r.envelope, r.commit_ns
                if len(rows) < _PAGE:
                    await wait_event(waiter, 1.0)
        finally:
            await loop.run_in_executor(self._readers, reader.close)

    async def close(self, timeout: float = 5.0) -> bool:
        """Stop the threads; True once the writer is idle (then the file is closed)."""
        done = threading.Event()
        self._writer.submit(done.set)
        self._writer.shutdown(wait=False, cancel_futures=False)
        self._readers.shutdown(wait=False, cancel_futures=True)
        idle = await asyncio.get_running_loop().run_in_executor(None, done.wait, timeout)
        if idle:
            self.store.close()
        return idle

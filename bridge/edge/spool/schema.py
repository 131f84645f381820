"""Opening a spool file: pragmas, the schema and its migrations, the meta row."""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections import Counter

import orjson

from bridge.edge.spool.base import (
    _PAGE,
    _TABLES,
    SCHEMA_VERSION,
    WAL_LIMIT,
    SpoolState,
    _Corrupt,
    _is_corruption,
    transaction,
)
from bridge.shared.errors import SpoolError
from bridge.shared.files import private_file


class Schema(SpoolState):
    """Mixed into ``Spool``; see the package docstring."""

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
            self._reload_dead()
            self._drop_totals: Counter[str] = Counter({
                str(r): int(n) for r, n in self._db.execute(
                    "SELECT reason, sum(count) FROM drops GROUP BY reason")})
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
            with transaction(db):
                db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value)")
                db.execute("CREATE TABLE readings(rid INTEGER PRIMARY KEY, envelope BLOB NOT NULL, "
                           "prio INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL DEFAULT 0)")
                db.execute("CREATE TABLE drops(id INTEGER PRIMARY KEY, at_ns INTEGER, reason TEXT, "
                           "epoch INTEGER, first_seq INTEGER, last_seq INTEGER, count INTEGER)")
                db.execute("CREATE TABLE dead_letters(id INTEGER PRIMARY KEY, at_ns INTEGER, "
                           "source TEXT, topic TEXT, payload BLOB, reason TEXT, detail TEXT, "
                           "size INTEGER, attempts INTEGER NOT NULL DEFAULT 0, "
                           "last_attempt_ns INTEGER)")
                db.execute("CREATE TABLE recent(source TEXT, slot INTEGER, n INTEGER, digest BLOB, "
                           "PRIMARY KEY (source, slot)) WITHOUT ROWID")
                db.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("schema_version", SCHEMA_VERSION), ("site_id", self.site_id),
                    ("epoch", secrets.randbelow(2**63 - 1) + 1), ("next_seq", 1),
                    ("readings", 0), ("bytes", 0), ("created_ns", time.time_ns()),
                ])
            tables = set(_TABLES)
        if not tables.issuperset(_TABLES):
            raise _Corrupt(f"missing tables {sorted(_TABLES - tables)}")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema_version") == 1:  # v1 -> v2: dead letters record their full size
            with transaction(db):
                db.execute("ALTER TABLE dead_letters ADD COLUMN size INTEGER")
                db.execute("UPDATE dead_letters SET size = length(payload)")
                db.execute("UPDATE meta SET value=? WHERE key='schema_version'",
                           (SCHEMA_VERSION,))
            meta["schema_version"] = SCHEMA_VERSION
        columns = {r[1] for r in db.execute("PRAGMA table_info(dead_letters)")}
        if "attempts" not in columns:  # added within version 2: older agents ignore them
            with transaction(db):
                db.execute("ALTER TABLE dead_letters ADD COLUMN attempts INTEGER NOT NULL "
                           "DEFAULT 0")
                db.execute("ALTER TABLE dead_letters ADD COLUMN last_attempt_ns INTEGER")
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

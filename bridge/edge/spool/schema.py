"""Opening a spool file: pragmas, the schema and its migrations, the meta row."""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence

import orjson

from bridge.edge.spool.base import (
    _PAGE,
    _TABLES,
    SCHEMA_VERSION,
    WAL_LIMIT,
    _Corrupt,
    _is_corruption,
    transaction,
)
from bridge.edge.spool.file import SpoolFile
from bridge.shared.errors import SpoolError
from bridge.shared.files import private_file


def open_file(f: SpoolFile, *, load: Sequence[Callable[[], None]] = ()) -> None:
    """Open or create ``f.path`` and read its meta row into ``f``; ``_Corrupt`` if it is not a
    usable spool of this version. ``load`` are the parts' readers of what they keep in
    memory (dead letters, drop totals), run on the open file under the same verdict: an
    unreadable table is corruption, as an unreadable meta row is."""
    try:
        private_file(f.path)  # 0600 (its -wal and -shm follow its mode)
        f.db = sqlite3.connect(f.path, isolation_level=None, check_same_thread=False)
    except (sqlite3.DatabaseError, OSError) as exc:
        raise SpoolError(f"{f.path}: cannot open the spool: {exc}") from exc
    db = f.db
    try:
        # Only takes effect on a new file, and must come before anything writes to it:
        # lets a drained spool give its pages back to the disk (see Bounds).
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        # The WAL is checkpointed at 1000 pages (4 MiB) and truncated back to 4 MiB after,
        # so it never holds more than the reserve can cover on a full disk.
        db.execute("PRAGMA wal_autocheckpoint=1000")
        db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        _init_schema(f)
        pages = max(2 * f.max_bytes // _PAGE + 4096, 8192)
        db.execute(f"PRAGMA max_page_count={pages}")
        (next_rid,) = db.execute("SELECT coalesce(max(rid), 0) + 1 FROM readings").fetchone()
        f.next_rid = int(next_rid)
        for fn in load:
            fn()
    except sqlite3.DatabaseError as exc:
        db.close()
        if isinstance(exc, sqlite3.OperationalError) and not _is_corruption(exc):
            raise SpoolError(f"{f.path}: cannot open the spool: {exc}") from exc
        raise _Corrupt(f"{type(exc).__name__}: {exc}") from exc
    except _Corrupt:
        db.close()
        raise


def _init_schema(f: SpoolFile) -> None:
    db = f.db
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
                ("schema_version", SCHEMA_VERSION), ("site_id", f.site_id),
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
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,))
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
    if meta.get("site_id") != f.site_id:
        db.close()
        raise SpoolError(f"{f.path}: spool belongs to site {meta.get('site_id')!r}, "
                         f"not {f.site_id!r}; point spool.path elsewhere")
    try:
        saved = meta.get("clock")
        f.clock.resume(orjson.loads(saved) if saved else None,
                       max_credit_s=f.max_age_s or 7 * 86400)
        f.epoch = int(meta["epoch"])
        f.next_seq = int(meta["next_seq"])
        f.readings = int(meta["readings"])
        f.bytes = int(meta["bytes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _Corrupt(f"unreadable meta: {exc}") from exc

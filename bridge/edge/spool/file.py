"""``SpoolFile``: the open spool file and the figures its ``meta`` table keeps, the one piece
of state every part of the spool works on (the package docstring gives the format).

``Spool`` creates it and hands the same object to each part (schema, recovery, headroom,
bounds, the send side, dead letters); a part changes the file and these figures only inside
the transactions it runs, on the spool's thread. Other threads read only its fresh tail
(under the tail's lock); the figures they see are the ``SpoolFigures`` the spool publishes
after each operation (``bridge.edge.spool.core``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import orjson

from bridge.edge.spool.clock import SpoolClock
from bridge.edge.spool.fresh import FreshTail


class SpoolFile:
    """One spool file's connection and running figures; used on the spool's thread only."""

    db: sqlite3.Connection  # set by ``bridge.edge.spool.schema.open_file``

    def __init__(self, *, path: Path, site_id: str, max_bytes: int, max_age_s: float,
                 clock: SpoolClock) -> None:
        self.path, self.site_id, self.clock = path, site_id, clock
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        # From the meta row (schema.open_file), then kept in step with every transaction.
        self.epoch = 0
        self.next_seq = 1
        self.readings = 0
        self.bytes = 0
        self.next_rid = 1
        self.generation = 0  # bumped when a corrupt file is replaced (Recovery)
        self.tight = False   # the disk was found full: checkpoint after every release
        self.fresh = FreshTail()  # the newest rows, for the sender (bridge.edge.spool.fresh)

    @property
    def last_rid(self) -> int:
        """The rid of the newest row (0 when none was ever written to this file)."""
        return self.next_rid - 1

    def save_clock(self) -> None:
        """Persist the spool clock (every commit does too), so ages survive a restart."""
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('clock', ?)",
                        (orjson.dumps(self.clock.snapshot()).decode(),))

    def truncate_wal(self) -> None:
        """Return free pages and the WAL's space to the filesystem (checkpoint, truncate)."""
        with contextlib.suppress(sqlite3.Error):
            # executescript steps it to completion; execute() frees a single page.
            self.db.executescript("PRAGMA incremental_vacuum;")
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

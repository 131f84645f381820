"""Full disks: the reserve file and the free space deletes need (see Headroom)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3

from bridge.edge.spool.base import HEADROOM, SpoolState
from bridge.shared.errors import SpoolFull
from bridge.shared.telemetry import event


class Headroom(SpoolState):
    """Mixed into ``Spool``; see the package docstring."""

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

"""Full disks: the reserve file and the free space deletes need (see Headroom)."""

from __future__ import annotations

import logging
import os

from bridge.edge.spool.base import HEADROOM
from bridge.edge.spool.file import SpoolFile
from bridge.shared.errors import SpoolFull
from bridge.shared.telemetry import event


class Headroom:
    """Keeps the space deletes need: refuses appends that would take it, holds the reserve
    file and gives it up when the disk is full anyway."""

    def __init__(self, *, file: SpoolFile, reserve_bytes: int) -> None:
        self.file = file
        self.reserve_bytes = reserve_bytes
        self.reserve = file.path.with_name(file.path.name + ".reserve")

    def ensure_reserve(self) -> None:
        """Preallocate the headroom file if it is missing and the disk has room for it."""
        if self.reserve_bytes <= 0 or self.reserve.exists():
            return
        st = os.statvfs(self.file.path.parent)
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

    def keep(self, size: int) -> None:
        """Refuse an append that would leave the filesystem less than ``HEADROOM`` free.

        Deletes of acknowledged rows need WAL space on the disk (see Headroom); pages freed
        inside the file do not help them. The intake never takes that space, so however long
        the disk stays full, the uplink can always release what the clouds acknowledged, and
        the freed space lets the intake move again: the spool cannot wedge itself.
        """
        st = os.statvfs(self.file.path.parent)
        free = st.f_bavail * st.f_frsize
        # A commit of ``size`` bytes writes them to the WAL and later into the file's pages.
        if free - 2 * size < HEADROOM:
            self.file.tight = True
            raise SpoolFull(f"disk: {free} bytes free; an append of {size} bytes would leave "
                            f"less than the {HEADROOM} that deletes need")

    def give_up_reserve(self) -> None:
        if self.reserve.exists():
            self.reserve.unlink()
            event("spool.reserve_used", level=logging.WARNING, path=str(self.reserve),
                  reason="disk full: headroom released so acknowledged rows can be deleted")
        self.file.truncate_wal()

    def after_release(self) -> None:
        """While space is tight, give pages back after each release; once the disk has room
        for the reserve twice over, put the reserve back."""
        if not self.file.tight:
            return
        self.file.truncate_wal()
        st = os.statvfs(self.file.path.parent)
        if st.f_bavail * st.f_frsize >= 2 * max(self.reserve_bytes, 1 << 20):
            self.file.tight = False
            self.ensure_reserve()

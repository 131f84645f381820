"""Elapsed time for spool ages that a wall-clock jump cannot fool.

Within one boot the clock is ``CLOCK_BOOTTIME`` (monotonic, counts suspend): an NTP step of
hours after a power cut changes nothing. The reading is saved with every spool commit together
with the boot id; after an agent restart in the same boot the elapsed time is exact. After a
reboot the only witness of the downtime is the wall clock, so the downtime is credited from it
only when plausible (between 0 and ``max_credit_s``, which the spool sets to its maximum age);
otherwise nothing is credited and ``spool.clock_implausible`` is logged. So a wrong clock can
make readings live longer by at most one maximum age, never expire them early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.shared.telemetry import event

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def read_boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


class SpoolClock:
    def __init__(self, *, boottime: Callable[[], float] | None = None,
                 wall: Callable[[], float] = time.time,
                 boot_id: Callable[[], str] = read_boot_id) -> None:
        self._boottime = boottime or (lambda: time.clock_gettime(time.CLOCK_BOOTTIME))
        self._wall = wall
        self._boot_id = boot_id()
        self._origin = self._boottime()
        self._base = 0.0

    def resume(self, saved: dict[str, Any] | None, *, max_credit_s: float) -> None:
        """Continue from a saved snapshot (``snapshot()`` of a previous run)."""
        if not saved:
            return
        try:
            clock, boottime, wall = (float(saved["clock"]), float(saved["boottime"]),
                                     float(saved["wall"]))
            boot_id = str(saved["boot_id"])
        except (KeyError, TypeError, ValueError):
            return
        self._origin = self._boottime()
        if boot_id and boot_id == self._boot_id:
            self._base = clock + max(0.0, self._origin - boottime)
            return
        downtime = self._wall() - wall
        if 0.0 <= downtime <= max_credit_s:
            self._base = clock + downtime
        else:
            self._base = clock
            event("spool.clock_implausible", level=logging.WARNING, downtime_s=round(downtime),
                  reason="wall clock across a reboot is outside 0..max_age; downtime not "
                         "counted")

    def now(self) -> float:
        return self._base + (self._boottime() - self._origin)

    def snapshot(self) -> dict[str, Any]:
        return {"clock": self.now(), "boottime": self._boottime(), "wall": self._wall(),
                "boot_id": self._boot_id}

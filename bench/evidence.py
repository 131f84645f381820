"""What the benchmark checks instead of assuming: each system's durability, and its CPU time.

A peer's guarantee is the one its files prove. ``FileWatch`` records the states (modification
time, size) of a persistence file or store directory seen after a run began; a system's
``verify()`` fails the run when nothing was written, when its log shows a save failing, or
when a server reports a sync setting other than the one its column claims. (A mosquitto
started as root drops to the ``mosquitto`` user and cannot write a root-owned directory: it
logs "Error saving in-memory database" and runs from memory, which this module exists to
catch.)

``CpuMeter`` reads utime + stime of each of a system's processes from ``/proc/PID/stat`` at
the start and the end of a timed window: every thread of the process is included, children
are not (no system here forks workers). ``TierMeter`` adds the CPU the host took meanwhile
(steal, from ``/proc/stat``): this machine's speed drifts, and steal says whether the host
took the time (on 2026-12-08 it did not: the drift showed in the CPU time per reading).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


class GuaranteeNotMet(RuntimeError):
    """A system did not do what its column in the report says it does."""


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by process ``pid`` (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuMeter:
    """CPU seconds per named process over a window (``start`` ... ``stop``)."""

    def __init__(self, *, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._start = {role: cpu_seconds(pid) for role, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {role: cpu_seconds(pid) - self._start[role] for role, pid in self.pids.items()}


def steal_seconds() -> float:
    """CPU seconds the host has taken from this machine so far, all CPUs (/proc/stat)."""
    return int(Path("/proc/stat").read_text().split()[8]) / _TICK


@dataclass
class TierMeter:
    """A tier's processes metered over one window: their CPU, the share of it the ``part``
    processes used, and the CPU the host took meanwhile (steal)."""

    pids: dict[str, int]
    part: set[str]
    seconds: float = 0.0
    part_s: float = 0.0
    steal_s: float = 0.0
    _meter: CpuMeter | None = None
    _steal0: float = 0.0

    def start(self) -> None:
        self._meter, self._steal0 = CpuMeter(pids=self.pids), steal_seconds()

    def stop(self) -> None:
        assert self._meter is not None
        used = self._meter.stop()
        self.seconds = sum(used.values())
        self.part_s = sum(v for k, v in used.items() if k in self.part)
        self.steal_s = steal_seconds() - self._steal0


def per_million(seconds: float, readings: int) -> float:
    return round(seconds / readings * 1e6, 2) if readings else 0.0


def _state(paths: tuple[Path, ...]) -> tuple[int, int] | None:
    """(newest mtime, total size) over some files, or every file under some directories."""
    newest = total = 0
    found = False
    for path in paths:
        files = [path] if not path.is_dir() else [
            Path(root) / name for root, _, names in os.walk(path) for name in names]
        for file in files:
            try:
                st = file.stat()
            except FileNotFoundError:  # absent yet, or a temporary file renamed away
                continue
            found = True
            newest, total = max(newest, st.st_mtime_ns), total + st.st_size
    return (newest, total) if found else None


class FileWatch:
    """The writes of one persistence file (or store directory) seen since ``begin()``."""

    def __init__(self, *, paths: tuple[Path, ...], what: str) -> None:
        self.paths, self.what = paths, what
        self._since = time.time_ns()
        self.states: set[tuple[int, int]] = set()

    def begin(self) -> None:
        self._since, self.states = time.time_ns(), set()

    def poll(self) -> None:
        state = _state(self.paths)
        if state is not None and state[0] >= self._since and state[1] > 0:
            self.states.add(state)

    @property
    def writes(self) -> int:
        return len(self.states)

    @property
    def largest(self) -> int:
        return max((size for _, size in self.states), default=0)

    def require(self, *, wait_s: float) -> int:
        """At least one write since ``begin()``, waiting up to ``wait_s`` for a periodic one."""
        deadline = time.monotonic() + wait_s
        self.poll()
        while not self.states and time.monotonic() < deadline:
            time.sleep(0.05)
            self.poll()
        if not self.states:
            names = ", ".join(str(p) for p in self.paths)
            raise GuaranteeNotMet(f"{self.what}: {names} not written during the run")
        return self.writes


def no_save_errors(log: Path, what: str) -> None:
    """Mosquitto logs a failed save and carries on from memory: that fails the run here."""
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        if "Error saving" in line or "Permission denied" in line:
            raise GuaranteeNotMet(f"{what}: {line.strip()}")

"""The systemd service-manager protocol (``Type=notify``) for the agent and the ingest node.

``READY=1`` is sent once the process can do its job (the agent: spool open and a source
subscribed); ``WATCHDOG=1`` pings come from a task on the event loop, so a loop wedged by a
blocking call stops them and systemd restarts the unit after ``WatchdogSec``; ``STATUS=`` carries
a one-line summary for ``systemctl status``. The datagram protocol itself is the
``systemd-watchdog`` package's. Outside systemd (no ``NOTIFY_SOCKET``) all of this is a no-op.

Decision: the agent does not wait for a source forever. A plant broker that is down must not
keep the agent from shipping its spooled backlog, and systemd kills a unit that never reports
ready (``TimeoutStartSec``); after ``ready_within_s`` it reports ready anyway, with a warning
event and a status line naming what is missing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta

from systemd_watchdog.systemd_watchdog import WatchDog

from bridge.shared.telemetry import event

_STATUS_EVERY_S = 10.0
_PING_MAX_S = 5.0
_PING_MIN_S = 0.05


class Notifier:
    """Reports readiness, liveness and status to systemd while ``run`` is awaited."""

    def __init__(self, *, component: str, ready_within_s: float = 60.0,
                 watchdog: WatchDog | None = None) -> None:
        self.component = component
        self.ready_within_s = ready_within_s
        self._sock: socket.socket | None = None
        self._given = watchdog  # the real one is made (with its socket) by run()
        self.ready = False
        self.pings = 0
        self._failed = False

    @property
    def _wd(self) -> WatchDog:
        if self._given is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._given = WatchDog(sock=self._sock)
        return self._given

    @property
    def enabled(self) -> bool:
        return bool(os.environ.get("NOTIFY_SOCKET")) if self._given is None \
            else self._given.is_enabled

    @property
    def ping_interval_s(self) -> float:
        """A quarter of ``WatchdogSec`` (systemd advises half; a busy loop gets slack), at
        least 50 ms: a ``WATCHDOG_USEC=0`` set by hand must not spin the loop."""
        return max(min(self._wd.timeout_td / timedelta(seconds=1) / 4, _PING_MAX_S),
                   _PING_MIN_S)

    def _send(self, what: Callable[..., None], *args: str) -> None:
        try:
            what(*args)
        except OSError as exc:  # the manager went away: say so once, keep running
            if not self._failed:
                self._failed = True
                event("service.notify_failed", level=logging.WARNING,
                      component=self.component, reason=f"{type(exc).__name__}: {exc}"[:200])

    async def run(self, *, waiting_for: Callable[[], str | None],
                  status: Callable[[], str]) -> None:
        """Until cancelled. ``waiting_for()`` is None once ready, else what is still missing."""
        try:
            if self.enabled:
                await self._run(waiting_for, status)
        finally:
            if self._sock is not None:
                self._sock.close()

    async def _run(self, waiting_for: Callable[[], str | None],
                   status: Callable[[], str]) -> None:
        t0 = time.monotonic()
        last_status = -math.inf
        while True:
            now = time.monotonic()
            if not self.ready:
                missing = waiting_for()
                if missing is None or now - t0 >= self.ready_within_s:
                    self.ready = True
                    if missing is not None:
                        event("service.ready_degraded", level=logging.WARNING,
                              component=self.component, reason=missing,
                              waited_s=round(now - t0, 1))
                    self._send(self._wd.ready)
                    watchdog = self._wd.timeout_td / timedelta(seconds=1)
                    event("service.ready", component=self.component,
                          startup_s=round(now - t0, 3),
                          watchdog_s=watchdog if watchdog < 86_400 else None)
                    last_status = -math.inf
                elif now - last_status >= _STATUS_EVERY_S:
                    last_status = now
                    self._send(self._wd.status, f"starting: {missing}")
            if self.ready:
                self._send(self._wd.notify)
                self.pings += 1
                if now - last_status >= _STATUS_EVERY_S:
                    last_status = now
                    self._send(self._wd.status, status())
            await asyncio.sleep(self.ping_interval_s if self.ready
                                else min(self.ping_interval_s, 0.2))

"""Per-endpoint circuit breaker over a sliding window of call outcomes (passive health).

CLOSED: calls flow; each outcome is recorded in a ``window_s`` sliding window. When the window
holds at least ``min_requests`` outcomes and more than ``error_rate`` of them failed, the breaker
OPENs. OPEN: no calls for ``open_s``. Then HALF_OPEN: at most ``half_open_probes`` calls at a
time; that many successes in a row close it, any failure opens it again. Throttled calls
(RESOURCE_EXHAUSTED) are not failures: the endpoint is healthy, only busy.

Pure logic with an injectable clock, so its behaviour is tested without sleeping.
``for_uplink`` builds one from the uplink's config, with the minimum a stalled endpoint can
reach (``reachable_minimum``).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable

from bridge.shared.config import UplinkConfig
from bridge.shared.telemetry import event


def reachable_minimum(up: UplinkConfig) -> int:
    """``breaker.min_requests``, lowered to what a stalled endpoint can reach.

    Calls that time out end one deadline after they start: at most ``max_in_flight`` of them
    per deadline, so a window holds at most this many. A larger minimum could never be
    reached by a stalled endpoint, and its breaker would never open."""
    b = up.breaker
    reachable = max(1, int(up.max_in_flight * b.window_s / up.deadline_s))
    if reachable >= b.min_requests:
        return b.min_requests
    event("uplink.breaker_minimum_lowered", configured=b.min_requests, effective=reachable,
          reason=f"max_in_flight={up.max_in_flight} calls with a {up.deadline_s:g} s "
                 f"deadline fill a {b.window_s:g} s window with at most {reachable}")
    return reachable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, *, window_s: float = 10.0, error_rate: float = 0.15,
                 min_requests: int = 20, open_s: float = 5.0, half_open_probes: int = 3,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.error_rate, self.min_requests = window_s, error_rate, min_requests
        self.open_s, self.half_open_probes, self._clock = open_s, half_open_probes, clock
        self.state = BreakerState.CLOSED
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._probe_successes = 0
        self.trips = 0

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            _, ok = self._outcomes.popleft()
            if not ok:
                self._failures -= 1

    def allow(self) -> bool:
        """May a call go to this endpoint now? (HALF_OPEN reserves a probe slot.)"""
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.open_s:
                return False
            self.state = BreakerState.HALF_OPEN
            self._probes = self._probe_successes = 0
        if self.state is BreakerState.HALF_OPEN:
            if self._probes >= self.half_open_probes:
                return False
            self._probes += 1
        return True

    def would_allow(self) -> bool:
        """Like ``allow`` but reserves nothing (for choosing an endpoint)."""
        if self.state is BreakerState.OPEN:
            return self._clock() - self._opened_at >= self.open_s
        if self.state is BreakerState.HALF_OPEN:
            return self._probes < self.half_open_probes
        return True

    def release(self) -> None:
        """Give back a half-open probe slot without recording an outcome."""
        if self.state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)

    def record(self, ok: bool) -> BreakerState:
        """Record an outcome; returns the new state."""
        now = self._clock()
        if self.state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            if not ok:
                self._open(now)
            else:
                self._probe_successes += 1
                if self._probe_successes >= self.half_open_probes:
                    self.state = BreakerState.CLOSED
                    self._outcomes.clear()
                    self._failures = 0
            return self.state
        if self.state is BreakerState.OPEN:
            return self.state  # a straggler from before the trip
        self._outcomes.append((now, ok))
        if not ok:
            self._failures += 1
        self._prune(now)
        total = len(self._outcomes)
        if total >= self.min_requests and self._failures / total > self.error_rate:
            self._open(now)
        return self.state

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = now
        self.trips += 1
        self._outcomes.clear()
        self._failures = 0


def for_uplink(up: UplinkConfig, *, min_requests: int) -> CircuitBreaker:
    """One endpoint's breaker from the uplink's config (``min_requests``: once per agent,
    from ``reachable_minimum``)."""
    b = up.breaker
    return CircuitBreaker(window_s=b.window_s, error_rate=b.error_rate,
                          min_requests=min_requests, open_s=b.open_s,
                          half_open_probes=b.half_open_probes)

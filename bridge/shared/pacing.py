"""Pacing shared by several stages, so that none imports another stage for it.

* ``Backoff``: capped, fully jittered, wakeable backoff, one per retry loop (the sender, the
  endpoint pool's probes, the AMQP source's reconnects, the consumer, a replica's reconnects).
* ``TokenBucket``: a rate limit that may go into debt, so a request larger than the burst is
  never refused forever (the ingest's per-site limits, the sender's drain pacing, Sparkplug
  rebirth requests).
* ``wait_event``: an event waited for with a timeout, without losing a cancellation.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable


class Backoff:
    """``sleep()`` waits uniform(0, min(cap, base * 2**attempt)); ``wake()`` cuts it short."""

    def __init__(self, *, base_s: float = 0.05, cap_s: float = 10.0) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self.attempt = 0
        self._wake = asyncio.Event()

    def reset(self) -> None:
        self.attempt = 0

    def wake(self) -> None:
        self._wake.set()

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap_s, self.base_s * 2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay

    async def sleep(self, delay: float | None = None) -> None:
        self._wake.clear()
        await wait_event(self._wake, self.next_delay() if delay is None else delay)


class TokenBucket:
    def __init__(self, *, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self.tokens = burst
        self._at = clock()

    def take(self, n: int) -> float:
        """Take ``n`` tokens; 0.0 if done, else the seconds to wait before asking again."""
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        need = min(float(n), self.burst)
        if self.tokens >= need:
            self.tokens -= n
            return 0.0
        return (need - self.tokens) / self.rate


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """``event.wait()`` for at most ``timeout`` seconds; True if the event is set. Not
    ``asyncio.wait_for``: on Python 3.11 it loses a cancellation that lands just as the event
    is set, and a loop around it then outlives its task's cancel (seen: a checkpoint task
    that hung the store's close)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True

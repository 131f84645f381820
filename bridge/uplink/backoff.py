"""Capped, fully jittered, wakeable backoff (one per retry loop)."""

from __future__ import annotations

import asyncio
import contextlib
import random


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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.next_delay() if delay is None
                                   else delay)

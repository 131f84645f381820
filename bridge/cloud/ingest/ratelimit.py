"""Per-site token buckets: the ingest answers RESOURCE_EXHAUSTED with a retry-after hint.

A bucket holds up to ``burst`` tokens (readings) and refills at ``rate`` per second. A batch of
n readings passes when the bucket holds min(n, burst) tokens, and may leave it in debt, so a
batch larger than the burst is never refused forever. Otherwise the answer says how long until
it would pass; the agent waits that long without counting it against the endpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bridge.shared.pacing import TokenBucket


class SiteLimiter:
    def __init__(self, *, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, site: str, n: int) -> float:
        bucket = self._buckets.get(site)
        if bucket is None:
            bucket = self._buckets[site] = TokenBucket(rate=self.rate, burst=self.burst,
                                                       clock=self._clock)
        return bucket.take(n)

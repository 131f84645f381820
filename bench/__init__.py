"""Reproducible benchmarks (``make bench``); see docs/benchmarks.md for the figures."""

import time
from collections.abc import Callable


def until(cond: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True

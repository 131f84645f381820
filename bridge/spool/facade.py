"""``AsyncSpool``: the spool on its own thread, so fsyncs never block the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from bridge.spool.core import Spool

P = ParamSpec("P")
R = TypeVar("R")


class AsyncSpool:
    """Runs a ``Spool`` on its own thread; the event loop never waits on an fsync."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self.appended = asyncio.Event()

    async def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def close(self) -> None:
        await self.run(self.spool.close)
        self._pool.shutdown(wait=True)

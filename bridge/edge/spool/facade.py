"""``AsyncSpool``: the spool on its own thread, so fsyncs never block the event loop; the only
way the intake, the sender and the agent reach the spool.

Two kinds of call. Operations (commit, reads from the file, release, expiry, ...) run on the
spool's thread, one at a time. Everything else runs on the caller's thread (the event loop)
and touches only what is made to be shared:

- figures (``figures``, ``epoch``, ``generation``, ``last_rid``) come from the immutable
  ``SpoolFigures`` the spool publishes after each operation: one instant, swapped whole;
- the sender's ``unhold`` goes to the spool's ``Holds``, under its lock;
- live batches come from the fresh tail, under its lock (``bridge.edge.spool.fresh``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import ParamSpec, TypeVar

from bridge.edge.spool.base import DeadLetter, Pending, SpoolFigures
from bridge.edge.spool.core import Spool

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


    @property
    def epoch(self) -> int:
        return self.spool.published.epoch

    @property
    def max_bytes(self) -> int:
        return self.spool.published.max_bytes

    @property
    def generation(self) -> int:
        """Bumped when a corrupt file is replaced: positions (rids) of another are void."""
        return self.spool.published.generation

    @property
    def last_rid(self) -> int:
        """The rid of the newest row (0 when none was ever written to this file)."""
        return self.spool.published.last_rid

    def figures(self) -> SpoolFigures:
        """The figures after the spool's latest operation, with the fresh tail's counts
        (kept on this thread: only the event loop takes from the tail)."""
        fresh = self.spool.fresh
        return replace(self.spool.published, reads_memory=fresh.hits, reads_file=fresh.misses)

    async def dead_counter(self, key: str) -> int:
        return await self.run(self.spool.dead_counter, key)

    async def load_state(self, source: str) -> dict[str, bytes]:
        return await self.run(self.spool.load_state, source)

    async def load_ring(self, source: str) -> list[tuple[int, bytes]]:
        return await self.run(self.spool.load_ring, source)

    async def commit(self, pending: Sequence[Pending], dead: Sequence[DeadLetter] = (),
                     state: Mapping[str, bytes | None] | None = None,
                     ring: Sequence[tuple[str, int, int, bytes]] = ()) -> list[int]:
        return await self.run(self.spool.commit, pending, dead, state, ring)

    async def commit_dropped(self, pending: Sequence[Pending], reason: str) -> int:
        return await self.run(self.spool.commit_dropped, pending, reason)

    async def make_room(self, need_bytes: int) -> int:
        return await self.run(self.spool.make_room, need_bytes)

    async def read_after(self, rid: int, *, max_rows: int, max_bytes: int,
                         hold: bool = False, through: int | None = None
                         ) -> list[tuple[int, bytes]]:
        """From the fresh tail at once when it holds them, else from the file (thread)."""
        rows = self.spool.take_fresh(rid, max_rows=max_rows, max_bytes=max_bytes, hold=hold,
                                     through=through)
        if rows is not None:
            return rows
        return await self.run(self.spool.read_after, rid, max_rows=max_rows,
                              max_bytes=max_bytes, hold=hold, through=through)

    def unhold(self, first: int) -> None:
        """Synchronous: the spool's ``Holds`` has its own lock."""
        self.spool.unhold(first)

    async def release(self, first: int, last: int, rejected: Sequence[tuple[int, str]] = (),
                      *, generation: int | None = None) -> None:
        await self.run(self.spool.release, first, last, rejected, generation=generation)

    async def expire(self) -> int:
        return await self.run(self.spool.expire)

    async def drop_totals(self) -> dict[str, int]:
        return await self.run(self.spool.drop_totals)

    async def oldest_age_s(self) -> float | None:
        return await self.run(self.spool.oldest_age_s)

    async def close(self) -> None:
        await self.run(self.spool.close)
        self._pool.shutdown(wait=True)

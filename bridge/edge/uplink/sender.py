"""Spool -> batches -> endpoints, and spool rows released only on the ingest's ack.

The sender reads the spool in seq order and keeps up to ``max_in_flight`` batches in flight.
Each batch is retried until an ingest node acknowledges it: a call-level failure marks the
endpoint unhealthy and the same bytes (same request ids) go to the next healthy endpoint;
throttling (RESOURCE_EXHAUSTED) waits for the server's hint without blaming the endpoint (no
breaker count, no stall, no failover) and holds the backlog lane back for as long, so live
readings go first. Per-envelope results:
COMMITTED and DUPLICATE release the row; REJECTED (permanent) moves it to the spool's dead
letters. Nothing is dropped on a call-level error, whatever its code.

Each attempt writes one ``uplink.batch`` access-log line with an Envoy-style response flag.
Retry, failover, the breaker's feed, strict acks and the deadline are layers around one call
(``bridge.edge.uplink.layers``); the sender batches, dispatches and releases.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from bridge.edge.spool import AsyncSpool
from bridge.edge.uplink.layers import (
    DISPOSITIONS,
    Deadline,
    Failover,
    Outgoing,
    Oversized,
    Recorded,
    Retry,
    StrictAcks,
    hinted_wait,
)
from bridge.edge.uplink.pool import EndpointPool
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.config import UplinkConfig
from bridge.shared.errors import SpoolFull, SpoolReset
from bridge.shared.pacing import Backoff, TokenBucket, wait_event
from bridge.shared.telemetry import AgentMetrics, event


class Sender:
    def __init__(self, *, spool: AsyncSpool, pool: EndpointPool, config: UplinkConfig,
                 metrics: AgentMetrics) -> None:
        self.spool, self.pool, self.config, self.metrics = spool, pool, config, metrics
        self._stopping = asyncio.Event()
        self.in_flight = 0
        self.acked_readings = 0
        self.draining = False
        self.batch_cap: int | None = None  # a smaller bound an ingest asked for (_split)
        self.busy_until = 0.0  # monotonic: the backlog waits for a throttle's retry-after
        self.window = 1  # backlog batches in flight at most: 1 after a throttle, doubled per ack
        self._freed = asyncio.Event()  # a batch in flight finished (its slot is free)
        self.send = Retry(
            Failover(Recorded(StrictAcks(Deadline(deadline_s=config.deadline_s),
                                         metrics=metrics), pool=pool),
                     pool=pool, metrics=metrics),
            pool=pool, metrics=metrics, backoff_max_s=config.backoff_max_s,
            on_throttled=self._throttled)

    def _throttled(self, wait_s: float) -> None:
        """An ingest is busy: the backlog waits ``wait_s`` and restarts at one batch."""
        self.busy_until = max(self.busy_until, time.monotonic() + wait_s)
        self.window = 1

    def _next_turn(self, wait_s: float, endpoint: str) -> None:
        """An ingest in demand named our next turn with its answer: the backlog's next batch
        waits for it (jittered) instead of being refused; live does not wait, and the window
        stays (this is a place in the node's line, not a throttle)."""
        wait = hinted_wait(wait_s)
        self.busy_until = max(self.busy_until, time.monotonic() + wait)
        self.metrics.next_turns.labels(endpoint).inc()
        self.metrics.next_turn_wait.labels(endpoint).inc(wait)

    def _batch_rows(self) -> int:
        cap = self.batch_cap
        return self.config.batch_max_readings if cap is None else \
            min(cap, self.config.batch_max_readings)

    def stop(self) -> None:
        self._stopping.set()
        self.spool.appended.set()
        self._freed.set()

    async def run(self) -> None:
        """Dispatch batches until ``stop()``; then wait for the batches in flight.

        Two lanes: *live* (rows newer than the backlog boundary) always goes first; when more
        than a few batches are waiting (after an outage, or at start), the rows up to the
        current tail become the *backlog*, drained in order in the slots live does not need
        and at most ``drain_max_per_s`` readings a second. So live latency stays low while the
        agent catches up. The backlog starts with one batch in flight and doubles per ack up
        to ``max_in_flight`` (slow start), and falls back to one when an ingest throttles: a
        fleet that recovers at once does not open with every agent's whole window.
        """
        sp = self.spool
        live = 0                              # last rid dispatched in the live lane
        backlog: list[int] | None = None      # [cursor, boundary] while draining
        generation = sp.generation
        pace = TokenBucket(rate=self.config.drain_max_per_s,
                           burst=max(self.config.drain_max_per_s, 1.0)) \
            if self.config.drain_max_per_s > 0 else None
        threshold = 2 * self.config.max_in_flight * self.config.batch_max_readings
        async with asyncio.TaskGroup() as tg:
            while not self._stopping.is_set():
                # A slot is taken at dispatch (in_flight) and freed in one place: the end of
                # its batch (_deliver); nothing else holds one.
                if self.in_flight >= self.config.max_in_flight:
                    self._freed.clear()
                    await self._freed.wait()
                    continue
                self.spool.appended.clear()
                if sp.generation != generation:
                    # The file was quarantined and replaced: its rids start over.
                    live, backlog, generation = 0, None, sp.generation
                if backlog is None and sp.last_rid - live > threshold:
                    backlog, live = [live, sp.last_rid], sp.last_rid
                    self.draining, self.window = True, 1
                    event("uplink.drain_started", readings=backlog[1] - backlog[0],
                          max_per_s=self.config.drain_max_per_s or None)
                try:
                    rows = await self.spool.read_after(live, max_rows=self._batch_rows(),
                                                       max_bytes=self.config.batch_max_bytes,
                                                       hold=True)
                    if rows:
                        live = rows[-1][0]
                    elif backlog is not None:
                        rows, wait = await self._backlog_rows(backlog, pace)
                        if backlog[0] >= backlog[1]:
                            backlog, self.draining = None, False
                            event("uplink.drain_finished")
                        if wait:
                            await wait_event(self.spool.appended, wait)
                            continue
                except SpoolReset:
                    continue
                if not rows:
                    if backlog is None:
                        await self.spool.appended.wait()
                    continue
                # The read held the rows (hold=True): no bound drops them while in flight.
                self.in_flight += 1
                more = backlog[1] - backlog[0] if backlog is not None else 0
                tg.create_task(self._deliver(rows, generation, more),
                               name=f"batch-{rows[0][0]}")

    async def _backlog_rows(self, backlog: list[int], pace: TokenBucket | None,
                            ) -> tuple[list[tuple[int, bytes]], float]:
        """The next backlog batch (advancing ``backlog[0]``), or how long the pace says to wait."""
        want = self._batch_rows()
        busy = self.busy_until - time.monotonic()
        if busy > 0:  # an ingest asked us to wait: the backlog waits, live does not
            return [], busy
        if self.in_flight >= self.window:  # slow start: woken by the next ack
            return [], 1.0
        if pace is not None:
            wait = pace.take(want)
            if wait > 0:
                return [], wait
        # Never past the boundary: what follows it is the live lane's (and it holds only
        # what it reads, so nothing past the boundary stays held by a backlog batch).
        rows = await self.spool.read_after(backlog[0], max_rows=want, through=backlog[1],
                                           max_bytes=self.config.batch_max_bytes, hold=True)
        backlog[0] = rows[-1][0] if rows else backlog[1]
        return rows, 0.0

    async def _deliver(self, rows: list[tuple[int, bytes]], generation: int,
                       more: int) -> None:
        """One batch until acked and released; frees its slot however it ends. ``more``:
        backlog readings behind it, said to the node (which may name our next turn)."""
        try:
            await self._deliver_until_acked(rows, generation, more)
        finally:
            if generation == self.spool.generation:
                self.spool.unhold(rows[0][0])
            self.in_flight -= 1
            self._freed.set()

    async def _deliver_until_acked(self, rows: list[tuple[int, bytes]],
                                   generation: int, more: int = 0) -> None:
        batch = Outgoing.of(str(uuid.uuid4()), [b for _, b in rows], more)
        first, last = rows[0][0], rows[-1][0]  # rids: positions in the spool file
        done = await self.send.send(batch)
        if isinstance(done, Oversized):
            await self._split(rows, generation, done.most, done.endpoint.name, more)
            return
        ack, ep = done.ack, done.endpoint
        if ack.next_after_ms:
            self._next_turn(ack.next_after_ms / 1000, ep.name)
        if self.window < self.config.max_in_flight:
            self.window = min(self.config.max_in_flight, 2 * self.window)
            self.spool.appended.set()  # wakes the dispatch loop for the wider window
        rejected = [(rid, r.reason) for (rid, _), r in zip(rows, ack.results, strict=True)
                    if r.disposition == pb.DISPOSITION_REJECTED]
        await self._release(first, last, rejected, generation)
        counts: dict[str, int] = {}
        for r in ack.results:
            d = DISPOSITIONS.get(r.disposition, "unknown")
            counts[d] = counts.get(d, 0) + 1
        for d, n in counts.items():
            self.metrics.readings_acked.labels(ep.name, d).inc(n)
        if rejected:
            self.metrics.dead_letters.labels("rejected").inc(len(rejected))
            event("uplink.rejected", level=logging.ERROR, endpoint=ep.name,
                  batch_id=batch.batch_id, seqs=[r.seq for r in ack.results
                                                 if r.disposition == pb.DISPOSITION_REJECTED][:20],
                  reason=rejected[0][1])
        self.metrics.batches.labels(ep.name, "OK").inc()
        self.metrics.batch_seconds.labels(ep.name).observe(done.elapsed_s)
        self.acked_readings += len(rows)
        event("uplink.batch", endpoint=ep.name, leg=ep.leg, batch_id=batch.batch_id,
              first_seq=batch.ids[0][1], last_seq=batch.ids[-1][1], readings=len(rows),
              status="OK", flag="-", attempt=done.attempt,
              duration_ms=round(done.elapsed_s * 1000, 3),
              **({"next_after_ms": ack.next_after_ms} if ack.next_after_ms else {}), **counts)

    async def _split(self, rows: list[tuple[int, bytes]], generation: int, most: int,
                     endpoint: str, more: int) -> None:
        """The ingest takes at most ``most`` envelopes per call: deliver the rows in batches
        of that size, one after the other, and build no larger batch from now on."""
        self.batch_cap = min(self.batch_cap or most, most)
        event("uplink.batch_split", level=logging.WARNING, endpoint=endpoint,
              readings=len(rows), max_batch_envelopes=most,
              reason="the ingest refused a batch larger than its limits.max_batch_envelopes; "
                     "lower uplink.batch_max_readings to at most that")
        for start in range(0, len(rows), most):
            await self._deliver_until_acked(rows[start:start + most], generation,
                                            more + max(0, len(rows) - start - most))

    async def _release(self, first: int, last: int, rejected: list[tuple[int, str]],
                       generation: int) -> None:
        """Delete acknowledged rows; on a full disk keep trying (the rows are safe meanwhile)."""
        backoff = Backoff(base_s=0.1, cap_s=self.config.backoff_max_s)
        while True:
            try:
                await self.spool.release(first, last, rejected, generation=generation)
                return
            except SpoolReset:
                return  # the file was replaced: these rids are gone anyway
            except SpoolFull as exc:
                if backoff.attempt == 0:
                    event("spool.release_blocked", level=logging.ERROR, reason=str(exc),
                          first_rid=first, last_rid=last)
                await backoff.sleep()

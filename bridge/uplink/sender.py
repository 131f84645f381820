"""Spool -> batches -> endpoints, and spool rows released only on the ingest's ack.

The sender reads the spool in seq order and keeps up to ``max_in_flight`` batches in flight.
Each batch is retried until an ingest node acknowledges it: a call-level failure marks the
endpoint unhealthy and the same bytes (same request ids) go to the next healthy endpoint;
throttling waits for the server's hint without blaming the endpoint. Per-envelope results:
COMMITTED and DUPLICATE release the row; REJECTED (permanent) moves it to the spool's dead
letters. Nothing is dropped on a call-level error, whatever its code.

Each attempt writes one ``uplink.batch`` access-log line with an Envoy-style response flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from bridge._pb import bridge_pb2 as pb
from bridge.config import UplinkConfig
from bridge.envelope import encode_batch
from bridge.spool import AsyncSpool, SpoolFull, SpoolReset
from bridge.telemetry import AgentMetrics, event
from bridge.uplink.backoff import Backoff
from bridge.uplink.pool import Endpoint, EndpointPool
from bridge.uplink.transport import ErrorKind, TransportError

_DISPOSITIONS = {pb.DISPOSITION_COMMITTED: "committed", pb.DISPOSITION_DUPLICATE: "duplicate",
                 pb.DISPOSITION_REJECTED: "rejected"}


class Sender:
    def __init__(self, *, spool: AsyncSpool, pool: EndpointPool, config: UplinkConfig,
                 metrics: AgentMetrics) -> None:
        self.spool, self.pool, self.config, self.metrics = spool, pool, config, metrics
        self._stopping = asyncio.Event()
        self.in_flight = 0
        self.acked_readings = 0

    def stop(self) -> None:
        self._stopping.set()
        self.spool.appended.set()

    async def run(self) -> None:
        """Dispatch batches until ``stop()``; then wait for the batches in flight."""
        cursor = 0
        generation = self.spool.spool.generation
        slots = asyncio.Semaphore(self.config.max_in_flight)
        async with asyncio.TaskGroup() as tg:
            while not self._stopping.is_set():
                await slots.acquire()
                if self._stopping.is_set():
                    break
                self.spool.appended.clear()
                if self.spool.spool.generation != generation:
                    # The file was quarantined and replaced: its rids start over.
                    cursor, generation = 0, self.spool.spool.generation
                try:
                    rows = await self.spool.run(self.spool.spool.read_after, cursor,
                                                max_rows=self.config.batch_max_readings,
                                                max_bytes=self.config.batch_max_bytes)
                except SpoolReset:
                    slots.release()
                    continue
                if not rows:
                    slots.release()
                    await self.spool.appended.wait()
                    continue
                cursor = rows[-1][0]
                self.spool.spool.sent_through = cursor  # in flight: never dropped
                tg.create_task(self._deliver(rows, generation, slots),
                               name=f"batch-{rows[0][0]}")

    async def _deliver(self, rows: list[tuple[int, bytes]], generation: int,
                       slots: asyncio.Semaphore) -> None:
        self.in_flight += 1
        try:
            await self._deliver_until_acked(rows, generation)
        finally:
            self.in_flight -= 1
            slots.release()

    async def _deliver_until_acked(self, rows: list[tuple[int, bytes]],
                                   generation: int) -> None:
        batch_id = str(uuid.uuid4())
        blob = encode_batch(batch_id, [b for _, b in rows])
        first, last = rows[0][0], rows[-1][0]
        backoff = Backoff(base_s=0.05, cap_s=self.config.backoff_max_s)
        attempt = 0
        while True:
            ep = await self.pool.pick()
            attempt += 1
            t0 = time.perf_counter()
            try:
                ack = await self._push(ep, blob, batch_id)
                if len(ack.results) != len(rows):
                    raise TransportError(code="INTERNAL", flag="UF", kind=ErrorKind.RETRYABLE,
                                         detail=f"ack has {len(ack.results)} results for "
                                                f"{len(rows)} envelopes")
            except TransportError as err:
                elapsed = time.perf_counter() - t0
                self.pool.record(ep, err)
                self.metrics.batches.labels(ep.name, err.code).inc()
                self.metrics.batch_seconds.labels(ep.name).observe(elapsed)
                event("uplink.batch", level=logging.WARNING, endpoint=ep.name,
                      batch_id=batch_id, first_seq=first, last_seq=last, readings=len(rows),
                      status=err.code, flag=err.flag, attempt=attempt,
                      duration_ms=round(elapsed * 1000, 3), reason=err.detail)
                if err.kind is ErrorKind.THROTTLED:
                    self.metrics.throttled.labels(ep.name).inc()
                    await backoff.sleep(err.retry_after_s)
                    continue
                self.metrics.retries.labels(ep.name, err.flag).inc()
                if attempt >= len(self.pool.endpoints):
                    # Every endpoint had a go: back off, but wake as soon as health changes.
                    await self.pool.wait_changed(backoff.next_delay())
                continue
            self.pool.record(ep, None)
            elapsed = time.perf_counter() - t0
            rejected = [(rid, r.reason) for (rid, _), r in zip(rows, ack.results, strict=True)
                        if r.disposition == pb.DISPOSITION_REJECTED]
            await self._release(first, last, rejected, generation)
            counts: dict[str, int] = {}
            for r in ack.results:
                d = _DISPOSITIONS.get(r.disposition, "unknown")
                counts[d] = counts.get(d, 0) + 1
            for d, n in counts.items():
                self.metrics.readings_acked.labels(ep.name, d).inc(n)
            if rejected:
                self.metrics.dead_letters.labels("rejected").inc(len(rejected))
                event("uplink.rejected", level=logging.ERROR, endpoint=ep.name,
                      batch_id=batch_id, seqs=[s for s, _ in rejected][:20],
                      reason=rejected[0][1])
            self.metrics.batches.labels(ep.name, "OK").inc()
            self.metrics.batch_seconds.labels(ep.name).observe(elapsed)
            self.acked_readings += len(rows)
            event("uplink.batch", endpoint=ep.name, batch_id=batch_id, first_seq=first,
                  last_seq=last, readings=len(rows), status="OK", flag="-", attempt=attempt,
                  duration_ms=round(elapsed * 1000, 3), **counts)
            return

    async def _release(self, first: int, last: int, rejected: list[tuple[int, str]],
                       generation: int) -> None:
        """Delete acknowledged rows; on a full disk keep trying (the rows are safe meanwhile)."""
        backoff = Backoff(base_s=0.1, cap_s=self.config.backoff_max_s)
        while True:
            try:
                await self.spool.run(self.spool.spool.release, first, last, rejected,
                                     generation=generation)
                return
            except SpoolReset:
                return  # the file was replaced: these rids are gone anyway
            except SpoolFull as exc:
                if backoff.attempt == 0:
                    event("spool.release_blocked", level=logging.ERROR, reason=str(exc),
                          first_rid=first, last_rid=last)
                await backoff.sleep()

    async def _push(self, ep: Endpoint, blob: bytes, batch_id: str) -> pb.Ack:
        """One call, abandoned as soon as the endpoint is found down (hung or unreachable)."""
        down = ep.down
        if down.is_set():
            raise TransportError(code="UNAVAILABLE", flag=ep.last_flag or "UF",
                                 kind=ErrorKind.RETRYABLE, detail=ep.last_error)
        call = asyncio.ensure_future(ep.transport.push(blob, batch_id=batch_id,
                                                       timeout=self.config.deadline_s))
        watch = asyncio.ensure_future(down.wait())
        try:
            await asyncio.wait({call, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not call.done():
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                await call
            raise TransportError(code="UNAVAILABLE", flag=ep.last_flag or "UF",
                                 kind=ErrorKind.RETRYABLE,
                                 detail=f"abandoned in flight: endpoint went down "
                                        f"({ep.last_error})")
        return call.result()

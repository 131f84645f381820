"""What may refuse a whole PushBatch before any per-envelope work, in this order.

1. ``batch_too_large``: more than ``limits.max_batch_envelopes`` (a ``max-batch-envelopes``
   trailer: the agent splits the batch).
2. ``site_in_flight``: the site already has ``limits.max_in_flight_per_site`` calls served.
3. ``rate_limit``: the site's token bucket (``bridge.cloud.ingest.ratelimit``).
4. ``node_busy``: admission control (``bridge.cloud.ingest.admission``): the node has no room for
   the call within the wait allowed; a call with room soon is held, then admitted. A call
   of a site that asked before it was told to first waits for its site's time (at most 1 s).

Each refusal is RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailer, counted in
``bridge_ingest_refused_batches_total{reason}`` and logged as an ``ingest.batch`` event with
the reason and the retry-after; the agent waits it without blaming the endpoint. A call the
gate lets through holds its site's and the node's place until ``leave``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from bridge.cloud.ingest.admission import Admission, Held, queued_for
from bridge.cloud.ingest.limits import Limits
from bridge.cloud.ingest.ratelimit import SiteLimiter
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.telemetry import IngestMetrics, event

Context = grpc.aio.ServicerContext[Any, Any]
HOLD_MARGIN_S = 0.5  # an early call's wait for its site's time ends this long before its deadline


class Gate:
    def __init__(self, *, node: str, limits: Limits, metrics: IngestMetrics,
                 limiter: SiteLimiter | None, admission: Admission | None) -> None:
        self.node, self.limits, self.metrics = node, limits, metrics
        self.limiter, self.admission = limiter, admission
        self._in_flight: dict[str, int] = {}  # calls per site; a site leaves it at zero

    async def enter(self, context: Context, site: str, request: pb.Batch, t0: float) -> None:
        """Return when the call may run (call ``leave`` after it); else abort the call."""
        n = len(request.envelopes)
        limits = self.limits
        if (problem := limits.batch_problem(n)) is not None:
            await self._refuse(context, site, request, "batch_too_large", problem, t0,
                               (("max-batch-envelopes", str(limits.max_batch_envelopes)),
                                ("retry-after-ms", "1")))
        if self._in_flight.get(site, 0) >= limits.max_in_flight_per_site:
            retry_ms = limits.busy_retry_ms()
            await self._refuse(context, site, request, "site_in_flight",
                               f"site {site} already has {limits.max_in_flight_per_site} calls "
                               f"in flight (limits.max_in_flight_per_site); retry in "
                               f"{retry_ms} ms", t0, (("retry-after-ms", str(retry_ms)),))
        waited = queued_for(context)  # before its site's hold below adds to it
        self._in_flight[site] = self._in_flight.get(site, 0) + 1  # a held call counts
        try:
            if self.limiter is not None and (wait := self.limiter.take(site, n)) > 0:
                self.metrics.throttled.labels(site).inc()
                retry_ms = max(1, int(wait * 1000))
                await self._refuse(context, site, request, "rate_limit",
                                   f"site {site} over its rate limit; retry in {retry_ms} ms",
                                   t0, (("retry-after-ms", str(retry_ms)),))
            if self.admission is not None:
                await self._admit(context, site, request, n, waited, t0)
        except BaseException:
            self._left(site)
            raise

    async def _admit(self, context: Context, site: str, request: pb.Batch, n: int,
                     waited: float, t0: float) -> None:
        a = self.admission
        assert a is not None
        left = context.time_remaining()
        await a.wait_turn(site, None if left is None else left - HOLD_MARGIN_S)
        decision = a.admit(site, n, waited)
        if isinstance(decision, Held):
            try:
                await decision.ready
            except asyncio.CancelledError:
                a.cancel(decision)
                raise
        elif decision is not None:
            retry_ms = max(1, round(decision * 1000))
            await self._refuse(context, site, request, "node_busy",
                               f"node {self.node} is at its admitted work ({a.in_flight} "
                               f"readings in flight, limit {a.limit:.0f}); sites are told "
                               f"to come back over {a.line_s:.1f} s; retry in {retry_ms} ms",
                               t0, (("retry-after-ms", str(retry_ms)),))

    def next_turn_ms(self, site: str, request: pb.Batch) -> int:
        """The site's next turn to name in the Ack (ms; 0: none), for a batch that said more
        is behind it (``bridge.cloud.ingest.admission``, "The next turn")."""
        more = request.backlog_readings
        if self.admission is None or not more:
            return 0
        n = min(more, len(request.envelopes) or 1)
        return round(self.admission.next_turn(site, n) * 1000)

    def leave(self, site: str, n: int, seconds: float) -> None:
        """The call let through by ``enter`` was answered after ``seconds``."""
        if self.admission is not None:
            self.admission.done(n, seconds)
        self._left(site)

    def _left(self, site: str) -> None:
        left = self._in_flight[site] - 1
        if left:
            self._in_flight[site] = left
        else:
            del self._in_flight[site]

    async def _refuse(self, context: Context, site: str, request: pb.Batch, reason: str,
                      detail: str, t0: float, trailers: tuple[tuple[str, str], ...]) -> None:
        """Answer RESOURCE_EXHAUSTED for the whole call: counted, logged, never retried
        against the endpoint's health (the agent waits the retry-after, or splits)."""
        self.metrics.batches.labels("RESOURCE_EXHAUSTED").inc()
        self.metrics.refused.labels(reason).inc()
        event("ingest.batch", level=logging.WARNING, site=site, batch_id=request.batch_id,
              readings=len(request.envelopes), status="RESOURCE_EXHAUSTED", flag="RL",
              reason=reason, duration_ms=round((time.perf_counter() - t0) * 1000, 3),
              **{k.replace("-", "_"): int(v) for k, v in trailers})
        context.set_trailing_metadata(trailers)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, detail)

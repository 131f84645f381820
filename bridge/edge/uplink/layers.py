"""The send path as layers around one call, in the manner of the OpenTelemetry Collector's
exporter helpers. Outermost first:

``Retry``
    until an ingest acknowledges the batch: a throttle (RESOURCE_EXHAUSTED) waits the server's
    retry-after (jittered, ``hinted_wait``) and tells the sender (``on_throttled``) so the
    backlog holds back; any other failure tries again at once on the next endpoint, and once
    every endpoint had a go, backs off until the pool's health changes. A throttle that says
    the batch is larger than the ingest takes in one call ends the retries with ``Oversized``:
    the sender splits the batch.
``Failover``
    picks the endpoint for each attempt (``EndpointPool.pick``: health, breaker, priority,
    stable fail-back) and writes the attempt's access-log line and metrics when it fails.
``Recorded``
    feeds each outcome to the endpoint's health and circuit breaker (``EndpointPool.record``;
    a throttle counts nothing: busy, not broken).
``StrictAcks``
    refuses an ack that does not echo one known disposition per envelope, in order, for
    exactly the identities sent: a protocol error, retried, that releases nothing.
``Deadline``
    the call itself, with the configured deadline, abandoned as soon as the endpoint is found
    down (hung or unreachable) so the batch moves on without waiting the deadline out.

Every attempt sends the same bytes with the same request id, so whichever node commits it, a
resend is answered DUPLICATE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from bridge.edge.envelope import encode_batch, identity
from bridge.edge.uplink.pool import Endpoint, EndpointPool
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import ErrorKind, TransportError
from bridge.shared.pacing import Backoff
from bridge.shared.telemetry import AgentMetrics, event

DISPOSITIONS = {pb.DISPOSITION_COMMITTED: "committed", pb.DISPOSITION_DUPLICATE: "duplicate",
                pb.DISPOSITION_REJECTED: "rejected"}


MAX_HINT_S = 600.0  # no hint holds the backlog longer: a node names at most 60 s


def hinted_wait(hint_s: float) -> float:
    """How long to wait on an ingest's ``retry-after`` or next turn: the hint, jittered up by
    at most 5 % (and 20 ms), never less, and never past ``MAX_HINT_S`` (a garbage hint from a
    faulty node must not stall the backlog for weeks; coming back early costs one refusal
    with the time left). The ingest already spreads the sites it refuses over the time it
    needs for them (bridge.cloud.ingest.admission), and refuses a site that comes back early."""
    if not 0.0 <= hint_s <= MAX_HINT_S:  # NaN, negative, or past the bound
        event("uplink.hint_capped", level=logging.WARNING, hint_s=str(hint_s), max_s=MAX_HINT_S)
        hint_s = MAX_HINT_S if hint_s > MAX_HINT_S else 0.0
    return hint_s + random.uniform(0.0, min(0.05 * hint_s, 0.02))


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One batch on its way: the same bytes and request id on every attempt."""

    batch_id: str
    blob: bytes
    ids: list[tuple[int, int]]  # (epoch, seq) each result must echo, read from the heads

    @classmethod
    def of(cls, batch_id: str, envelopes: list[bytes], backlog: int = 0) -> Outgoing:
        """``backlog``: readings still behind this batch (the node may name our next turn)."""
        return cls(batch_id=batch_id, blob=encode_batch(batch_id, envelopes, backlog),
                   ids=[identity(b) for b in envelopes])

    @property
    def readings(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class Delivered:
    ack: pb.Ack
    endpoint: Endpoint
    attempt: int
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class Oversized:
    """The ingest takes at most ``most`` envelopes per call (its ``max-batch-envelopes``)."""

    most: int
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class Failed:
    error: TransportError
    endpoint: Endpoint


class EndpointCall(Protocol):
    """A layer that sends a batch to one given endpoint."""

    async def send(self, batch: Outgoing, ep: Endpoint) -> pb.Ack: ...


class Deadline:
    def __init__(self, *, deadline_s: float) -> None:
        self.deadline_s = deadline_s

    async def send(self, batch: Outgoing, ep: Endpoint) -> pb.Ack:
        down = ep.down
        if down.is_set():
            raise TransportError(code="UNAVAILABLE", flag=ep.last_flag or "UF",
                                 kind=ErrorKind.RETRYABLE, detail=ep.last_error)
        call = asyncio.ensure_future(ep.transport.push(batch.blob, batch_id=batch.batch_id,
                                                       timeout=self.deadline_s))
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


class StrictAcks:
    def __init__(self, inner: EndpointCall, *, metrics: AgentMetrics) -> None:
        self.inner, self.metrics = inner, metrics

    async def send(self, batch: Outgoing, ep: Endpoint) -> pb.Ack:
        ack = await self.inner.send(batch, ep)
        problem = ack_problem(ack, batch.ids)
        if problem is not None:
            kind, detail = problem
            self.metrics.protocol_errors.labels(ep.name, kind).inc()
            event("uplink.protocol_error", level=logging.ERROR, endpoint=ep.name, kind=kind,
                  detail=detail, flag="UPE")
            raise TransportError(code="PROTOCOL_ERROR", flag="UPE", kind=ErrorKind.RETRYABLE,
                                 detail=detail)
        return ack


def ack_problem(ack: pb.Ack, ids: list[tuple[int, int]]) -> tuple[str, str] | None:
    """(kind, detail) when ``ack`` is not one known result per envelope, in order, echoing
    its (epoch, seq); None when it is."""
    if len(ack.results) != len(ids):
        return "count", f"ack has {len(ack.results)} results for {len(ids)} envelopes"
    for i, (r, (epoch, seq)) in enumerate(zip(ack.results, ids, strict=True)):
        if (r.epoch, r.seq) != (epoch, seq):
            return "identity", (f"result {i} is for ({r.epoch:016x}, {r.seq}), sent "
                                f"({epoch:016x}, {seq})")
        if r.disposition not in DISPOSITIONS:
            return "disposition", f"result {i} (seq {seq}) has disposition {r.disposition}"
    return None


class Recorded:
    def __init__(self, inner: EndpointCall, *, pool: EndpointPool) -> None:
        self.inner, self.pool = inner, pool

    async def send(self, batch: Outgoing, ep: Endpoint) -> pb.Ack:
        try:
            ack = await self.inner.send(batch, ep)
        except TransportError as err:
            self.pool.record(ep, err)
            raise
        self.pool.record(ep, None)
        return ack


class Failover:
    def __init__(self, inner: EndpointCall, *, pool: EndpointPool,
                 metrics: AgentMetrics) -> None:
        self.inner, self.pool, self.metrics = inner, pool, metrics

    async def send(self, batch: Outgoing, attempt: int) -> Delivered | Failed:
        ep = await self.pool.pick()
        t0 = time.perf_counter()
        try:
            ack = await self.inner.send(batch, ep)
        except TransportError as err:
            elapsed = time.perf_counter() - t0
            self.metrics.batches.labels(ep.name, err.code).inc()
            self.metrics.batch_seconds.labels(ep.name).observe(elapsed)
            event("uplink.batch", level=logging.WARNING, endpoint=ep.name, leg=ep.leg,
                  batch_id=batch.batch_id, first_seq=batch.ids[0][1],
                  last_seq=batch.ids[-1][1], readings=batch.readings, status=err.code,
                  flag=err.flag, attempt=attempt, duration_ms=round(elapsed * 1000, 3),
                  reason=err.detail)
            return Failed(err, ep)
        return Delivered(ack, ep, attempt, time.perf_counter() - t0)


class Retry:
    def __init__(self, inner: Failover, *, pool: EndpointPool, metrics: AgentMetrics,
                 backoff_max_s: float, on_throttled: Callable[[float], None]) -> None:
        self.inner, self.pool, self.metrics = inner, pool, metrics
        self.backoff_max_s = backoff_max_s
        self.on_throttled = on_throttled

    async def send(self, batch: Outgoing) -> Delivered | Oversized:
        """The batch's delivery, or the batch size the ingest asked for instead."""
        backoff = Backoff(base_s=0.05, cap_s=self.backoff_max_s)
        attempt = 0
        while True:
            attempt += 1
            outcome = await self.inner.send(batch, attempt)
            if isinstance(outcome, Delivered):
                return outcome
            err, ep = outcome.error, outcome.endpoint
            if err.kind is ErrorKind.THROTTLED:
                self.metrics.throttled.labels(ep.name).inc()
                if err.max_envelopes is not None and batch.readings > err.max_envelopes:
                    return Oversized(err.max_envelopes, ep)
                # Busy, not broken (nothing was counted against the endpoint): wait the
                # hint, and let the sender hold its backlog back meanwhile.
                wait = backoff.next_delay() if err.retry_after_s is None else \
                    hinted_wait(err.retry_after_s)
                self.on_throttled(wait)
                self.metrics.throttle_wait.labels(ep.name).inc(wait)
                await backoff.sleep(wait)
                continue
            self.metrics.retries.labels(ep.name, err.flag).inc()
            if attempt >= len(self.pool.endpoints):
                # Every endpoint had a go: back off, but wake as soon as health changes.
                await self.pool.wait_changed(backoff.next_delay())

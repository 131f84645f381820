"""Endpoints in priority order, each with health state; picks where the next batch goes.

State per endpoint (``EndpointState``): CONNECTING until its first health answer, then HEALTHY
or UNHEALTHY. A prober task per endpoint runs the standard ``grpc.health.v1`` check every
``health_interval_s`` while healthy, and with capped jittered backoff while unhealthy. A failed
call marks the endpoint UNHEALTHY at once (passive health), so the in-flight batches on it move
to the next healthy endpoint immediately, with the same request ids.

``pick()`` returns the highest-priority HEALTHY endpoint, but waits while a higher-priority one
is still CONNECTING, so "the first reachable endpoint" wins at start. When the active endpoint
changes because it failed, that is a failover: a counter and an ``uplink.failover`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Sequence

from bridge.telemetry import AgentMetrics, event
from bridge.uplink.backoff import Backoff
from bridge.uplink.transport import Transport, TransportError


class EndpointState(enum.Enum):
    CONNECTING = "connecting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Endpoint:
    def __init__(self, *, name: str, target: str, transport: Transport, backoff_max_s: float,
                 ) -> None:
        self.name, self.target, self.transport = name, target, transport
        self.state = EndpointState.CONNECTING
        self.last_error = ""
        self.last_ack_ns = 0
        self.backoff = Backoff(base_s=0.1, cap_s=backoff_max_s)
        self.failed = asyncio.Event()


class EndpointPool:
    def __init__(self, *, endpoints: Sequence[Endpoint], metrics: AgentMetrics,
                 health_interval_s: float, health_timeout_s: float) -> None:
        self.endpoints = list(endpoints)
        self.metrics = metrics
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.active: Endpoint | None = None
        self.failovers = 0
        self.last_failover_ns = 0
        self.failover_first_ack_ns = 0  # first ack on the new endpoint after the last failover
        self._awaiting_first_ack = False
        self._changed = asyncio.Event()
        self._none_healthy_since: float | None = None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for ep in self.endpoints:
                tg.create_task(self._probe(ep), name=f"probe-{ep.name}")

    async def _probe(self, ep: Endpoint) -> None:
        while True:
            try:
                ok = await ep.transport.healthy(timeout=self.health_timeout_s)
                reason = "" if ok else "health check: NOT_SERVING"
                flag = "UH"
            except TransportError as err:
                ok, reason, flag = False, f"health check: {err.code}: {err.detail}", err.flag
            if ok:
                ep.backoff.reset()
                self._set(ep, EndpointState.HEALTHY, "")
                ep.failed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ep.failed.wait(), self.health_interval_s)
                if ep.failed.is_set():
                    # A call failed on it: give it a backoff before probing again.
                    await ep.backoff.sleep()
            else:
                self._set(ep, EndpointState.UNHEALTHY, reason, flag=flag)
                await ep.backoff.sleep()

    def _set(self, ep: Endpoint, state: EndpointState, reason: str, *, flag: str = "") -> None:
        if ep.state is state:
            return
        old, ep.state = ep.state, state
        if reason:
            ep.last_error = reason
        self.metrics.endpoint_healthy.labels(ep.name).set(1 if state is EndpointState.HEALTHY
                                                          else 0)
        level = logging.INFO if state is EndpointState.HEALTHY else logging.WARNING
        event("uplink.endpoint_state", level=level, endpoint=ep.name, target=ep.target,
              old=old.value, new=state.value, reason=reason or None, flag=flag or None)
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def mark_failed(self, ep: Endpoint, err: TransportError) -> None:
        """Passive health: a call failed; move traffic off it now."""
        if ep.state is not EndpointState.UNHEALTHY:
            self._set(ep, EndpointState.UNHEALTHY, f"{err.code}: {err.detail}", flag=err.flag)
            ep.failed.set()

    def mark_ok(self, ep: Endpoint) -> None:
        ep.last_ack_ns = time.time_ns()
        if self._awaiting_first_ack and ep is self.active:
            self._awaiting_first_ack = False
            self.failover_first_ack_ns = ep.last_ack_ns
            event("uplink.failover_completed", endpoint=ep.name,
                  failover_s=round((ep.last_ack_ns - self.last_failover_ns) / 1e9, 3))

    def _choose(self) -> Endpoint | None:
        for ep in self.endpoints:
            if ep.state is EndpointState.HEALTHY:
                return ep
            if ep.state is EndpointState.CONNECTING:
                return None
        return None

    async def pick(self) -> Endpoint:
        while True:
            waiter = self._changed
            ep = self._choose()
            if ep is not None:
                if self._none_healthy_since is not None:
                    event("uplink.upstream_restored", endpoint=ep.name,
                          waited_s=round(time.monotonic() - self._none_healthy_since, 3))
                    self._none_healthy_since = None
                if ep is not self.active:
                    self._activate(ep)
                return ep
            if self._none_healthy_since is None and all(
                    e.state is EndpointState.UNHEALTHY for e in self.endpoints):
                self._none_healthy_since = time.monotonic()
                event("uplink.no_healthy_upstream", level=logging.WARNING, flag="UH",
                      endpoints={e.name: e.last_error for e in self.endpoints})
            await waiter.wait()

    def _activate(self, ep: Endpoint) -> None:
        prev, self.active = self.active, ep
        if prev is not None and prev.state is not EndpointState.HEALTHY:
            self.failovers += 1
            self.last_failover_ns = time.time_ns()
            self._awaiting_first_ack = True
            self.metrics.failovers.labels(prev.name, ep.name).inc()
            event("uplink.failover", level=logging.WARNING, from_endpoint=prev.name,
                  to_endpoint=ep.name, reason=prev.last_error)
        else:
            event("uplink.active", endpoint=ep.name, previous=prev.name if prev else None,
                  reason="initial" if prev is None else "higher priority endpoint healthy")

    def snapshot(self) -> list[dict[str, object]]:
        return [{"name": e.name, "target": e.target, "state": e.state.value,
                 "active": e is self.active, "last_error": e.last_error or None,
                 "last_ack_ns": e.last_ack_ns or None} for e in self.endpoints]

    async def close(self) -> None:
        for ep in self.endpoints:
            await ep.transport.close()

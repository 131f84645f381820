"""Endpoints in priority order, each with health state and a breaker; picks where a batch goes.

Health (``EndpointState``): CONNECTING until its first health answer, then HEALTHY or UNHEALTHY.
A prober task per endpoint runs the standard ``grpc.health.v1`` check every
``health_interval_s`` with a ``health_timeout_s`` deadline (active health: a hung or blackholed
endpoint is found within about a second, long before TCP would notice), and with capped,
jittered backoff while unhealthy; a successful probe wakes it early. A connection-level failure
of a call (UNAVAILABLE, or the endpoint going unhealthy while the call is in flight) marks the
endpoint UNHEALTHY at once, and the batches in flight on it are resent elsewhere with the same
request ids.

Gray failure: a call that times out (DEADLINE_EXCEEDED, flag ``UT``) on an endpoint whose
health checks pass marks it UNHEALTHY at once, like a connection failure: its batches move to
the next endpoint with the same ids, within one call deadline of the stall. Health brings it
back, but fail-back waits ``failback_after_s`` doubled per consecutive stall (up to 16x).

Refusals: a call answered PERMISSION_DENIED or UNAUTHENTICATED (``ErrorKind.REFUSED``: the
site's certificate is revoked or not accepted there) takes the endpoint out of rotation for
``refused_retry_s`` (60 s), whatever its health checks say, which the ingest answers for any
certificate it accepts at the TLS layer. Its batches go to the next endpoint; with none left
they wait in the spool. Once per ``refused_retry_s`` a single call (the probe; the other
batches keep waiting) tries again, so a refused site does not hammer the cloud; an accepted
call clears the refusal. ``snapshot`` shows the state
``refused`` with the server's reason; ``bridge_uplink_endpoint_refused`` is 1 meanwhile.

Passive health: every call outcome feeds the endpoint's ``CircuitBreaker``; an OPEN breaker
takes the endpoint out of rotation until its half-open probes succeed. Throttling does not count.

Choice (``pick``): the highest-priority eligible endpoint (HEALTHY and breaker not OPEN) that is
*stable*. An endpoint that has failed before becomes stable only after ``failback_after_s`` of
continuous health, so a flapping primary does not pull traffic back and forth. If no eligible
endpoint is stable, the active one is kept if eligible, else the highest-priority eligible one.
When the active endpoint changes because it failed, that is a failover (counter and event).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Sequence

from bridge.edge.uplink.breaker import BreakerState, CircuitBreaker
from bridge.edge.uplink.transport import Transport
from bridge.shared import defaults as D
from bridge.shared.errors import ErrorKind, TransportError
from bridge.shared.pacing import Backoff, wait_event
from bridge.shared.telemetry import AgentMetrics, event


class EndpointState(enum.Enum):
    CONNECTING = "connecting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Endpoint:
    def __init__(self, *, name: str, target: str, transport: Transport, backoff_max_s: float,
                 breaker: CircuitBreaker, leg: str | None = None) -> None:
        """``leg``: the interface its connections are bound to (None: the host's routing)."""
        self.name, self.target, self.transport, self.leg = name, target, transport, leg
        self.breaker = breaker
        self.state = EndpointState.CONNECTING
        self.last_error = ""
        self.last_flag = ""
        self.last_ack_ns = 0
        self.healthy_since = 0.0
        self.ever_failed = False
        self.gray_failures = 0  # consecutive calls that timed out while health passed
        self.refusal = ""  # the server's reason while it refuses this identity
        self.refused_until = 0.0  # the pool's clock: out of rotation until then
        self.refusal_probe = False  # the one call trying a refused endpoint again is out
        self.srtt: float | None = None  # smoothed health-check round trip (RFC 6298)
        self.rttvar = 0.0
        self.backoff = Backoff(base_s=0.1, cap_s=backoff_max_s)
        # Set when the endpoint goes down; replaced by a fresh event when it comes back.
        self.down = asyncio.Event()


class EndpointPool:
    def __init__(self, *, endpoints: Sequence[Endpoint], metrics: AgentMetrics,
                 health_interval_s: float, health_timeout_s: float,
                 health_timeout_min_s: float = 0.3, failback_after_s: float = 30.0,
                 refused_retry_s: float = D.REFUSED_RETRY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = list(endpoints)
        self.metrics = metrics
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.health_timeout_min_s = min(health_timeout_min_s, health_timeout_s)
        self.failback_after_s = failback_after_s
        self.refused_retry_s = refused_retry_s
        self._clock = clock
        self.active: Endpoint | None = None
        self.failovers = 0
        self.last_failover_ns = 0
        self.failover_first_ack_ns = 0  # first ack on the new endpoint after the last failover
        self._awaiting_first_ack = False
        self._changed = asyncio.Event()
        self._none_healthy_since: float | None = None
        self._retiring: set[asyncio.Future[None]] = set()  # old transports closing (rebuild)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for ep in self.endpoints:
                tg.create_task(self._probe(ep), name=f"probe-{ep.name}")
            tg.create_task(self._stability_timer(), name="failback-timer")

    def probe_timeout(self, ep: Endpoint) -> float:
        """The probe deadline: 3 x srtt + 4 x rttvar (RFC 6298 estimators, with headroom for a
        busy ingest), clamped to [min, max]. Before any measurement: the max."""
        if ep.srtt is None:
            return self.health_timeout_s
        rto = 3 * ep.srtt + 4 * ep.rttvar
        return min(self.health_timeout_s, max(self.health_timeout_min_s, rto))

    @staticmethod
    def _observe_rtt(ep: Endpoint, rtt: float) -> None:
        if ep.srtt is None:
            ep.srtt, ep.rttvar = rtt, rtt / 2
        else:
            ep.rttvar = 0.75 * ep.rttvar + 0.25 * abs(ep.srtt - rtt)
            ep.srtt = 0.875 * ep.srtt + 0.125 * rtt

    async def _probe(self, ep: Endpoint) -> None:
        while True:
            t0 = self._clock()
            try:
                ok = await ep.transport.healthy(timeout=self.probe_timeout(ep))
                if ok:
                    self._observe_rtt(ep, self._clock() - t0)
                reason, flag = ("", "") if ok else ("health check: NOT_SERVING", "UH")
            except TransportError as err:
                ok, reason, flag = False, f"health check: {err.code}: {err.detail}", err.flag
            if ok:
                ep.backoff.reset()
                self._set(ep, EndpointState.HEALTHY, "")
                down = ep.down
                await wait_event(down, self.health_interval_s)
                if down.is_set():
                    await ep.backoff.sleep()  # a call failed on it: back off before probing
            else:
                self._set(ep, EndpointState.UNHEALTHY, reason, flag=flag)
                await ep.backoff.sleep()

    async def _stability_timer(self) -> None:
        """Wake pickers when a recovered endpoint becomes stable (fail-back is due)."""
        while True:
            now = self._clock()
            due = [self._stable_at(ep) - now for ep in self.endpoints
                   if ep.state is EndpointState.HEALTHY and self._stable_at(ep) > now]
            due += [ep.refused_until - now for ep in self.endpoints if ep.refused_until > now]
            waiter = self._changed
            if due:
                await wait_event(waiter, max(0.01, min(due)))
                self._notify()
            else:
                await waiter.wait()

    async def wait_changed(self, timeout: float) -> None:
        """Sleep up to ``timeout``, waking early on any health or breaker change."""
        await wait_event(self._changed, timeout)

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def _set(self, ep: Endpoint, state: EndpointState, reason: str, *, flag: str = "") -> None:
        if ep.state is state:
            return
        old, ep.state = ep.state, state
        if reason:
            ep.last_error, ep.last_flag = reason, flag
        if state is EndpointState.HEALTHY:
            ep.healthy_since = self._clock()
            if ep.down.is_set():
                ep.down = asyncio.Event()
        else:
            ep.down.set()
            ep.ever_failed = True
        self.metrics.endpoint_healthy.labels(ep.name).set(1 if state is EndpointState.HEALTHY
                                                          else 0)
        level = logging.INFO if state is EndpointState.HEALTHY else logging.WARNING
        event("uplink.endpoint_state", level=level, endpoint=ep.name, leg=ep.leg,
              target=ep.target,
              old=old.value, new=state.value, reason=reason or None, flag=flag or None)
        self._notify()

    # -- call outcomes ---------------------------------------------------------------------

    def record(self, ep: Endpoint, err: TransportError | None) -> None:
        """Feed a call outcome to the breaker; connection failures also mark it down now."""
        if err is not None and err.kind is ErrorKind.THROTTLED:
            ep.breaker.release()  # busy, not broken: frees a half-open probe slot, counts nothing
            return
        ep.refusal_probe = False  # whatever the probe's outcome, it is back
        if err is not None and err.kind is ErrorKind.REFUSED:
            ep.breaker.release()  # not the endpoint's fault: the identity's
            self._refuse(ep, err)
            return
        before = ep.breaker.state
        after = ep.breaker.record(err is None)
        if after is not before:
            self.metrics.breaker_state.labels(ep.name).set(_BREAKER_GAUGE[after])
            level = logging.WARNING if after is BreakerState.OPEN else logging.INFO
            event("uplink.breaker", level=level, endpoint=ep.name, old=before.value,
                  new=after.value, reason=f"{err.code}: {err.detail}" if err else "probe ok")
            if after is BreakerState.OPEN:
                self.metrics.breaker_trips.labels(ep.name).inc()
            self._notify()
        if err is None:
            ep.last_ack_ns = time.time_ns()
            ep.gray_failures = 0
            if ep.refusal:
                event("uplink.refusal_cleared", endpoint=ep.name, leg=ep.leg,
                      was=ep.refusal)
                ep.refusal, ep.refused_until = "", 0.0
                self.metrics.endpoint_refused.labels(ep.name).set(0)
            if self._awaiting_first_ack and ep is self.active:
                self._awaiting_first_ack = False
                self.failover_first_ack_ns = ep.last_ack_ns
                event("uplink.failover_completed", endpoint=ep.name,
                      failover_s=round((ep.last_ack_ns - self.last_failover_ns) / 1e9, 3))
        elif err.code == "UNAVAILABLE":
            self._set(ep, EndpointState.UNHEALTHY, f"{err.code}: {err.detail}", flag=err.flag)
        elif err.code == "DEADLINE_EXCEEDED" and ep.state is EndpointState.HEALTHY:
            # Gray failure: health checks pass but a call made no progress for its whole
            # deadline (a stalled store behind a healthy front). Take it out now, as a
            # connection failure would; its other batches move with the same ids.
            ep.gray_failures += 1
            self.metrics.stalls.labels(ep.name).inc()
            event("uplink.stall", level=logging.WARNING, endpoint=ep.name, flag="UT",
                  reason=err.detail or "deadline exceeded", stalls=ep.gray_failures,
                  failback_after_s=self._failback_s(ep))
            self._set(ep, EndpointState.UNHEALTHY, "no acknowledgement within the call "
                      "deadline while health checks pass (gray failure)", flag="UT")

    def _refuse(self, ep: Endpoint, err: TransportError) -> None:
        """Out of rotation for ``refused_retry_s``: no retry cures a refused identity."""
        now = self._clock()
        again = ep.refused_until > now  # another call that was in flight when it began
        ep.refused_until = now + self.refused_retry_s
        ep.refusal = f"{err.code}: {err.detail}"
        ep.last_error, ep.last_flag = ep.refusal, err.flag
        self.metrics.refused.labels(ep.name, err.code).inc()
        self.metrics.endpoint_refused.labels(ep.name).set(1)
        if not again:
            event("uplink.refused", level=logging.ERROR, endpoint=ep.name, leg=ep.leg,
                  target=ep.target, code=err.code, reason=err.detail, flag=err.flag,
                  retry_in_s=self.refused_retry_s,
                  action="the ingest refuses this site's certificate: check the certificate "
                         "and the cloud's deny-list; nothing is dropped meanwhile")
        self._notify()

    def refused(self, ep: Endpoint) -> bool:
        """Out of rotation: refused within the retry period, or its one probe is out."""
        return ep.refused_until > self._clock() or (bool(ep.refusal) and ep.refusal_probe)

    # -- choosing --------------------------------------------------------------------------

    def _failback_s(self, ep: Endpoint) -> float:
        """Fail-back delay: doubled per consecutive gray failure (up to 16x), so a node that
        stalls every call but answers health checks does not pull traffic back each time."""
        return self.failback_after_s * float(2 ** min(max(ep.gray_failures - 1, 0), 4))

    def _stable_at(self, ep: Endpoint) -> float:
        return ep.healthy_since + (self._failback_s(ep) if ep.ever_failed else 0.0)

    def _eligible(self, ep: Endpoint) -> bool:
        return ep.state is EndpointState.HEALTHY and ep.breaker.would_allow() and \
            not self.refused(ep)

    def _choose(self) -> Endpoint | None:
        for ep in self.endpoints:
            if ep.state is EndpointState.CONNECTING:
                return None  # a higher-priority endpoint may still answer: first reachable wins
            if self._eligible(ep):
                break
        eligible = [ep for ep in self.endpoints if self._eligible(ep)]
        if not eligible:
            return None
        now = self._clock()
        for ep in eligible:
            if self._stable_at(ep) <= now:
                return ep
        if self.active in eligible:
            return self.active
        return eligible[0]

    async def pick(self) -> Endpoint:
        while True:
            waiter = self._changed
            ep = self._choose()
            if ep is not None and ep.breaker.allow():
                if ep.refusal:  # its retry period is over: this call is the one probe
                    ep.refusal_probe = True
                if self._none_healthy_since is not None:
                    event("uplink.upstream_restored", endpoint=ep.name,
                          waited_s=round(self._clock() - self._none_healthy_since, 3))
                    self._none_healthy_since = None
                if ep is not self.active:
                    self._activate(ep)
                return ep
            if self._none_healthy_since is None and not any(
                    self._eligible(e) for e in self.endpoints) and all(
                    e.state is not EndpointState.CONNECTING for e in self.endpoints):
                self._none_healthy_since = self._clock()
                event("uplink.no_healthy_upstream", level=logging.WARNING, flag="UH",
                      endpoints={e.name: e.last_error or e.breaker.state.value
                                 for e in self.endpoints})
            # Half-open probe slots and breaker cooldowns free up without an event.
            await wait_event(waiter, 0.1)

    def _activate(self, ep: Endpoint) -> None:
        prev, self.active = self.active, ep
        if prev is not None and not self._eligible(prev):
            self.failovers += 1
            self.last_failover_ns = time.time_ns()
            self._awaiting_first_ack = True
            self.metrics.failovers.labels(prev.name, ep.name).inc()
            event("uplink.failover", level=logging.WARNING, from_endpoint=prev.name,
                  to_endpoint=ep.name, reason=prev.last_error or
                  f"breaker {prev.breaker.state.value}", flag=prev.last_flag or None)
        else:
            event("uplink.active", endpoint=ep.name, previous=prev.name if prev else None,
                  reason="initial" if prev is None else
                  f"fail-back: healthy for {self.failback_after_s:g} s")

    def snapshot(self) -> list[dict[str, object]]:
        return [{"name": e.name, "target": e.target, "leg": e.leg,
                 # refused until an accepted call clears it (also while a retry is due)
                 "state": "refused" if e.refusal else e.state.value,
                 "breaker": e.breaker.state.value, "active": e is self.active,
                 "last_error": e.last_error or None, "last_ack_ns": e.last_ack_ns or None}
                for e in self.endpoints]

    def rebuild(self, make: Callable[[Endpoint], Transport], *, grace_s: float) -> None:
        """Give every endpoint a new transport (rotated credentials): calls and probes from now
        on use it; calls in flight finish on the old one, closed within ``grace_s``."""
        for ep in self.endpoints:
            old, ep.transport = ep.transport, make(ep)
            task = asyncio.ensure_future(old.close(grace=grace_s))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        event("uplink.channels_rebuilt", endpoints=[ep.name for ep in self.endpoints],
              grace_s=grace_s)

    async def close(self) -> None:
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for ep in self.endpoints:
            await ep.transport.close()


_BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}

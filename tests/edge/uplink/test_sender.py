"""Sender + pool + real spool, driven by scripted transports (fault injection at the seam)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.edge.spool import AsyncSpool, Pending, Spool
from bridge.edge.uplink.breaker import BreakerState, CircuitBreaker
from bridge.edge.uplink.pool import Endpoint, EndpointPool
from bridge.edge.uplink.sender import Sender
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.config import BreakerConfig, UplinkConfig
from bridge.shared.telemetry import AgentMetrics
from tests.edge.uplink.fakes import ScriptedTransport


class Rig:
    def __init__(self, tmp_path: Path, names: list[str], *, failback_after_s: float,
                 deadline_s: float = 30.0, drain_max_per_s: float = 0.0,
                 min_requests: int = 5) -> None:
        self.metrics = AgentMetrics()
        self.spool = AsyncSpool(Spool(path=tmp_path / "spool.db", site_id="s",
                                      max_bytes=1 << 24))
        self.fakes = {n: ScriptedTransport(n) for n in names}
        self.pool = EndpointPool(
            endpoints=[Endpoint(name=n, target=n, transport=t, backoff_max_s=0.2,
                                breaker=CircuitBreaker(min_requests=min_requests, open_s=0.2))
                       for n, t in self.fakes.items()],
            metrics=self.metrics, health_interval_s=0.05, health_timeout_s=0.2,
            failback_after_s=failback_after_s)
        cfg = UplinkConfig(endpoints=(), batch_max_readings=10, batch_max_bytes=1 << 20,
                           max_in_flight=4, deadline_s=deadline_s, health_interval_s=0.05,
                           health_timeout_s=0.2, health_timeout_min_s=0.1,
                           failback_after_s=failback_after_s,
                           backoff_max_s=0.2,
                           breaker=BreakerConfig(window_s=10, error_rate=0.15, min_requests=5,
                                                 open_s=0.2, half_open_probes=3),
                           drain_max_per_s=drain_max_per_s)
        self.sender = Sender(spool=self.spool, pool=self.pool, config=cfg, metrics=self.metrics)
        self.appended = 0

    async def append(self, n: int) -> None:
        pend = [Pending(envelope=pb.Envelope(site_id="s"))
                for _ in range(n)]
        await self.spool.commit(pend)
        self.appended += n
        self.spool.appended.set()

    def delivered(self) -> set[int]:
        return {s for f in self.fakes.values() for s in f.committed}

    async def until(self, cond, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.01)


@pytest.fixture
async def rig_factory(tmp_path: Path) -> AsyncIterator:
    tasks: list[asyncio.Task] = []
    rigs: list[Rig] = []

    async def make(names: list[str], **kw) -> Rig:
        rig = Rig(tmp_path / str(len(rigs)), names, **kw)
        rigs.append(rig)
        tasks.append(asyncio.create_task(rig.pool.run()))
        tasks.append(asyncio.create_task(rig.sender.run()))
        return rig

    yield make
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    for r in rigs:
        await r.pool.close()
        await r.spool.close()


async def test_fail_back_waits_until_the_primary_has_been_healthy_for_the_stable_period(
        rig_factory):
    rig: Rig = await rig_factory(["a", "b"], failback_after_s=0.6)
    a, b = rig.fakes["a"], rig.fakes["b"]
    await rig.append(10)
    await rig.until(lambda: len(a.committed) == 10)
    a.up = False
    await rig.append(10)
    await rig.until(lambda: len(b.committed) == 10)
    assert rig.pool.failovers == 1
    a.up = True
    await rig.until(lambda: rig.pool.endpoints[0].state.value == "healthy")
    await rig.append(10)
    await rig.until(lambda: len(rig.delivered()) == 30)
    assert len(b.committed) == 20, "recovered primary not stable yet: traffic stays on b"
    await rig.until(lambda: rig.pool._choose() is rig.pool.endpoints[0], timeout=5)
    await rig.append(10)
    await rig.until(lambda: len(a.committed) == 20)
    assert rig.pool.failovers == 1, "a fail-back is not a failover"


async def test_a_hung_endpoint_is_abandoned_long_before_the_call_deadline(rig_factory):
    rig: Rig = await rig_factory(["a", "b"], failback_after_s=30, deadline_s=60)
    a, b = rig.fakes["a"], rig.fakes["b"]
    await rig.append(10)
    await rig.until(lambda: len(a.committed) == 10)
    a.hung = True
    await rig.append(40)
    # The deadline is 60 s; the batches stuck on 'a' move to 'b' once its probe times out.
    await rig.until(lambda: rig.delivered() == set(range(1, 51)), timeout=10)
    assert set(b.committed) == set(range(11, 51))
    assert rig.pool.endpoints[0].last_flag == "UT"
    await rig.until(lambda: rig.spool.figures().readings == 0)  # released after the acks


async def test_throttling_waits_for_the_hint_and_does_not_count_against_the_endpoint(
        rig_factory):
    rig: Rig = await rig_factory(["a", "b"], failback_after_s=30)
    a = rig.fakes["a"]
    for _ in range(10):
        a.throttle_ms = 20
        await rig.append(10)
        await rig.until(lambda: len(a.committed) == rig.appended)
    assert rig.fakes["b"].committed == []
    assert rig.pool.endpoints[0].breaker.state is BreakerState.CLOSED
    assert rig.metrics.throttled.labels("a")._value.get() == 10


async def test_a_failing_endpoint_trips_its_breaker_and_traffic_moves(rig_factory):
    rig: Rig = await rig_factory(["a", "b"], failback_after_s=30)
    a = rig.fakes["a"]
    original = a.push
    failures = 0

    async def flaky(batch: bytes, *, batch_id: str, timeout: float) -> pb.Ack:
        nonlocal failures
        from bridge.shared.errors import ErrorKind, TransportError
        failures += 1
        raise TransportError(code="INTERNAL", flag="UF", kind=ErrorKind.RETRYABLE,
                             detail="disk error")

    a.push = flaky  # type: ignore[method-assign]
    await rig.append(50)
    await rig.until(lambda: len(rig.fakes["b"].committed) == 50)
    assert rig.pool.endpoints[0].breaker.trips >= 1
    assert rig.metrics.breaker_trips.labels("a")._value.get() >= 1
    a.push = original  # type: ignore[method-assign]


async def test_after_an_outage_live_readings_overtake_the_backlog_which_drains_paced(
        rig_factory):
    rig: Rig = await rig_factory(["a"], failback_after_s=30, drain_max_per_s=400)
    a = rig.fakes["a"]
    await rig.append(10)
    await rig.until(lambda: len(a.committed) == 10)
    a.up = False
    await rig.append(1000)  # the backlog piles up while the cloud is away
    a.up = True
    await rig.until(lambda: rig.sender.draining)
    await rig.append(20)  # live readings arrive during the drain
    await rig.until(lambda: set(range(1011, 1031)) <= set(a.committed))
    assert len([s for s in a.committed if s <= 1010]) < 1010, "live went before the backlog"
    assert rig.sender.draining
    await rig.until(lambda: rig.delivered() == set(range(1, 1031)), timeout=10)
    await rig.until(lambda: not rig.sender.draining)
    backlog_order = [s for s in a.committed if 10 < s <= 1010]
    assert backlog_order == sorted(backlog_order), "the backlog drains in order"
    await rig.until(lambda: rig.spool.spool.holds.spans() == [])  # every batch let go


def _answering(a: ScriptedTransport, rewrite) -> None:
    """Make ``a`` answer with its normal ack passed through ``rewrite`` (a broken ingest)."""
    original = a.push

    async def push(batch: bytes, *, batch_id: str, timeout: float) -> pb.Ack:
        ack = await original(batch, batch_id=batch_id, timeout=timeout)
        return rewrite(ack)

    a.push = push  # type: ignore[method-assign]


@pytest.mark.parametrize("kind", ["disposition", "identity", "count"])
async def test_an_ack_that_does_not_echo_what_was_sent_releases_nothing(rig_factory, kind):
    rig: Rig = await rig_factory(["a", "b"], failback_after_s=30)
    a, b = rig.fakes["a"], rig.fakes["b"]

    def broken(ack: pb.Ack) -> pb.Ack:
        if kind == "disposition":
            ack.results[0].disposition = pb.DISPOSITION_UNSPECIFIED
        elif kind == "identity":
            ack.results[-1].seq += 1000
        else:
            del ack.results[-1]
        return ack

    _answering(a, broken)
    await rig.append(10)
    await rig.until(lambda: rig.metrics.protocol_errors.labels("a", kind)._value.get() >= 1)
    assert rig.spool.figures().readings == 10  # not one row deleted on a bad ack
    b.up = True
    a.up = False  # the broken node goes away: the same readings are delivered elsewhere
    await rig.until(lambda: rig.spool.figures().readings == 0)
    assert set(b.committed) == set(range(1, 11))


async def test_an_endpoint_healthy_to_probes_but_never_acking_is_left_within_one_deadline(
        rig_factory):
    # A breaker minimum the 4 calls in flight cannot reach in its window: only the stall
    # detection can move the traffic.
    rig: Rig = await rig_factory(["a", "b"], failback_after_s=30, deadline_s=0.3,
                                 min_requests=1000)
    a, b = rig.fakes["a"], rig.fakes["b"]
    await rig.append(10)
    await rig.until(lambda: len(a.committed) == 10)

    async def stalled(batch: bytes, *, batch_id: str, timeout: float) -> pb.Ack:
        from bridge.shared.errors import ErrorKind, TransportError
        await asyncio.sleep(timeout)  # what grpc does at the deadline: the store never answers
        raise TransportError(code="DEADLINE_EXCEEDED", flag="UT", kind=ErrorKind.RETRYABLE,
                             detail="Deadline Exceeded")

    a.push = stalled  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await rig.append(40)
    await rig.until(lambda: set(b.committed) == set(range(11, 51)), timeout=5)
    elapsed = loop.time() - t0
    assert elapsed < 2 * 0.3 + 0.3, elapsed  # goal: within 2x the deadline (plus slack)
    assert rig.metrics.stalls.labels("a")._value.get() >= 1
    assert rig.pool.active is rig.pool.endpoints[1]
    assert rig.pool.endpoints[0].gray_failures >= 1


async def test_while_an_ingest_asks_to_wait_the_backlog_waits_and_live_readings_go_first(
        rig_factory):
    rig: Rig = await rig_factory(["a", "b"], failback_after_s=30)
    a = rig.fakes["a"]
    a.throttle_ms = 3000  # the first call (a backlog batch) is told to come back in 3 s
    await rig.append(200)  # past 2 x max_in_flight x batch: drained as a backlog
    await rig.until(lambda: rig.sender.busy_until > 0)
    await rig.append(10)  # live
    await rig.until(lambda: set(range(201, 211)) <= set(a.committed), timeout=2)
    backlog = [s for s in a.committed if s <= 200]

    assert 1 not in backlog, "the throttled batch waits its turn"
    assert len(backlog) <= 30, "the backlog waits with it (only batches already in flight " \
        "went on)"
    await rig.until(lambda: rig.delivered() == set(range(1, 211)), timeout=15)
    assert rig.fakes["b"].committed == []
    assert rig.pool.failovers == 0
    assert rig.metrics.throttle_wait.labels("a")._value.get() >= 3.0


async def test_an_answer_naming_the_next_turn_holds_the_backlog_not_live_nor_the_window(
        rig_factory):
    rig: Rig = await rig_factory(["a", "b"], failback_after_s=30)
    a = rig.fakes["a"]
    a.next_after_ms = 3000  # the first batch with a backlog behind it: its next call in 3 s
    await rig.append(200)  # past 2 x max_in_flight x batch: drained as a backlog
    await rig.until(lambda: rig.sender.busy_until > 0)
    assert len(a.turned) == 1 and 0 < a.turned[0] < 200, "the batch said what is behind it"
    assert rig.sender.window >= 2, "a turn is not a throttle: the window still grows"
    before = {s for s in a.committed if s <= 200}
    await rig.append(10)  # live
    await rig.until(lambda: set(range(201, 211)) <= set(a.committed), timeout=2)
    backlog = {s for s in a.committed if s <= 200}
    assert len(backlog) <= len(before) + 40 and len(backlog) < 200, \
        "the backlog waits for its turn (only batches already in flight went on)"
    await rig.until(lambda: rig.delivered() == set(range(1, 211)), timeout=15)
    assert rig.fakes["b"].committed == [] and rig.pool.failovers == 0
    assert rig.metrics.next_turns.labels("a")._value.get() == 1
    assert 3.0 <= rig.metrics.next_turn_wait.labels("a")._value.get() <= 3.02
    assert rig.metrics.throttled.labels("a")._value.get() == 0

from __future__ import annotations

from bridge.edge.uplink.breaker import BreakerState, CircuitBreaker
from bridge.shared.pacing import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_breaker_trips_only_above_the_error_rate_with_enough_volume():
    clock = Clock()
    b = CircuitBreaker(window_s=10, error_rate=0.15, min_requests=20, clock=clock)
    for _ in range(3):
        b.record(False)
    assert b.state is BreakerState.CLOSED, "3 failures are below the minimum volume"
    for _ in range(17):
        b.record(True)
    assert b.state is BreakerState.CLOSED, "3/20 = 15% does not exceed 15%"
    b.record(False)
    assert b.state is BreakerState.OPEN and b.trips == 1, "4/21 > 15%"


def test_old_outcomes_leave_the_sliding_window():
    clock = Clock()
    b = CircuitBreaker(window_s=10, error_rate=0.15, min_requests=5, clock=clock)
    for _ in range(4):
        b.record(False)
    clock.t += 11
    for _ in range(20):
        b.record(True)
    b.record(False)  # 1 of 21 in the window; with the 4 old failures it would be 5 of 25
    assert b.state is BreakerState.CLOSED and b.trips == 0


def test_an_open_breaker_waits_then_lets_a_few_probes_through_and_closes_on_success():
    clock = Clock()
    b = CircuitBreaker(window_s=10, error_rate=0.1, min_requests=2, open_s=5,
                       half_open_probes=2, clock=clock)
    b.record(False)
    b.record(False)
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.t += 5
    assert b.allow() and b.allow() and not b.allow(), "two probe slots"
    assert b.state is BreakerState.HALF_OPEN
    b.record(True)
    assert b.state is BreakerState.HALF_OPEN
    b.record(True)
    assert b.state is BreakerState.CLOSED


def test_a_failed_probe_opens_the_breaker_again():
    clock = Clock()
    b = CircuitBreaker(window_s=10, error_rate=0.1, min_requests=1, open_s=5, clock=clock)
    b.record(False)
    clock.t += 5
    assert b.allow()
    b.record(False)
    assert b.state is BreakerState.OPEN and b.trips == 2 and not b.allow()


def test_a_released_probe_slot_counts_nothing():
    clock = Clock()
    b = CircuitBreaker(error_rate=0.1, min_requests=1, open_s=1, half_open_probes=1,
                       clock=clock)
    b.record(False)
    clock.t += 1
    assert b.allow() and not b.allow()
    b.release()
    assert b.allow() and b.state is BreakerState.HALF_OPEN


def test_a_token_bucket_refills_at_its_rate_and_never_refuses_a_big_batch_forever():
    clock = Clock()
    bucket = TokenBucket(rate=100, burst=200, clock=clock)
    assert bucket.take(150) == 0.0
    assert bucket.take(100) == 0.5, "50 left, 100 needed at 100/s"
    clock.t += 0.5
    assert bucket.take(100) == 0.0
    clock.t += 10
    assert bucket.take(1000) == 0.0, "a batch above the burst passes once the bucket is full"
    assert bucket.take(1) > 0


def test_the_probe_deadline_follows_the_measured_round_trip_within_its_bounds():
    from bridge.edge.uplink.pool import Endpoint, EndpointPool
    from bridge.shared.telemetry import AgentMetrics
    from tests.edge.uplink.fakes import ScriptedTransport

    ep = Endpoint(name="a", target="a", transport=ScriptedTransport("a"), backoff_max_s=1,
                  breaker=CircuitBreaker())
    pool = EndpointPool(endpoints=[ep], metrics=AgentMetrics(), health_interval_s=0.25,
                        health_timeout_s=2.0, health_timeout_min_s=0.3)
    assert pool.probe_timeout(ep) == 2.0, "no measurement yet: the maximum"
    for _ in range(20):
        pool._observe_rtt(ep, 0.002)
    assert pool.probe_timeout(ep) == 0.3, "a fast link is held to the minimum"
    for _ in range(50):
        pool._observe_rtt(ep, 0.2)
    assert 0.55 < pool.probe_timeout(ep) < 0.65, "a 200 ms WAN gets about 3 x srtt"
    for _ in range(50):
        pool._observe_rtt(ep, 5.0)
    assert pool.probe_timeout(ep) == 2.0


def _uplink(*, min_requests: int, max_in_flight: int = 4, deadline_s: float = 5.0):
    from bridge.shared.config import BreakerConfig, UplinkConfig

    return UplinkConfig(endpoints=(), batch_max_readings=10, batch_max_bytes=1 << 20,
                        max_in_flight=max_in_flight, deadline_s=deadline_s,
                        health_interval_s=0.25, health_timeout_s=2.0, health_timeout_min_s=0.3,
                        failback_after_s=30.0, backoff_max_s=10.0,
                        breaker=BreakerConfig(window_s=10.0, error_rate=0.15,
                                              min_requests=min_requests, open_s=5.0,
                                              half_open_probes=3))


def test_the_breaker_minimum_is_lowered_to_what_a_stalled_endpoint_can_reach():
    from bridge.edge.uplink.breaker import for_uplink, reachable_minimum

    # 4 calls in flight, each ending one 5 s deadline after it started: 8 per 10 s window.
    assert reachable_minimum(_uplink(min_requests=20)) == 8
    assert reachable_minimum(_uplink(min_requests=5)) == 5, "a reachable minimum is kept"
    assert reachable_minimum(_uplink(min_requests=20, max_in_flight=1, deadline_s=60)) == 1
    b = for_uplink(_uplink(min_requests=20), min_requests=8)
    for _ in range(8):
        b.record(False)
    assert b.state is BreakerState.OPEN, "eight stalled calls open it"

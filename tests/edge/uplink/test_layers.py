"""Each layer of the send path on its own (bridge.edge.uplink.layers), with scripted inner
layers and a real endpoint pool over scripted transports."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest

from bridge.edge.uplink.breaker import CircuitBreaker
from bridge.edge.uplink.layers import (
    Deadline,
    Delivered,
    Failed,
    Failover,
    Outgoing,
    Oversized,
    Recorded,
    Retry,
    StrictAcks,
    ack_problem,
    hinted_wait,
)
from bridge.edge.uplink.pool import Endpoint, EndpointPool
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import ErrorKind, TransportError
from bridge.shared.telemetry import AgentMetrics
from tests.conftest import metric_value
from tests.edge.uplink.fakes import ScriptedTransport

EPOCH = 9


def batch(n: int = 3) -> Outgoing:
    return Outgoing.of("b-1", [pb.Envelope(site_id="s", epoch=EPOCH, seq=i)
                               .SerializeToString() for i in range(1, n + 1)])


def good_ack(b: Outgoing) -> pb.Ack:
    return pb.Ack(batch_id=b.batch_id, results=[
        pb.EnvelopeAck(site_id="s", epoch=e, seq=s, disposition=pb.DISPOSITION_COMMITTED)
        for e, s in b.ids])


def pool_of(*names: str) -> tuple[EndpointPool, dict[str, ScriptedTransport], AgentMetrics]:
    metrics = AgentMetrics()
    fakes = {n: ScriptedTransport(n) for n in names}
    pool = EndpointPool(endpoints=[Endpoint(name=n, target=n, transport=t, backoff_max_s=0.2,
                                            breaker=CircuitBreaker(min_requests=5, open_s=0.2))
                                   for n, t in fakes.items()],
                        metrics=metrics, health_interval_s=0.05, health_timeout_s=0.2,
                        failback_after_s=0.0)
    return pool, fakes, metrics


class Scripted:
    """An inner layer that answers from a script: an ack, or an error to raise."""

    def __init__(self, *answers: pb.Ack | TransportError) -> None:
        self.answers = list(answers)
        self.seen: list[str] = []

    async def send(self, b: Outgoing, ep: Endpoint) -> pb.Ack:
        self.seen.append(ep.name)
        answer = self.answers.pop(0)
        if isinstance(answer, TransportError):
            raise answer
        return answer


def unavailable() -> TransportError:
    return TransportError(code="UNAVAILABLE", flag="UF", kind=ErrorKind.RETRYABLE, detail="x")


def throttled(retry_after_s: float | None = 0.01, most: int | None = None) -> TransportError:
    return TransportError(code="RESOURCE_EXHAUSTED", flag="RL", kind=ErrorKind.THROTTLED,
                          detail="busy", retry_after_s=retry_after_s, max_envelopes=most)


async def test_the_deadline_layer_abandons_a_call_once_its_endpoint_is_found_down():
    pool, fakes, _ = pool_of("a")
    ep = pool.endpoints[0]
    fakes["a"].hung = True
    call = asyncio.create_task(Deadline(deadline_s=60).send(batch(), ep))
    await asyncio.sleep(0)
    assert not call.done()
    ep.down.set()  # what the health probe does when it finds the endpoint down
    with pytest.raises(TransportError, match="abandoned in flight"):
        await asyncio.wait_for(call, 5)
    with pytest.raises(TransportError) as exc:  # down already: no call at all
        await Deadline(deadline_s=60).send(batch(), ep)
    assert exc.value.code == "UNAVAILABLE" and fakes["a"].calls == 1


async def test_the_deadline_layer_passes_the_transports_ack_through():
    pool, fakes, _ = pool_of("a")
    ack = await Deadline(deadline_s=5).send(batch(), pool.endpoints[0])
    assert [r.seq for r in ack.results] == [1, 2, 3] and fakes["a"].committed == [1, 2, 3]


@pytest.mark.parametrize(("ack", "kind"), [
    (lambda b: pb.Ack(results=good_ack(b).results[:2]), "count"),
    (lambda b: pb.Ack(results=[*good_ack(b).results[:2],
                               pb.EnvelopeAck(epoch=EPOCH, seq=7, disposition=1)]), "identity"),
    (lambda b: pb.Ack(results=[*good_ack(b).results[:2],
                               pb.EnvelopeAck(epoch=EPOCH, seq=3, disposition=0)]),
     "disposition"),
])
async def test_strict_acks_turn_an_ack_that_does_not_echo_the_batch_into_a_protocol_error(
        ack, kind: str):
    pool, _, metrics = pool_of("a")
    b = batch()
    layer = StrictAcks(Scripted(ack(b)), metrics=metrics)
    with pytest.raises(TransportError) as exc:
        await layer.send(b, pool.endpoints[0])
    assert (exc.value.code, exc.value.flag) == ("PROTOCOL_ERROR", "UPE")
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, f'bridge_uplink_protocol_errors_total{{endpoint="a",'
                              f'kind="{kind}"}}') == 1
    assert ack_problem(good_ack(b), b.ids) is None


async def test_the_recorded_layer_feeds_every_outcome_to_the_endpoints_breaker():
    pool, _, _ = pool_of("a")
    ep = pool.endpoints[0]
    b = batch()
    layer = Recorded(Scripted(*[unavailable()] * 5, good_ack(b)), pool=pool)
    for _ in range(5):
        with pytest.raises(TransportError):
            await layer.send(b, ep)
    assert ep.breaker.state.value == "open", "five failures of five opened it"
    ep2 = pool_of("b")[0].endpoints[0]
    with pytest.raises(TransportError):
        await Recorded(Scripted(throttled()), pool=pool).send(b, ep2)
    assert ep2.breaker.state.value == "closed", "a throttle is busy, not broken"


async def test_failover_picks_an_endpoint_per_attempt_and_reports_a_failed_one():
    pool, fakes, metrics = pool_of("a", "b")
    probing = asyncio.create_task(pool.run())  # health checks make the endpoints eligible
    try:
        b = batch()
        inner = Scripted(unavailable(), good_ack(b))
        layer = Recorded(inner, pool=pool)
        failover = Failover(layer, pool=pool, metrics=metrics)
        first = await asyncio.wait_for(failover.send(b, 1), 10)
        assert isinstance(first, Failed) and first.endpoint.name == "a"
        text = generate_latest(metrics.registry).decode()
        assert metric_value(text, 'bridge_uplink_batches_total{code="UNAVAILABLE",'
                                  'endpoint="a"}') == 1
        fakes["a"].up = False  # the health check finds it down too: the next pick fails over
        second = await asyncio.wait_for(failover.send(b, 2), 10)
        assert isinstance(second, Delivered) and second.attempt == 2
        assert inner.seen == ["a", "b"]
    finally:
        probing.cancel()
        await pool.close()


class Attempts:
    """A failover layer from a script of outcomes, endpoint "a"."""

    def __init__(self, ep: Endpoint, *errors: TransportError | None) -> None:
        self.ep, self.errors, self.attempts = ep, list(errors), 0

    async def send(self, b: Outgoing, attempt: int) -> Delivered | Failed:
        self.attempts = attempt
        err = self.errors.pop(0)
        return Failed(err, self.ep) if err is not None else \
            Delivered(good_ack(b), self.ep, attempt, 0.001)


async def test_retry_waits_a_throttles_hint_and_tells_the_sender_without_counting_a_retry():
    pool, _, metrics = pool_of("a")
    waits: list[float] = []
    inner = Attempts(pool.endpoints[0], throttled(0.05), None)
    layer = Retry(inner, pool=pool, metrics=metrics, backoff_max_s=0.2,  # type: ignore[arg-type]
                  on_throttled=waits.append)
    done = await layer.send(batch())
    assert isinstance(done, Delivered) and done.attempt == 2
    assert len(waits) == 1 and 0.05 <= waits[0] <= 0.05 + 0.0025 + 1e-9
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, 'bridge_uplink_throttled_total{endpoint="a"}') == 1
    assert metric_value(text, 'bridge_uplink_retries_total{endpoint="a",flag="RL"}') == 0


async def test_retry_hands_back_a_batch_the_ingest_says_is_too_large():
    pool, _, metrics = pool_of("a")
    layer = Retry(Attempts(pool.endpoints[0], throttled(None, most=2)),  # type: ignore[arg-type]
                  pool=pool, metrics=metrics, backoff_max_s=0.2, on_throttled=lambda s: None)
    out = await layer.send(batch(3))
    assert isinstance(out, Oversized) and out.most == 2 and out.endpoint.name == "a"


async def test_retry_tries_again_at_once_until_every_endpoint_had_a_go_then_waits_for_health():
    pool, _, metrics = pool_of("a", "b")
    waited: list[float] = []

    async def wait_changed(timeout: float) -> None:
        waited.append(timeout)

    pool.wait_changed = wait_changed  # type: ignore[method-assign]
    inner = Attempts(pool.endpoints[0], unavailable(), unavailable(), unavailable(), None)
    layer = Retry(inner, pool=pool, metrics=metrics, backoff_max_s=0.2,  # type: ignore[arg-type]
                  on_throttled=lambda s: None)
    done = await layer.send(batch())
    assert isinstance(done, Delivered) and done.attempt == 4
    assert len(waited) == 2, "no wait after the first failure; one after each from the second"
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, 'bridge_uplink_retries_total{endpoint="a",flag="UF"}') == 3


@pytest.mark.parametrize("hint, low, high", [
    (0.0, 0.0, 0.0), (3.0, 3.0, 3.02), (1e12, 600.0, 600.02), (float("inf"), 600.0, 600.02),
    (-5.0, 0.0, 0.0), (float("nan"), 0.0, 0.0)])
def test_a_hint_is_waited_jittered_up_and_never_past_ten_minutes_or_below_zero(
        hint: float, low: float, high: float):
    assert low <= hinted_wait(hint) <= high

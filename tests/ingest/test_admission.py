"""Admission control's decisions, on a clock the test moves (bridge.ingest.admission)."""

from __future__ import annotations

import asyncio

from bridge.ingest.admission import MAX_RETRY_S, OVERBOOK, WINDOW_S, Admission, Held


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def low(a: float, b: float) -> float:
    """No jitter: the low end of every range."""
    return a


def node(clock: Clock, **kw: object) -> Admission:
    args: dict[str, object] = {"target_s": 0.3, "initial": 1000, "floor": 500,
                               "ceiling": 100_000}
    args.update(kw)
    return Admission(clock=clock, jitter=low, **args)  # type: ignore[arg-type]


def test_an_idle_node_admits_any_call_even_one_larger_than_its_limit() -> None:
    a = node(Clock())
    assert a.admit(50_000) is None
    assert a.in_flight == 50_000
    a.done(50_000, 0.1)
    assert a.in_flight == 0


async def test_a_call_that_will_have_room_soon_is_held_and_admitted_in_order() -> None:
    a = node(Clock())
    assert a.admit(1000) is None
    first, second = a.admit(300), a.admit(300)
    assert isinstance(first, Held) and isinstance(second, Held)
    assert a.held_readings == 600
    a.done(1000, 0.1)
    await asyncio.wait_for(asyncio.gather(first.ready, second.ready), 1)
    assert a.in_flight == 600 and a.held_readings == 0


async def test_a_held_call_whose_caller_gave_up_leaves_no_trace() -> None:
    a = node(Clock())
    assert a.admit(1000) is None
    gone, kept = a.admit(300), a.admit(300)
    assert isinstance(gone, Held) and isinstance(kept, Held)
    a.cancel(gone)
    assert a.held_readings == 300
    a.done(1000, 0.1)
    await asyncio.wait_for(kept.ready, 1)
    assert gone.ready.cancelled() and a.in_flight == 300


async def test_work_beyond_what_the_node_can_take_in_time_waits_its_place_in_a_line() -> None:
    a = node(Clock())  # rate 1000/0.3 readings/s: 0.3 s of holding is 1,000 readings
    assert a.admit(1000) is None
    assert isinstance(a.admit(900), Held)
    waits = [a.admit(500) for _ in range(5)]
    spacing = 500 / (a.rate * OVERBOOK)
    for k, w in enumerate(waits):
        assert isinstance(w, float) and abs(w - max(k * spacing, 0.01)) < 1e-9, (k, w)
    assert a.refused["full"] == 5
    assert abs(a.line_s - 5 * spacing) < 1e-9


def test_the_line_is_spent_as_time_passes() -> None:
    clock = Clock()
    a = node(clock)
    assert a.admit(1000) is None
    a.rate = 1000.0
    [a.admit(5000) for _ in range(3)]  # 15 s of readings told to come back
    assert abs(a.line_s - 15 / OVERBOOK) < 1e-9
    clock.now += 10
    assert abs(a.line_s - (15 / OVERBOOK - 10)) < 1e-9
    clock.now += 10
    assert a.line_s == 0.0
    w = a.admit(5000)  # a refusal now starts a new line
    assert isinstance(w, float) and w == 0.01


def test_a_call_that_waited_too_long_before_its_handler_is_refused_even_by_an_idle_node(
        ) -> None:
    a = node(Clock())
    assert isinstance(a.admit(100, waited=a.max_wait_s + 0.5), float)
    assert a.refused["late"] == 1
    assert a.admit(100, waited=a.max_wait_s / 2) is None


def test_the_limit_shrinks_when_calls_outlast_the_target_and_grows_when_busy_and_fast(
        ) -> None:
    clock = Clock()
    a = node(clock, initial=4000)
    for _ in range(4):
        assert a.admit(1000) is None
    for _ in range(4):
        a.done(1000, 0.6)
    clock.now += WINDOW_S
    assert a.admit(1) is None
    assert a.limit == 2000  # mean 0.6 s against a 0.3 s target: halved
    a.done(1, 0.0)
    for _ in range(10):  # more work than it runs, while calls take 0.05 s: it grows
        assert a.admit(10**6) is None  # an idle node admits it; then it is full
        assert isinstance(a.admit(1), float)
        a.done(10**6, 0.05)
        clock.now += WINDOW_S
    a.admit(1)
    assert a.limit > 2000 * 1.1 ** 9


def test_the_limit_stays_within_its_floor_and_ceiling() -> None:
    clock = Clock()
    a = node(clock, initial=600, ceiling=1000)
    for _ in range(20):
        assert a.admit(600) is None
        a.done(600, 30.0)
        clock.now += WINDOW_S
    a.admit(1)
    assert a.limit == 500
    assert node(Clock(), initial=10**9, ceiling=1000).limit == 1000


def test_the_rate_is_measured_only_where_the_node_had_more_work_than_it_ran() -> None:
    clock = Clock()
    a = node(clock)
    before = a.rate
    assert a.admit(100) is None
    a.done(100, 0.01)  # 100 readings in a window: an idle node, not a slow one
    clock.now += WINDOW_S
    a.admit(1)
    assert a.rate == before


def test_no_site_is_told_to_wait_longer_than_a_minute() -> None:
    a = node(Clock())
    a.rate = 1.0  # a node that measured almost nothing
    assert a.admit(1000) is None
    waits = [a.admit(10_000) for _ in range(3)]
    assert all(isinstance(w, float) and w <= MAX_RETRY_S for w in waits)


async def test_a_call_larger_than_the_limit_is_held_until_what_is_ahead_of_it_finished(
        ) -> None:
    a = node(Clock())
    assert a.admit(1) is None
    big = a.admit(10_000)  # 10 times the limit, but only one reading ahead of it
    assert isinstance(big, Held)
    assert isinstance(a.admit(1), float)  # not around it: behind it is 3 s of work
    a.done(1, 0.01)
    await asyncio.wait_for(big.ready, 1)
    assert a.in_flight == 10_000

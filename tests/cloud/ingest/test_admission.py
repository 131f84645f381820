"""Admission control's decisions, on a clock the test moves (bridge.cloud.ingest.admission)."""

from __future__ import annotations

import asyncio

from bridge.cloud.ingest.admission import (
    EARLY_S,
    HOLD_EARLY_S,
    INITIAL_RATE,
    MAX_EARLY_HOLDS,
    MAX_RETRY_S,
    MIN_RETRY_S,
    OVERBOOK,
    WINDOW_S,
    Admission,
    Held,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def low(a: float, b: float) -> float:
    """No jitter: the low end of every range."""
    return a


_sites = iter(range(10**9))


def admit(a: Admission, n: int, waited: float = 0.0) -> float | Held | None:
    """A call of a site not seen before (the line's per-site rule has its own test)."""
    return a.admit(f"site-{next(_sites)}", n, waited)


def node(clock: Clock, **kw: object) -> Admission:
    args: dict[str, object] = {"target_s": 0.3, "max_wait_s": None, "initial": 1000,
                               "initial_rate": 1000 / 0.3, "floor": 500, "ceiling": 100_000}
    args.update(kw)
    return Admission(clock=clock, jitter=low, **args)  # type: ignore[arg-type]


def test_an_idle_node_admits_any_call_even_one_larger_than_its_limit() -> None:
    a = node(Clock())
    assert admit(a, 50_000) is None
    assert a.in_flight == 50_000
    a.done(50_000, 0.1)
    assert a.in_flight == 0


async def test_a_call_that_will_have_room_soon_is_held_and_admitted_in_order() -> None:
    a = node(Clock())
    assert admit(a, 1000) is None
    first, second = admit(a, 300), admit(a, 300)
    assert isinstance(first, Held) and isinstance(second, Held)
    assert a.held_readings == 600
    a.done(1000, 0.1)
    await asyncio.wait_for(asyncio.gather(first.ready, second.ready), 1)
    assert a.in_flight == 600 and a.held_readings == 0


async def test_a_held_call_whose_caller_gave_up_leaves_no_trace() -> None:
    a = node(Clock())
    assert admit(a, 1000) is None
    gone, kept = admit(a, 300), admit(a, 300)
    assert isinstance(gone, Held) and isinstance(kept, Held)
    a.cancel(gone)
    assert a.held_readings == 300
    a.done(1000, 0.1)
    await asyncio.wait_for(kept.ready, 1)
    assert gone.ready.cancelled() and a.in_flight == 300


async def test_work_beyond_what_the_node_can_take_in_time_waits_its_place_in_a_line() -> None:
    a = node(Clock())  # rate 1000/0.3 readings/s: 0.3 s of holding is 1,000 readings
    assert admit(a, 1000) is None
    assert isinstance(admit(a, 900), Held)
    waits = [admit(a, 500) for _ in range(5)]
    spacing = 500 / (a.rate * OVERBOOK)
    for k, w in enumerate(waits):
        assert isinstance(w, float) and abs(w - max(k * spacing, MIN_RETRY_S)) < 1e-9, (k, w)
    assert a.refused["full"] == 5
    assert abs(a.line_s - 5 * spacing) < 1e-9


def test_the_line_is_spent_as_time_passes() -> None:
    clock = Clock()
    a = node(clock)
    assert admit(a, 1000) is None
    a.rate = 1000.0
    [admit(a, 5000) for _ in range(3)]  # 15 s of readings told to come back
    assert abs(a.line_s - 15 / OVERBOOK) < 1e-9
    clock.now += 10
    assert abs(a.line_s - (15 / OVERBOOK - 10)) < 1e-9
    clock.now += 10
    assert a.line_s == 0.0
    w = admit(a, 5000)  # a refusal now starts a new line
    assert isinstance(w, float) and w == MIN_RETRY_S


def test_a_call_that_waited_too_long_before_its_handler_is_refused_even_by_an_idle_node(
        ) -> None:
    a = node(Clock())
    assert isinstance(admit(a, 100, waited=a.max_wait_s + 0.5), float)
    assert a.refused["late"] == 1
    assert admit(a, 100, waited=a.max_wait_s / 2) is None


def test_the_limit_shrinks_when_calls_outlast_the_target_and_grows_when_busy_and_fast(
        ) -> None:
    clock = Clock()
    a = node(clock, initial=4000)
    for _ in range(4):
        assert admit(a, 1000) is None
    for _ in range(4):
        a.done(1000, 0.6)
    clock.now += WINDOW_S
    assert admit(a, 1) is None
    assert a.limit == 2000  # mean 0.6 s against a 0.3 s target: halved
    a.done(1, 0.0)
    for _ in range(10):  # more work than it runs, while calls take 0.05 s: it grows
        assert admit(a, 10**6) is None  # an idle node admits it; then it is full
        assert isinstance(admit(a, 1), float)
        a.done(10**6, 0.05)
        clock.now += WINDOW_S
    admit(a, 1)
    assert a.limit > 2000 * 1.1 ** 9


def test_the_limit_stays_within_its_floor_and_ceiling() -> None:
    clock = Clock()
    a = node(clock, initial=600, ceiling=1000)
    for _ in range(20):
        assert admit(a, 600) is None
        a.done(600, 30.0)
        clock.now += WINDOW_S
    admit(a, 1)
    assert a.limit == 500
    assert node(Clock(), initial=10**9, ceiling=1000).limit == 1000


def test_the_rate_is_measured_only_where_the_node_had_more_work_than_it_ran() -> None:
    clock = Clock()
    a = node(clock)
    before = a.rate
    assert admit(a, 100) is None
    a.done(100, 0.01)  # 100 readings in a window: an idle node, not a slow one
    clock.now += WINDOW_S
    admit(a, 1)
    assert a.rate == before


def test_no_site_is_told_to_wait_longer_than_a_minute() -> None:
    a = node(Clock())
    a.rate = 1.0  # a node that measured almost nothing
    assert admit(a, 1000) is None
    waits = [admit(a, 10_000) for _ in range(3)]
    assert all(isinstance(w, float) and w <= MAX_RETRY_S for w in waits)


async def test_a_call_larger_than_the_limit_is_held_until_what_is_ahead_of_it_finished(
        ) -> None:
    a = node(Clock())
    assert admit(a, 1) is None
    big = admit(a, 10_000)  # 10 times the limit, but only one reading ahead of it
    assert isinstance(big, Held)
    assert isinstance(admit(a, 1), float)  # not around it: behind it is 3 s of work
    a.done(1, 0.01)
    await asyncio.wait_for(big.ready, 1)
    assert a.in_flight == 10_000


async def test_a_site_that_comes_back_before_it_was_told_is_refused_with_the_time_left(
        ) -> None:
    clock = Clock()
    a = node(clock)
    assert a.admit("busy", 2000) is None
    assert isinstance(a.admit("other", 5000), float)  # a place at the front of the line
    told = a.admit("hasty", 5000)
    assert isinstance(told, float) and told >= 1.0
    line = a.line_s
    clock.now += 0.5
    again = a.admit("hasty", 1)  # even a small call: not before its time
    assert again == told - 0.5
    assert a.refused["early"] == 1 and a.line_s == line - 0.5  # no second place taken
    clock.now += told - 0.5
    a.done(2000, 0.1)
    assert a.admit("hasty", 1) is None  # its time, and room


async def test_a_held_call_that_does_not_fit_yet_does_not_hold_back_smaller_ones_that_do(
        ) -> None:
    a = node(Clock())
    assert admit(a, 300) is None and admit(a, 300) is None
    big, small = admit(a, 1000), admit(a, 100)
    assert isinstance(big, Held) and isinstance(small, Held)
    a.done(300, 0.1)
    await asyncio.wait_for(small.ready, 1)  # 300 + 100 fit; 300 + 1,000 do not yet
    assert not big.ready.done()
    a.done(300, 0.1)
    a.done(100, 0.1)
    await asyncio.wait_for(big.ready, 1)
    assert a.in_flight == 1000


async def test_a_site_far_ahead_of_its_share_waits_while_others_are_waiting() -> None:
    a = node(Clock(), initial=20_000)
    a.rate = 10_000.0
    assert a.admit("big", 15_000) is None  # an idle node: 1.5 s of its work
    assert a.admit("small", 100) is None   # room, no one waiting
    assert isinstance(a.admit("other", 20_000), float)  # no room: now a site waits
    wait = a.admit("big", 1)  # even a small call: big is ahead of its share
    assert isinstance(wait, float) and wait > 0
    assert a.refused["share"] == 1
    assert a.admit("small", 100) is None  # the small site is within its share: admitted


class Sleeps:
    """The node's timer, on the test's clock: records each wait and moves the clock by it."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.waits = clock, list[float]()

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.now += seconds


def told_to_wait(seconds: float) -> tuple[Clock, Sleeps, Admission]:
    """A node that told site "hasty" to come back in ``seconds``."""
    clock = Clock()
    sleeps = Sleeps(clock)
    a = Admission(clock=clock, jitter=low, sleep=sleeps, target_s=0.3, max_wait_s=None,
                  initial=1000, initial_rate=1000 / 0.3, floor=500, ceiling=100_000)
    assert a.admit("busy", 2000) is None
    while a.line_s < seconds:
        assert isinstance(admit(a, 10_000), float)  # the line grows that far ahead
    assert isinstance(told := a.admit("hasty", 1), float) and told >= seconds
    return clock, sleeps, a


async def test_a_call_that_comes_early_waits_on_the_node_for_its_sites_time_then_is_admitted(
        ) -> None:
    clock, sleeps, a = told_to_wait(0.5)
    left = a.told_left("hasty")
    await a.wait_turn("hasty", None)
    assert sleeps.waits == [min(left, HOLD_EARLY_S)] and a.early_holds == 1
    if left <= HOLD_EARLY_S:
        clock.now += EARLY_S
        a.done(2000, 0.1)
        assert a.admit("hasty", 1) is None  # not refused again: it waited its time here


async def test_an_early_call_waits_at_most_a_second_and_never_past_its_deadline() -> None:
    _, sleeps, a = told_to_wait(5.0)
    await a.wait_turn("hasty", None)
    await a.wait_turn("hasty", 0.2)
    await a.wait_turn("hasty", -1.0)  # no time left before its deadline: no wait at all
    assert sleeps.waits == [HOLD_EARLY_S, 0.2]
    assert isinstance(a.admit("hasty", 1), float) and a.refused["early"] == 1


async def test_a_site_that_may_ask_never_waits_and_too_many_early_calls_are_refused_at_once(
        ) -> None:
    _, sleeps, a = told_to_wait(5.0)
    await a.wait_turn("someone-else", None)
    a.early_holding = MAX_EARLY_HOLDS
    await a.wait_turn("hasty", None)
    assert sleeps.waits == [] and a.early_holds == 0


async def test_the_first_sites_are_placed_at_the_same_pace_whatever_the_target() -> None:
    # Before any window measured the rate, refusals are placed with a guess; a slow one
    # (it was the initial limit over the target: 5,000/s at 1 s) told the first sites to
    # come back late and left the node idle until they did.
    waits = []
    for target in (0.3, 1.0):
        a = Admission(clock=Clock(), jitter=low, target_s=target, max_wait_s=0.1)
        assert admit(a, 5_000) is None  # an idle node admits; the next ones wait or go
        waits.append([admit(a, 1_250) for _ in range(40)][-1])
    assert isinstance(waits[0], float) and waits[0] == waits[1]
    assert waits[0] <= 40 * 1_250 / (INITIAL_RATE * OVERBOOK)


async def test_a_call_waits_for_room_at_most_the_wait_bound_not_the_target() -> None:
    a = Admission(clock=Clock(), jitter=low, target_s=1.0, max_wait_s=0.1, initial=1_000,
                  initial_rate=10_000.0)
    assert admit(a, 1_000) is None
    assert isinstance(admit(a, 900), Held)  # 0.09 s of work ahead at the rate
    assert isinstance(admit(a, 500), float)  # 0.14 s: past the wait bound, refused
    assert isinstance(admit(a, 500, waited=0.11), float)  # queued past it before the handler
    assert a.refused["late"] == 1


def test_an_answer_names_no_next_turn_when_the_node_is_not_in_demand() -> None:
    a = node(Clock())
    assert admit(a, 1000) is None
    assert a.next_turn("site-x", 1000) == 0.0
    assert a.next_turns == 0 and a.line_s == 0.0


async def test_an_answer_in_demand_gives_the_next_call_its_place_in_the_line_without_a_refusal(
        ) -> None:
    clock = Clock()
    a = node(clock)
    assert admit(a, 1000) is None
    assert isinstance(admit(a, 900), Held)
    [admit(a, 500) for _ in range(3)]  # three calls refused: a line of 3 places
    spacing = 500 / (a.rate * OVERBOOK)
    turn = a.next_turn("answered", 500)
    assert abs(turn - 3 * spacing) < 1e-9, "after the calls refused before it"
    assert abs(a.line_s - 4 * spacing) < 1e-9, "and later ones go after it"
    assert a.refused["full"] == 3 and a.next_turns == 1
    early = a.admit("answered", 500)
    assert isinstance(early, float) and a.refused["early"] == 1, "not before its turn"
    clock.now += turn
    a.done(1000, 0.1)
    assert not isinstance(a.admit("answered", 500), float), "at its turn it is taken"


def test_an_answer_to_a_site_ahead_of_its_share_names_its_shares_time_without_a_place(
        ) -> None:
    clock = Clock()
    a = node(clock)
    a.rate = 1000.0
    assert a.admit("big", 1000) is None  # an idle node: its share is 1 s ahead
    a.done(1000, 0.1)
    assert a.admit("big", 1000) is None  # idle again: 2 s ahead
    admit(a, 500)  # another site refused: the node is in demand
    line = a.line_s
    turn = a.next_turn("big", 1000)
    assert abs(turn - (2.0 - 1.0)) < 1e-9  # its share's time, less the slack
    assert a.line_s == line, "no place taken in the line"

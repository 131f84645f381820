"""Admission control: a node takes the work it can finish well inside an agent's deadline.

After a regional outage every site drains its backlog at once. Queuing all of it makes every
call late: the agent's deadline passes, it resends readings already stored and takes a healthy
node for a stalled one. So a node runs at most ``limit`` readings at once (admitted, not yet
answered), holds a call briefly when it will have room within ``max_wait_s``, and refuses the
rest at once, before any per-envelope work, with RESOURCE_EXHAUSTED and a ``retry-after-ms``
that spreads the waiting sites over the time the node needs to serve them.

**Two bounds.** ``target_s`` (``limits.admit_target_ms``) sets how deep the node runs;
``max_wait_s`` (``limits.admit_wait_ms``, 100 ms) bounds how long a call waits for room before
its handler. An admitted call is answered in about the target plus at most the wait, so the
depth (a deeper tier commits more per CPU second: docs/deployment.md) is bought with handler
time, not with time spent waiting; a call that would wait longer takes its place in the line.

**The limit** follows Little's law: readings in flight = commit rate x time in the handler. It
is re-sized every ``WINDOW_S`` from what the node measured in that window: when the mean
handler time of the calls it answered exceeded ``target_s`` the limit shrinks in proportion;
when it had more work than it ran while its calls finished well inside the target it grows by a
tenth. It stays within ``[floor, ceiling]``, and a node with nothing running admits any call
(but one of a site told to come back later), so progress never depends on the estimates. The
commit ``rate`` is measured in the windows where the node had more work than it ran. A call
that does not fit yet does not hold back smaller held calls behind it that do.

**Waiting before the handler.** A node whose event loop is saturated queues calls where no
handler sees them (in gRPC, before the call is handed to Python). The agent states its
deadline (``bridge-deadline-ms``); the deadline gRPC gives the handler is counted from the
call's arrival, so the difference is how long the call ``waited`` before its handler ran. That
wait counts against ``max_wait_s``: a call that already waited that long is refused (a refusal
costs about a thirtieth of an admitted 1,250-reading call, so refusing drains that queue).

**Shares.** Each admitted call advances its site's share clock by its readings at the site's
share of the measured rate (the rate over the sites admitted in the last window). While the
node is in demand (no room, something held, or sites told to come back) a site more than
``FAIR_SLACK_S`` ahead of its share is told to come back when its share has caught up, without
a place in the line: one site with large calls cannot take the node from many with small ones.
An idle node, or one with room and no one waiting, admits whoever asks.

**The line.** A refused call is told to come back when the node should have served the readings
of every call refused before it: its readings are added at the end of a line that moves at the
measured rate, and the retry-after is the time until its place, jittered. Growing with the line
keeps the refusals near one per call however large the fleet, and spreads a recovering fleet
over the time the node needs for it. A site that comes back before it was told (less
``EARLY_S``) is not admitted before its time, even by an idle node, and takes no new place, so
a site that ignores its retry-after cannot take the node from the sites that wait. Its call
first waits for its site's time on the node, at most ``HOLD_EARLY_S`` and inside its deadline
(``MAX_EARLY_HOLDS`` at once), and is refused with the time left if that is not enough: a
client that ignores its retry-after and resends at once would otherwise spin the node on
refusals (receiving and refusing a 10,000-envelope call costs milliseconds; measured in
``bench.hostile``, 300 a second took the other sites' p99 from 0.25 s to 2.6 s), while a
waiting call costs a stream its site already holds and a timer. An agent's live batch sent
while its backlog waits is then admitted at its site's time instead of refused. Otherwise the
line is a schedule, not a reservation: a call that finds room is admitted whoever sent it.
Sites cannot be called back early, so the schedule errs on the fast side (``OVERBOOK``): a node
whose sites come back too soon refuses a few calls twice (a refusal costs about a thirtieth of
an admitted 1,250-reading call), one whose sites come back too late idles. For the same reason
the rate is measured only in windows where the handlers had more work than they ran (a call
held, or refused as full), never from a window spent refusing late calls or waiting for sites
that sleep.

**The next turn.** An agent draining a backlog says how much is behind its batch
(``backlog_readings``). Answering such a call while the node is in demand (a line, or calls
held), the node gives the site's next call its place in the line at once and names it in the
Ack (``next_after_ms``), as a refusal would have, or its share's time if the site ran ahead of
it: the agent waits for it instead of sending a 1,250-reading call only to hear "later" (the
refusal costs the node a thirtieth of the call, and the site's uplink the whole batch). A node
with no line and no call held names no turn.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from bridge.shared import defaults as D
from bridge.shared.grpcconn import DEADLINE_METADATA

WINDOW_S = 0.5       # how often the limit and the rate are re-sized
MAX_RETRY_S = 60.0   # no site is told to wait longer than this
MIN_RETRY_S = 0.1    # nor shorter: its other calls of the moment then find it placed (early)
FAIR_SLACK_S = 1.0   # how far a site may run ahead of its share while the node is in demand
OVERBOOK = 1.5       # the line moves this much faster than the measured rate (module doc)
MIN_WAIT_S = 0.05    # a call may always have waited this long before its handler
HOLD_EARLY_S = 1.0   # an early call waits at most this long for its site's time (module doc)
MAX_EARLY_HOLDS = 256  # early calls waiting at once; past it they are refused at once
EARLY_S = 0.05       # a site may come back this much before it was told (clocks, scheduling)
INITIAL_RATE = 20_000.0  # readings/s assumed until the first pressed window measures it


@dataclass(slots=True)
class Held:
    """A call waiting for room; ``ready`` resolves when it is admitted."""

    n: int
    ready: asyncio.Future[None]


class Admission:
    """The admission decision of one node; not thread-safe (the event loop owns it)."""

    def __init__(self, *, target_s: float = D.ADMIT_TARGET_MS / 1000,
                 max_wait_s: float | None = D.ADMIT_WAIT_MS / 1000,
                 initial: int = 5_000, initial_rate: float = INITIAL_RATE, floor: int = 500,
                 ceiling: int = 200_000, clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[float, float], float] = random.uniform,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.target_s, self.floor, self.ceiling = target_s, floor, ceiling
        # None: as long as the target (a held call is then answered in about twice it).
        self.max_wait_s = max(target_s if max_wait_s is None else max_wait_s, MIN_WAIT_S)
        self.limit = float(max(floor, min(initial, ceiling)))
        # Readings/s, measured from the first pressed window on. The first refusals are
        # placed with this guess before any measurement, so it errs on the fast side and
        # does not follow the target: a slow guess tells the first sites to come back late
        # and leaves the node idle until they do (a target of 1 s made it 5,000/s).
        self.rate = initial_rate
        self.in_flight = 0
        self.held_readings = 0
        self.refused: dict[str, int] = {"full": 0, "late": 0, "early": 0, "share": 0}
        self._told: dict[str, float] = {}  # site -> when it was told to come back
        self._share: dict[str, float] = {}  # site -> when its readings so far are served
        self._recent: dict[str, float] = {}  # site -> when it was last admitted
        self._clock, self._jitter, self._sleep = clock, jitter, sleep
        self._held: deque[Held] = deque()
        self.early_holding = 0  # early calls waiting for their site's time (wait_turn)
        self.early_holds = 0    # how many have waited, ever
        self.next_turns = 0     # OK answers that named their site's next turn, ever
        self._tail = 0.0  # when the readings of the sites told to come back are served
        self._window_at = clock()
        self._done_readings = 0
        self._done_calls = 0
        self._done_seconds = 0.0
        self._pressed = 0  # calls held or refused as full in this window: the handlers had
                           # more work than they ran (not so for calls refused as late)

    @property
    def line_s(self) -> float:
        """How far ahead the sites told to come back are spread, in seconds."""
        return max(0.0, self._tail - self._clock())

    def told_left(self, site: str) -> float:
        """Seconds until ``site`` was told to come back, less ``EARLY_S`` (0 when it may ask)."""
        back = self._told.get(site)
        return 0.0 if back is None else max(0.0, back - EARLY_S - self._clock())

    async def wait_turn(self, site: str, budget_s: float | None) -> None:
        """Wait until ``site`` may ask again, if it asked early: at most ``HOLD_EARLY_S``
        and ``budget_s`` (None: no deadline), and not when ``MAX_EARLY_HOLDS`` already wait
        (``admit`` then refuses it as early with the time left)."""
        left = self.told_left(site)
        if budget_s is not None:
            left = min(left, budget_s)
        if left <= 0 or self.early_holding >= MAX_EARLY_HOLDS:
            return
        self.early_holding += 1
        self.early_holds += 1
        try:
            await self._sleep(min(left, HOLD_EARLY_S))
        finally:
            self.early_holding -= 1

    def admit(self, site: str, n: int, waited: float = 0.0) -> float | Held | None:
        """Decide on a call of ``n`` readings of ``site`` that ``waited`` seconds before its
        handler ran: None (admitted: call ``done`` when answered), a ``Held`` to await (then
        admitted; ``cancel`` it if the call ends first), or the seconds ``site`` should wait
        before it asks again."""
        now = self._clock()
        self._resize(now)
        if waited > self.max_wait_s:
            return self._refuse("late", site, n, now)
        back = self._told.get(site)
        if back is not None and now < back - EARLY_S:
            # Told to come back later: not before then, even to an idle node (a site that
            # ignores its retry-after does not jump the line), and its readings do not take
            # a second place in it.
            self.refused["early"] += 1
            return back - now
        if self.in_flight == 0 and not self._held:  # progress never depends on estimates
            self._take(site, n, now)
            return None
        if not self._held and self.in_flight + n <= self.limit and self._tail <= now:
            self._take(site, n, now)  # room, and no one waits
            return None
        ahead_of_share = self._share.get(site, now) - now - FAIR_SLACK_S
        if ahead_of_share > 0:
            # The node is in demand and this site has had more than its share lately: it
            # comes back when its share has caught up, and the line does not grow.
            self.refused["share"] += 1
            self._pressed += 1
            self._told[site] = now + ahead_of_share
            return min(ahead_of_share, MAX_RETRY_S)
        if not self._held and self.in_flight + n <= self.limit:
            self._take(site, n, now)
            return None
        ahead = self.in_flight + self.held_readings
        # Room comes when enough of what is ahead has finished; a call larger than the limit
        # needs all of it finished (an idle node admits any call).
        if waited + min(ahead + n - self.limit, ahead) / self.rate <= self.max_wait_s:
            self._pressed += 1
            h = Held(n=n, ready=asyncio.get_running_loop().create_future())
            self._held.append(h)
            self.held_readings += n
            self._charge(site, n, now)
            return h
        return self._refuse("full", site, n, now)

    def _take(self, site: str, n: int, now: float) -> None:
        self.in_flight += n
        self._charge(site, n, now)

    def _charge(self, site: str, n: int, now: float) -> None:
        """Advance the site's share clock: its readings at its share of the measured rate
        (the rate over the sites served lately)."""
        self._recent[site] = now
        fair = self.rate / max(1, len(self._recent))
        self._share[site] = max(self._share.get(site, now), now) + n / fair

    def cancel(self, held: Held) -> None:
        """A held call ended (its caller gave up) before it was admitted."""
        if not held.ready.done():
            held.ready.cancel()
        try:
            self._held.remove(held)
        except ValueError:
            return  # already admitted: the caller calls done()
        self.held_readings -= held.n

    def done(self, n: int, seconds: float) -> None:
        """An admitted call of ``n`` readings was answered after ``seconds`` in its handler
        (committed or failed: either way it no longer holds the node); room goes to the held
        calls, in order."""
        self.in_flight = max(0, self.in_flight - n)
        self._done_readings += n
        self._done_calls += 1
        self._done_seconds += seconds
        # In order, but a call that does not fit yet (one larger than what is free) does not
        # hold back the smaller calls behind it that do: one site's large calls cannot make
        # every other site wait for them.
        for h in list(self._held):
            if h.ready.done():
                self._held.remove(h)  # cancelled
                self.held_readings -= h.n
            elif self.in_flight == 0 or self.in_flight + h.n <= self.limit:
                self._held.remove(h)
                self.held_readings -= h.n
                self.in_flight += h.n
                h.ready.set_result(None)

    def next_turn(self, site: str, n: int) -> float:
        """Seconds until ``site``, answered now with ``n`` readings still to send, should
        send its next call; 0 when the node is not in demand (module doc, "The next turn")."""
        now = self._clock()
        if not self._held and self._tail <= now:
            return 0.0
        self.next_turns += 1
        ahead_of_share = self._share.get(site, now) - now - FAIR_SLACK_S
        if ahead_of_share > 0:  # as a share refusal would say, and without a place
            self._told[site] = now + ahead_of_share
            return min(ahead_of_share, MAX_RETRY_S)
        return self._place(site, n, now)

    def _refuse(self, why: str, site: str, n: int, now: float) -> float:
        """A place at the end of the line, as a refusal."""
        self.refused[why] += 1
        if why == "full":
            self._pressed += 1
        return self._place(site, n, now)

    def _place(self, site: str, n: int, now: float) -> float:
        """A place at the end of the line: the wait until the node has served the readings
        of every call placed before it."""
        start = max(now, self._tail)
        spacing = n / (self.rate * OVERBOOK)
        self._tail = start + spacing
        wait = min(max(start - now + self._jitter(0.0, spacing), MIN_RETRY_S), MAX_RETRY_S)
        self._told[site] = max(self._told.get(site, 0.0), now + wait)
        return wait

    def _resize(self, now: float) -> None:
        """Every WINDOW_S: the commit rate measured and the limit re-sized (module doc)."""
        span = now - self._window_at
        if span < WINDOW_S:
            return
        pressed = self._pressed > 0
        if self._done_calls:
            measured = self._done_readings / span
            if pressed or measured > self.rate:  # an idle node's rate says nothing of its
                self.rate = max(0.7 * self.rate + 0.3 * measured, 1.0)  # capacity
            mean = self._done_seconds / self._done_calls
            if mean > self.target_s:
                self.limit *= max(0.5, self.target_s / mean)
            elif pressed and mean < 0.7 * self.target_s:
                self.limit *= 1.1
            self.limit = max(float(self.floor), min(self.limit, float(self.ceiling)))
        self._told = {site: t for site, t in self._told.items() if t > now}
        self._share = {site: t for site, t in self._share.items() if t > now}
        self._recent = {site: t for site, t in self._recent.items() if t > now - WINDOW_S}
        self._window_at = now
        self._done_readings = self._done_calls = self._pressed = 0
        self._done_seconds = 0.0


def queued_for(context: grpc.aio.ServicerContext[Any, Any]) -> float:
    """Seconds a call waited in the node before its handler ran: the deadline its caller
    stated (``bridge-deadline-ms``) minus what gRPC says is left; 0 if either is missing."""
    left = context.time_remaining()
    if left is None:
        return 0.0
    for key, value in context.invocation_metadata() or ():
        if key == DEADLINE_METADATA:
            try:
                stated = int(value) / 1000
            except (TypeError, ValueError):
                return 0.0
            return min(max(stated - left, 0.0), 3600.0)
    return 0.0

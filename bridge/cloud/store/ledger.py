"""The exact dedupe ledger: per (site, epoch), a contiguous watermark plus intervals above it.

Seqs are dense per (site, epoch) (the agent's spool numbers them), so "have I committed seq N"
has an exact answer in bounded memory: everything at or below ``watermark`` is known, and
``above`` holds the known seqs past it as sorted, disjoint, non-adjacent closed intervals
(readings out of order, and tombstone ranges the agent dropped). Every operation costs
O(log n + k) in the number of intervals n it touches, never in the width of a range: a
tombstone of 2^62 seqs is one interval. No time window: a reading resent after a week-long
outage is still recognised. Pure logic; the store persists the changes it reports.

Invariant: ``committed`` is the number of distinct known seqs; no interval in ``above`` starts
at or below ``watermark + 1`` (it would have been folded into the watermark). A store keeps at
most ``limits.max_gaps_per_stream`` intervals per stream (``Overlay``): seqs that would open
more are refused by name (``too_many_gaps``), so no order of arrival grows a ledger unbounded.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

Key = tuple[str, int]  # (site_id, epoch)
Span = tuple[int, int]  # closed interval (first, last)


@dataclass
class StreamLedger:
    watermark: int = 0
    above: list[Span] = field(default_factory=list)
    committed: int = 0

    def copy(self) -> StreamLedger:
        return StreamLedger(self.watermark, list(self.above), self.committed)

    def has(self, seq: int) -> bool:
        if seq <= self.watermark:
            return True
        i = bisect.bisect_right(self.above, (seq, 1 << 64)) - 1
        return i >= 0 and self.above[i][1] >= seq

    def missing(self, first: int, last: int) -> list[Span]:
        """The sub-ranges of ``first..last`` not yet known, in order."""
        lo = max(first, self.watermark + 1)
        if lo > last:
            return []
        out: list[Span] = []
        i = max(bisect.bisect_right(self.above, (lo, 1 << 64)) - 1, 0)
        cur = lo
        while i < len(self.above) and cur <= last:
            a, b = self.above[i]
            if b < cur:
                i += 1
                continue
            if a > last:
                break
            if a > cur:
                out.append((cur, a - 1))
            cur = b + 1
            i += 1
        if cur <= last:
            out.append((cur, last))
        return out

    def add(self, seq: int) -> None:
        """Record one seq (already-known seqs are not counted twice)."""
        self.add_range(seq, seq)

    def add_all(self, spans: Iterable[Span]) -> None:
        """``add_range`` of each span, in order; runs of adjacent spans as one range."""
        lo = hi = -2
        for a, b in spans:
            if a == hi + 1:
                hi = b
                continue
            if hi >= lo >= 0:
                self.add_range(lo, hi)
            lo, hi = a, b
        if hi >= lo >= 0:
            self.add_range(lo, hi)

    def add_range(self, first: int, last: int) -> int:
        """Record seqs ``first..last``; returns how many were new."""
        new = sum(b - a + 1 for a, b in self.missing(first, last))
        if not new:
            return 0
        self.committed += new
        first = max(first, self.watermark + 1)
        # Merge [first, last] with every interval it overlaps or touches.
        i = bisect.bisect_left(self.above, (first, -1))
        if i > 0 and self.above[i - 1][1] >= first - 1:
            i -= 1
        j = i
        while j < len(self.above) and self.above[j][0] <= last + 1:
            first, last = min(first, self.above[j][0]), max(last, self.above[j][1])
            j += 1
        self.above[i:j] = [(first, last)]
        while self.above and self.above[0][0] <= self.watermark + 1:
            self.watermark = max(self.watermark, self.above.pop(0)[1])
        return new

    @property
    def highest(self) -> int:
        return self.above[-1][1] if self.above else self.watermark

    def gaps(self, limit: int = 1000) -> list[Span]:
        """Missing ranges between the watermark and the highest known seq."""
        out: list[Span] = []
        prev = self.watermark
        for a, b in self.above:
            if a > prev + 1:
                out.append((prev + 1, a - 1))
                if len(out) >= limit:
                    break
            prev = b
        return out


class Ledger:
    def __init__(self) -> None:
        self.streams: dict[Key, StreamLedger] = {}
        self._epochs: dict[str, int] = {}

    def stream(self, key: Key) -> StreamLedger:
        s = self.streams.get(key)
        if s is None:
            s = self.streams[key] = StreamLedger()
            self._epochs[key[0]] = self._epochs.get(key[0], 0) + 1
        return s

    def put(self, key: Key, stream: StreamLedger) -> None:
        if key not in self.streams:
            self._epochs[key[0]] = self._epochs.get(key[0], 0) + 1
        self.streams[key] = stream

    def epochs(self, site: str) -> int:
        """How many epochs of ``site`` the ledger knows."""
        return self._epochs.get(site, 0)


TOO_MANY_GAPS = "too_many_gaps"


class Overlay:
    """What one batch adds to a ledger, decided beside it: the ledger is neither copied nor
    changed until the store has made the batch durable (then ``apply``). A batch whose seqs
    would leave more than ``max_gaps`` intervals above the watermark has the offending items
    refused (``TOO_MANY_GAPS``): the ledger's size, and with it every per-batch cost and a
    JetStream checkpoint, stays bounded per stream whatever order seqs arrive in."""

    def __init__(self, base: StreamLedger, *, max_gaps: int) -> None:
        self.base = base
        self.adding = StreamLedger(watermark=-1)
        self.gaps = len(base.above)
        self.max_gaps = max_gaps

    def _known(self, seq: int) -> int:
        return int(seq <= 0 or self.base.has(seq) or self.adding.has(seq))

    def take(self, first: int, last: int) -> list[Span] | None:
        """The sub-ranges of ``first..last`` that are new, now recorded as being added;
        None (and nothing recorded) if they would open gaps past the cap."""
        new = [(c, d) for a, b in self.base.missing(first, last)
               for c, d in self.adding.missing(a, b)]
        if not new:
            return new
        # A new range opens an interval unless it touches a known seq on either side.
        grow = sum(1 - self._known(a - 1) - self._known(b + 1) for a, b in new)
        if self.gaps + grow > self.max_gaps and grow > 0:
            return None
        self.gaps += grow
        for a, b in new:
            self.adding.add_range(a, b)
        return new

    def take_each(self, spans: list[Span]) -> list[list[Span] | None]:
        """``take`` of each (first, last) in order. A run of single seqs, each one above the
        one before (what a draining agent sends), is taken as one range while the stream
        has an interval to spare: then only the run's first seq can open an interval, so the
        outcome is exactly that of taking them one by one, at one lookup per run instead of
        one per reading (the replica's largest per-reading cost)."""
        out: list[list[Span] | None] = []
        i, n = 0, len(spans)
        while i < n:
            first, last = spans[i]
            j = i + 1
            if first == last:
                while j < n and spans[j][0] == spans[j][1] == spans[j - 1][0] + 1:
                    j += 1
            top = spans[j - 1][0]
            if j - i == 1 or self.gaps >= self.max_gaps:
                out.extend(self.take(a, b) for a, b in spans[i:j])
                i = j
                continue
            new = self.take(first, top)
            assert new is not None  # at most one interval opens, and one is free
            k = 0
            for s in range(first, top + 1):
                while k < len(new) and new[k][1] < s:
                    k += 1
                out.append([(s, s)] if k < len(new) and new[k][0] <= s else [])
            i = j
        return out

    def after(self) -> tuple[int, int]:
        """The base's watermark and count once the batch is applied, without applying it
        (what a store persists in the transaction that stores the batch)."""
        wm = self.base.watermark
        while True:
            ext = max((_reach(spans, wm) for spans in (self.base.above, self.adding.above)),
                      default=wm)
            if ext <= wm:
                return wm, self.base.committed + self.adding.committed
            wm = ext

    def apply(self) -> None:
        for a, b in self.adding.above:
            self.base.add_range(a, b)


def _reach(spans: list[Span], wm: int) -> int:
    """How far the interval of ``spans`` that touches ``wm + 1`` reaches (``wm`` if none)."""
    i = bisect.bisect_right(spans, (wm + 1, 1 << 64)) - 1
    return max(wm, spans[i][1]) if i >= 0 and spans[i][1] >= wm else wm

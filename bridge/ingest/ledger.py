"""The exact dedupe ledger: per (site, epoch), a contiguous watermark plus the sparse set above.

Seqs are dense per (site, epoch) (the agent's spool numbers them), so "have I committed seq N"
has an exact answer in bounded memory: everything at or below ``watermark`` is committed, and
``above`` holds the committed seqs past it (there are only as many as the agent has batches in
flight out of order). No time window: a reading resent after a week-long outage is still
recognised. Pure logic; the store persists the changes it reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Key = tuple[str, int]  # (site_id, epoch)


@dataclass
class StreamLedger:
    watermark: int = 0
    above: set[int] = field(default_factory=set)
    committed: int = 0

    def copy(self) -> StreamLedger:
        return StreamLedger(self.watermark, set(self.above), self.committed)

    def has(self, seq: int) -> bool:
        return seq <= self.watermark or seq in self.above

    def add(self, seq: int) -> None:
        """Record a newly committed seq (caller checked ``has`` first)."""
        self.committed += 1
        if seq == self.watermark + 1:
            wm = seq
            while wm + 1 in self.above:
                wm += 1
                self.above.discard(wm)
            self.watermark = wm
        else:
            self.above.add(seq)

    def has_all(self, first: int, last: int) -> bool:
        if last <= self.watermark:
            return True
        return all(self.has(s) for s in range(max(first, self.watermark + 1), last + 1))

    def add_range(self, first: int, last: int) -> None:
        """Record seqs first..last (a dropped range); already-known seqs are skipped."""
        if first <= self.watermark + 1:
            for s in range(self.watermark + 1, last + 1):
                if s in self.above:
                    self.above.discard(s)
                else:
                    self.committed += 1
            self.watermark = max(self.watermark, last)
            while self.watermark + 1 in self.above:
                self.watermark += 1
                self.above.discard(self.watermark)
            return
        for s in range(first, last + 1):
            if not self.has(s):
                self.add(s)

    @property
    def highest(self) -> int:
        return max(self.above) if self.above else self.watermark

    def gaps(self, limit: int = 1000) -> list[tuple[int, int]]:
        """Missing ranges between the watermark and the highest committed seq."""
        out: list[tuple[int, int]] = []
        prev = self.watermark
        for s in sorted(self.above):
            if s > prev + 1:
                out.append((prev + 1, s - 1))
                if len(out) >= limit:
                    break
            prev = s
        return out


class Ledger:
    def __init__(self) -> None:
        self.streams: dict[Key, StreamLedger] = {}

    def stream(self, key: Key) -> StreamLedger:
        s = self.streams.get(key)
        if s is None:
            s = self.streams[key] = StreamLedger()
        return s

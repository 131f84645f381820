"""The redelivery ring's in-memory mirror (see Redelivery)."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence


class RedeliveryRing:
    """In-memory mirror of one source's ``recent`` ring (a multiset of digests)."""

    def __init__(self, size: int, rows: Sequence[tuple[int, bytes]]) -> None:
        self.size = size
        ordered = sorted(rows)[-size:]
        self._slots: deque[bytes] = deque(d for _, d in ordered)
        self._count: Counter[bytes] = Counter(self._slots)
        self.next_n = ordered[-1][0] + 1 if ordered else 0

    def claim(self, digest: bytes) -> bool:
        """True once per stored copy: a redelivery consumes the match."""
        if self._count.get(digest, 0) > 0:
            self._drop(digest)
            return True
        return False

    def holds(self, digest: bytes) -> bool:
        """Whether a message with this digest was committed within the ring (consumes nothing)."""
        return digest in self._count

    def push(self, digest: bytes) -> None:
        self.next_n += 1
        if len(self._slots) >= self.size:
            old = self._slots.popleft()
            if self._count.get(old, 0) > 0:
                self._drop(old)
        self._slots.append(digest)
        self._count[digest] += 1

    def __len__(self) -> int:
        """Distinct digests held: bounded by ``size`` (a key at zero is deleted, not kept)."""
        return len(self._count)

    def _drop(self, digest: bytes) -> None:
        n = self._count[digest] - 1
        if n:
            self._count[digest] = n
        else:
            del self._count[digest]

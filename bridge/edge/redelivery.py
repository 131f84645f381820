"""The redelivery ring: which of a source's recent messages are already committed.

A broker redelivers (MQTT DUP=1, AMQP ``redelivered``) only messages it sent but saw no ack
for, and it never has more unacked than the receive window; a ring twice that size holds
every message that can come back. The ring belongs to the source's intake, the only stage
that reads or changes it, all on the event loop: it checks a flagged redelivery against the
ring (``claim``, once per stored copy) and a publisher's retransmission (``holds``) before
decoding, and pushes a group's digests after the spool committed them. The spool keeps the
ring durable (its ``recent`` table, written in the same transaction as the messages,
``rows_for`` gives the rows) and hands it back at start (``AsyncSpool.load_ring``).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence


class RedeliveryRing:
    """One source's ring of committed digests (a multiset), ``size`` deep."""

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

    def rows_for(self, source: str, digests: Sequence[bytes]
                 ) -> list[tuple[str, int, int, bytes]]:
        """The ``recent`` rows (source, slot, n, digest) that pushing ``digests`` will make:
        written with the commit, pushed only once it succeeded."""
        n = self.next_n
        return [(source, (n + i) % self.size, n + i, d) for i, d in enumerate(digests)]

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

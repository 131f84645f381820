"""What every store commits and answers, beside the ledger at the bottom of the store: an
``Incoming`` item (a reading, or a tombstone for a dropped range), the per-item outcomes
``COMMITTED`` and ``DUPLICATE`` (anything else is a rejection reason), and ``narrow``, which
cuts a tombstone down to the part of its range a store does not know yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.shared._pb import bridge_pb2 as pb

COMMITTED = "committed"
DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class Incoming:
    site_id: str
    epoch: int
    seq: int
    envelope: bytes
    last_seq: int | None = None  # set for a tombstone: seqs seq..last_seq were dropped
    reason: str = ""


def narrow(envelope: bytes, first: int, last: int) -> bytes:
    """A tombstone's envelope for the sub-range ``first..last`` of its range."""
    env = pb.Envelope.FromString(envelope)
    env.seq = first
    env.dropped.last_seq = last
    env.dropped.count = last - first + 1
    return env.SerializeToString()

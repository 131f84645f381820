"""What an ingest node accepts from a site, whoever holds a valid certificate.

Every envelope is checked before it reaches the store; one that fails gets a per-envelope
REJECTED whose reason starts with a short label (the ``bridge_ingest_rejected_total`` reason),
never a failed batch. The store keeps seqs as SQLite's signed 64-bit integers, so every seq
must lie in 1..2^63-1; a tombstone's range must be ordered, consistent with its count and at
most ``max_tombstone_span`` wide (the ledger's cost does not depend on the width, this is a
sanity bound).

What a whole batch may cost is bounded before any per-envelope work, so one site cannot take
the node from the others: a call's message is at most ``max_batch_bytes`` (gRPC's receive
limit: refused by gRPC itself before it is parsed), holds at most ``max_batch_envelopes``
(refused whole, RESOURCE_EXHAUSTED with a ``max-batch-envelopes`` trailer, on which the agent
splits the batch and sends smaller ones), and a site has at most ``max_in_flight_per_site``
calls being served (RESOURCE_EXHAUSTED with a jittered ``retry-after-ms``). What the whole
node takes at once is bounded by admission control (``bridge.cloud.ingest.admission``), sized so an
admitted call is answered in about ``admit_target_ms``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bridge.cloud.store.ledger import TOO_MANY_GAPS
from bridge.shared import defaults as D
from bridge.shared._pb import bridge_pb2 as pb

SEQ_MAX = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_batch_envelopes: int = D.MAX_BATCH_ENVELOPES
    max_tombstone_span: int = D.MAX_TOMBSTONE_SPAN
    max_batch_bytes: int = D.MAX_BATCH_BYTES
    max_in_flight_per_site: int = D.MAX_IN_FLIGHT_PER_SITE
    admit_target_ms: int = D.ADMIT_TARGET_MS  # 0: no admission control (ingest.admission)
    admit_wait_ms: int = D.ADMIT_WAIT_MS  # the longest a call waits for room, queued or held
    max_in_flight_readings: int = D.MAX_IN_FLIGHT_READINGS  # the admission limit's ceiling

    def batch_problem(self, envelopes: int) -> str | None:
        """Why a batch of ``envelopes`` is refused whole, or None."""
        if envelopes > self.max_batch_envelopes:
            return (f"batch_too_large: {envelopes} envelopes, at most max_batch_envelopes="
                    f"{self.max_batch_envelopes} in one call (send smaller batches)")
        return None

    @staticmethod
    def busy_retry_ms() -> int:
        """A jittered retry-after for a site over its in-flight calls (20-100 ms)."""
        return random.randint(20, 100)

    def check(self, env: pb.Envelope) -> str | None:
        """``None`` if the envelope may be committed, else ``"label: detail"``."""
        if env.epoch == 0 or env.seq == 0:
            return "bad_identity: epoch and seq must be non-zero"
        if env.seq > SEQ_MAX:
            return f"seq_out_of_range: seq {env.seq} is above 2^63-1"
        if not env.HasField("dropped"):
            return None
        d = env.dropped
        if d.last_seq < env.seq:
            return "bad_drop_notice: dropped.last_seq below seq"
        if d.last_seq > SEQ_MAX:
            return f"seq_out_of_range: dropped.last_seq {d.last_seq} is above 2^63-1"
        span = d.last_seq - env.seq + 1
        if d.count != span:
            return f"bad_drop_notice: dropped.count {d.count} is not last_seq - seq + 1 = {span}"
        if span > self.max_tombstone_span:
            return (f"tombstone_too_wide: {span} seqs is more than max_tombstone_span="
                    f"{self.max_tombstone_span}")
        if env.values:
            return "bad_drop_notice: a tombstone carries no values"
        return None


def store_refusal(outcome: str, *, max_epochs: int, max_gaps: int) -> str:
    """The reason an agent's dead letter carries for a store's refusal of an envelope."""
    if outcome == TOO_MANY_GAPS:
        return (f"{outcome}: this (site, epoch) already has {max_gaps} gaps between its seqs "
                "(limits.max_gaps_per_stream)")
    return f"{outcome}: this site already has {max_epochs} epochs (max_epochs_per_site)"

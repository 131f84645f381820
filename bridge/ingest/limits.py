"""What an ingest node accepts from a site, whoever holds a valid certificate.

Every envelope is checked before it reaches the store; one that fails gets a per-envelope
REJECTED whose reason starts with a short label (the ``bridge_ingest_rejected_total`` reason),
never a failed batch. The store keeps seqs as SQLite's signed 64-bit integers, so every seq
must lie in 1..2^63-1; a tombstone's range must be ordered, consistent with its count and at
most ``max_tombstone_span`` wide (the ledger's cost does not depend on the width, this is a
sanity bound); a batch holds at most ``max_batch_envelopes`` (the rest are rejected, which the
agent's batch bound, 1,250 by default, never reaches).
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge._pb import bridge_pb2 as pb

SEQ_MAX = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_batch_envelopes: int = 10_000
    max_tombstone_span: int = 2**40

    def check(self, env: pb.Envelope, index: int) -> str | None:
        """``None`` if the envelope may be committed, else ``"label: detail"``."""
        if index >= self.max_batch_envelopes:
            return (f"batch_too_large: envelope {index} is past max_batch_envelopes="
                    f"{self.max_batch_envelopes}")
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

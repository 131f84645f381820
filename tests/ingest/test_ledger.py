from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.ingest.ledger import StreamLedger


def test_watermark_advances_over_out_of_order_commits_and_reports_gaps():
    s = StreamLedger()
    for seq in (1, 2, 5, 6, 9):
        s.add(seq)
    assert (s.watermark, s.highest, s.gaps()) == (2, 9, [(3, 4), (7, 8)])
    for seq in (3, 4):
        s.add(seq)
    assert (s.watermark, s.above, s.gaps()) == (6, {9}, [(7, 8)])
    assert s.has(4) and s.has(9) and not s.has(7)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=400), st.integers(min_value=0, max_value=2**32))
def test_any_arrival_order_ends_at_the_exact_watermark_with_nothing_above(n: int, seed: int):
    seqs = list(range(1, n + 1))
    random.Random(seed).shuffle(seqs)
    s = StreamLedger()
    for seq in seqs:
        assert not s.has(seq)
        s.add(seq)
        assert s.has(seq)
    assert (s.watermark, s.above, s.committed) == (n, set(), n)

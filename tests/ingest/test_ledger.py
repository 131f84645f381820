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
    assert (s.watermark, s.above, s.gaps()) == (6, [(9, 9)], [(7, 8)])
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
    assert (s.watermark, s.above, s.committed) == (n, [], n)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 120), st.integers(0, 15)), min_size=1, max_size=40))
def test_ranges_in_any_order_agree_with_a_plain_set_of_seqs(spans: list[tuple[int, int]]):
    s = StreamLedger()
    model: set[int] = set()
    for first, width in spans:
        last = first + width
        missing = {q for q in range(first, last + 1) if q not in model}
        assert {q for a, b in s.missing(first, last) for q in range(a, b + 1)} == missing
        assert s.add_range(first, last) == len(missing)
        model |= missing
        wm = 0
        while wm + 1 in model:
            wm += 1
        assert s.watermark == wm
        assert s.committed == len(model)
        assert {q for a, b in s.above for q in range(a, b + 1)} == {q for q in model if q > wm}
        assert all(b + 1 < a2 for (_, b), (a2, _) in zip(s.above, s.above[1:], strict=False))
        assert all(s.has(q) == (q in model) for q in range(1, 140))

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.cloud.store.ledger import TOO_MANY_GAPS, Overlay, StreamLedger


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


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 6)), max_size=12),
       st.lists(st.tuples(st.integers(1, 80), st.integers(0, 6)), min_size=1, max_size=12))
def test_an_overlay_decides_a_batch_as_a_copy_would_and_predicts_the_watermark(
        before: list[tuple[int, int]], batch: list[tuple[int, int]]):
    base = StreamLedger()
    for first, width in before:
        base.add_range(first, first + width)
    copy = base.copy()
    plan = Overlay(base, max_gaps=10**6)
    for first, width in batch:
        want = copy.missing(first, first + width)
        assert plan.take(first, first + width) == want
        for a, b in want:
            copy.add_range(a, b)
    assert base.above == StreamLedger(base.watermark, list(base.above)).above  # untouched
    assert plan.after() == (copy.watermark, copy.committed)
    plan.apply()
    assert (base.watermark, base.above, base.committed) == \
        (copy.watermark, copy.above, copy.committed)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(0, 3)), min_size=1, max_size=60),
       st.integers(1, 6))
def test_an_overlay_never_leaves_more_gaps_than_its_cap(spans: list[tuple[int, int]], cap: int):
    base = StreamLedger()
    for first, width in spans:
        plan = Overlay(base, max_gaps=cap)
        before = len(base.above)
        if plan.take(first, first + width) is None:
            assert before <= cap  # refused only what would pass the cap
            continue
        plan.apply()
        assert len(base.above) <= max(cap, before)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 4)), max_size=10),
       st.lists(st.one_of(st.tuples(st.integers(1, 80), st.integers(0, 40)),
                          st.tuples(st.integers(1, 80), st.just(-1))), min_size=1,
                max_size=10),
       st.integers(1, 6))
def test_taking_runs_at_once_decides_exactly_as_taking_each_reading_in_turn(
        before: list[tuple[int, int]], parts: list[tuple[int, int]], cap: int):
    # A batch of runs of consecutive single seqs (first, length) and ranges (first, -1: a
    # tombstone of three seqs), against a stream with gaps, at a cap from tight to loose.
    base = StreamLedger()
    for first, width in before:
        base.add_range(first, first + width)
    spans = [(first, first + 2) if n < 0 else (s, s) for first, n in parts
             for s in ([first] if n < 0 else range(first, first + n))]
    one_by_one, at_once = Overlay(base.copy(), max_gaps=cap), Overlay(base.copy(),
                                                                    max_gaps=cap)
    assert at_once.take_each(spans) == [one_by_one.take(a, b) for a, b in spans]
    assert at_once.after() == one_by_one.after() and at_once.gaps == one_by_one.gaps


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 4)), max_size=10),
       st.lists(st.tuples(st.integers(0, 80), st.integers(0, 3)), max_size=30))
def test_adding_adjacent_spans_as_runs_records_what_adding_each_does(
        before: list[tuple[int, int]], spans: list[tuple[int, int]]):
    each, runs = StreamLedger(), StreamLedger()
    for first, width in before:
        each.add_range(first, first + width)
        runs.add_range(first, first + width)
    for first, width in spans:
        each.add_range(first, first + width)
    runs.add_all((first, first + width) for first, width in spans)
    assert (runs.watermark, runs.above, runs.committed) == \
        (each.watermark, each.above, each.committed)


def test_sparse_seqs_are_refused_by_name_past_the_cap_and_filling_a_gap_is_always_taken():
    base = StreamLedger()
    plan = Overlay(base, max_gaps=2)
    assert plan.take(3, 3) == [(3, 3)] and plan.take(5, 5) == [(5, 5)]
    assert plan.take(7, 7) is None      # a third interval above the watermark
    assert plan.take(4, 4) == [(4, 4)]  # joins 3 and 5: one interval fewer
    assert plan.take(7, 7) == [(7, 7)]
    assert plan.take(1, 2) == [(1, 2)]  # into the watermark
    plan.apply()
    assert (base.watermark, base.above) == (5, [(7, 7)])
    assert TOO_MANY_GAPS == "too_many_gaps"

from __future__ import annotations

from pathlib import Path

from bridge.ingest.store import Incoming, Reader, Store


def items(site: str, epoch: int, seqs: list[int]) -> list[Incoming]:
    return [Incoming(site, epoch, s, f"{site}/{s}".encode()) for s in seqs]


def test_duplicates_are_recognised_within_a_batch_across_batches_and_after_reopen(
        tmp_path: Path):
    big_epoch = 2**64 - 5  # stored as signed 64-bit, read back unsigned
    store = Store(path=tmp_path / "i.db")
    assert store.commit(items("a", big_epoch, [1, 2, 2, 4])) == [True, True, False, True]
    assert store.commit(items("a", big_epoch, [2, 3])) == [False, True]
    assert store.commit(items("b", big_epoch, [1])) == [True]
    store.close()
    store = Store(path=tmp_path / "i.db")
    assert store.commit(items("a", big_epoch, [1, 4, 5])) == [False, False, True]
    stream = store.ledger.stream(("a", big_epoch))
    assert (stream.watermark, stream.committed) == (5, 5)
    rows = Reader(tmp_path / "i.db").page(0)
    assert [(r.site_id, r.seq) for r in rows] == [("a", 1), ("a", 2), ("a", 4), ("a", 3),
                                                  ("b", 1), ("a", 5)]
    assert rows[0].epoch == big_epoch


def test_ledger_above_the_watermark_is_persisted(tmp_path: Path):
    store = Store(path=tmp_path / "i.db")
    store.commit(items("a", 7, [1, 3, 10]))
    store.close()
    store = Store(path=tmp_path / "i.db")
    s = store.ledger.stream(("a", 7))
    assert (s.watermark, s.above, s.gaps()) == (1, {3, 10}, [(2, 2), (4, 9)])


def test_a_ledger_built_over_many_out_of_order_batches_reopens_exactly_as_it_was(
        tmp_path: Path):
    store = Store(path=tmp_path / "i.db")
    # A live lane running ahead of a draining backlog: high seqs first, then the gap fills.
    store.commit(items("a", 7, list(range(101, 151))))
    store.commit(items("a", 7, list(range(151, 201))))
    store.commit(items("a", 7, list(range(1, 41))))
    store.commit([Incoming("a", 7, 300, b"stone", last_seq=320, reason="ttl")])
    store.commit(items("a", 7, list(range(41, 90))))
    before = store.ledger.stream(("a", 7))
    expected = (before.watermark, set(before.above), before.committed)
    store.close()
    store = Store(path=tmp_path / "i.db")
    s = store.ledger.stream(("a", 7))
    assert (s.watermark, s.above, s.committed) == expected
    assert s.watermark == 89 and s.gaps() == [(90, 100), (201, 299)]
    store.commit(items("a", 7, list(range(90, 101))))
    store.close()
    s = Store(path=tmp_path / "i.db").ledger.stream(("a", 7))
    assert s.watermark == 200 and s.gaps() == [(201, 299)]

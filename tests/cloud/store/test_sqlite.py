from __future__ import annotations

from pathlib import Path

from bridge.cloud.store.records import COMMITTED as C
from bridge.cloud.store.records import DUPLICATE as D
from bridge.cloud.store.records import Incoming
from bridge.cloud.store.sqlite import Reader, Store


def items(site: str, epoch: int, seqs: list[int]) -> list[Incoming]:
    return [Incoming(site, epoch, s, f"{site}/{s}".encode()) for s in seqs]


def test_duplicates_are_recognised_within_a_batch_across_batches_and_after_reopen(
        tmp_path: Path):
    big_epoch = 2**64 - 5  # stored as signed 64-bit, read back unsigned
    store = Store(path=tmp_path / "i.db")
    assert store.commit(items("a", big_epoch, [1, 2, 2, 4])) == [C, C, D, C]
    assert store.commit(items("a", big_epoch, [2, 3])) == [D, C]
    assert store.commit(items("b", big_epoch, [1])) == [C]
    store.close()
    store = Store(path=tmp_path / "i.db")
    assert store.commit(items("a", big_epoch, [1, 4, 5])) == [D, D, C]
    stream = store.ledger.stream(("a", big_epoch))
    assert (stream.watermark, stream.committed) == (5, 5)
    rows = Reader(tmp_path / "i.db").page(0)
    assert [(r.site_id, r.seq) for r in rows] == [("a", 1), ("a", 2), ("a", 4), ("a", 3),
                                                  ("b", 1), ("a", 5)]
    assert rows[0].epoch == big_epoch


def test_the_ledger_above_the_watermark_is_rebuilt_from_the_rows_at_open(tmp_path: Path):
    store = Store(path=tmp_path / "i.db")
    store.commit(items("a", 7, [1, 3, 10]))
    store.close()
    store = Store(path=tmp_path / "i.db")
    s = store.ledger.stream(("a", 7))
    assert (s.watermark, s.above, s.gaps()) == (1, [(3, 3), (10, 10)], [(2, 2), (4, 9)])


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
    expected = (before.watermark, list(before.above), before.committed)
    store.close()
    store = Store(path=tmp_path / "i.db")
    s = store.ledger.stream(("a", 7))
    assert (s.watermark, s.above, s.committed) == expected
    assert s.watermark == 89 and s.gaps() == [(90, 100), (201, 299)]
    store.commit(items("a", 7, list(range(90, 101))))
    store.close()
    s = Store(path=tmp_path / "i.db").ledger.stream(("a", 7))
    assert s.watermark == 200 and s.gaps() == [(201, 299)]


def stone(epoch: int, first: int, last: int) -> Incoming:
    from bridge.shared._pb import bridge_pb2 as pb
    env = pb.Envelope(site_id="a", epoch=epoch, seq=first, dropped=pb.DropNotice(
        reason="ttl", last_seq=last, count=last - first + 1))
    return Incoming("a", epoch, first, env.SerializeToString(), last_seq=last, reason="ttl")


def known(store: Store, epoch: int) -> tuple[int, list[tuple[int, int]], int]:
    s = store.ledger.stream(("a", epoch))
    return s.watermark, list(s.above), s.committed


def test_a_tombstone_over_stored_readings_keeps_rows_and_ledger_in_agreement_after_reopen(
        tmp_path: Path):
    store = Store(path=tmp_path / "i.db")
    assert store.commit(items("a", 7, [5, 8])) == [C, C]
    assert store.commit([stone(7, 3, 10)]) == [C]  # overlaps both readings
    assert store.commit(items("a", 7, [4, 6, 12])) == [D, D, C]
    before = known(store, 7)
    assert before == (0, [(3, 10), (12, 12)], 9)
    store.close()
    store = Store(path=tmp_path / "i.db")
    assert known(store, 7) == before
    assert store.commit(items("a", 7, [1, 2, 11])) == [C, C, C]
    assert known(store, 7) == (12, [], 12)
    store.close()
    assert known(Store(path=tmp_path / "i.db"), 7) == (12, [], 12)
    stones = Reader(tmp_path / "i.db").dropped()
    assert [(f, last) for _, _, f, last, _ in stones] == [(3, 4), (6, 7), (9, 10)]


def test_readings_after_a_tombstone_are_duplicates_in_either_order_within_one_batch(
        tmp_path: Path):
    store = Store(path=tmp_path / "i.db")
    assert store.commit([*items("a", 7, [2]), stone(7, 1, 4), *items("a", 7, [3])]) == \
        [C, C, D]
    store.close()
    assert known(Store(path=tmp_path / "i.db"), 7) == (4, [], 4)


def test_a_tombstone_of_two_to_the_62_seqs_costs_one_interval(tmp_path: Path):
    store = Store(path=tmp_path / "i.db")
    assert store.commit([stone(7, 2, 2**62)]) == [C]
    assert known(store, 7) == (0, [(2, 2**62)], 2**62 - 1)
    assert store.commit(items("a", 7, [1, 2**62 + 1])) == [C, C]
    store.close()
    assert known(Store(path=tmp_path / "i.db"), 7) == (2**62 + 1, [], 2**62 + 1)


def test_a_site_gets_at_most_max_epochs_streams_even_from_one_batch(tmp_path: Path):
    store = Store(path=tmp_path / "i.db", max_epochs_per_site=3)
    out = store.commit([Incoming("a", e, 1, b"x") for e in range(1, 6)] +
                       [Incoming("b", 1, 1, b"y")])
    assert out == [C, C, C, "too_many_epochs", "too_many_epochs", C]
    assert store.commit([Incoming("a", 2, 2, b"x")]) == [C]
    assert store.ledger.epochs("a") == 3


def test_a_subscribe_cursor_seeks_through_the_index_instead_of_scanning(tmp_path: Path):
    store = Store(path=tmp_path / "i.db")
    for site in ("a", "b"):
        store.commit(items(site, 7, list(range(1, 2001))))
    reader = Reader(tmp_path / "i.db")
    plan = reader.plan(Reader.KEY_PAGE, ("a", 7, 1990, 10**9, 1000))
    assert "USING INDEX" in plan and "SCAN" not in plan, plan
    rows = reader.key_page("a", 7, 1990, reader.max_offset())
    assert [(r.site_id, r.seq) for r in rows] == [("a", s) for s in range(1991, 2001)]
    assert [r.seq for r in reader.key_page("b", 7, 0, reader.max_offset(), limit=5)] == \
        [1, 2, 3, 4, 5]
    assert reader.key_page("b", 7, 0, 2000) == []  # nothing of b was committed by then


def test_a_stream_keeps_at_most_max_gaps_intervals_and_refuses_the_rest_by_name(
        tmp_path: Path):
    store = Store(path=tmp_path / "i.db", max_gaps_per_stream=3)
    out = store.commit(items("a", 7, [2, 4, 6, 8, 10]))
    assert out == [C, C, C, "too_many_gaps", "too_many_gaps"]
    assert store.commit(items("a", 7, [1, 3])) == [C, C]  # filling gaps is always taken
    assert known(store, 7) == (4, [(6, 6)], 5)
    assert store.commit(items("a", 7, [8, 10])) == [C, C]
    store.close()
    reopened = Store(path=tmp_path / "i.db", max_gaps_per_stream=3)
    assert known(reopened, 7) == (4, [(6, 6), (8, 8), (10, 10)], 7)
    assert reopened.commit(items("a", 7, [12])) == ["too_many_gaps"]


def test_a_sqlite_node_loads_neither_nats_nor_the_jetstream_store():
    """open_backend imports the store a config asks for, and only that one."""
    import subprocess
    import sys

    code = ("import sys, bridge.cloud.ingest.server, bridge.cli; "
            "print(sorted(m for m in ('nats', 'bridge.cloud.store.jetstream') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]", out

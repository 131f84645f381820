from __future__ import annotations

from pathlib import Path

import pytest

from bridge._pb import bridge_pb2 as pb
from bridge.consume import (
    Merger,
    committed_intervals,
    load_cursors,
    save_cursors,
    union,
    watermark_and_gaps,
)
from bridge.errors import CursorError


def c(site: str, seq: int, node: str = "aws", epoch: int = 9) -> pb.Committed:
    return pb.Committed(envelope=pb.Envelope(site_id=site, epoch=epoch, seq=seq,
                                             gateway_time_ns=seq), node=node)


def test_the_merge_emits_each_reading_once_in_seq_order_and_holds_back_above_a_gap():
    m = Merger()
    for item in [c("a", 2, "aws"), c("a", 1, "azure"), c("a", 2, "azure"), c("a", 4, "gcp"),
                 c("b", 1, "aws")]:
        m.add(item)
    out = [(x.envelope.site_id, x.envelope.seq) for x in m.drain()]
    assert sorted(out) == [("a", 1), ("a", 2), ("b", 1)]
    assert [s for site, s in out if site == "a"] == [1, 2]
    assert m.duplicates == 1 and m.pending() == 1
    m.add(c("a", 3, "gcp"))
    m.add(c("a", 1, "gcp"))
    assert [x.envelope.seq for x in m.drain()] == [3, 4]
    assert m.duplicates == 2
    assert m.cursors == {("a", 9): 4, ("b", 9): 1}


def test_cursor_files_round_trip_and_a_corrupt_one_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "cursor.json"
    save_cursors(path, {("a", 2**64 - 1): 10, ("b", 1): 3})
    assert load_cursors(path) == {("a", 2**64 - 1): 10, ("b", 1): 3}
    path.write_text("{")
    with pytest.raises(CursorError, match="not a cursor file"):
        load_cursors(path)


def test_completeness_merges_each_clouds_committed_ranges():
    aws = pb.StreamStatus(committed_through=100, highest_seq=180,
                          gaps=[pb.Gap(first_seq=120, last_seq=150)])
    azure = pb.StreamStatus(committed_through=0, highest_seq=140,
                            gaps=[pb.Gap(first_seq=1, last_seq=100)])
    assert committed_intervals(aws) == [(1, 100), (101, 119), (151, 180)]
    assert committed_intervals(azure) == [(101, 140)]
    merged = union(committed_intervals(aws) + committed_intervals(azure))
    assert watermark_and_gaps(merged) == (140, [(141, 150)])


def test_a_tombstone_releases_the_readings_it_covers_for_every_stream_not_only_the_first():
    m = Merger()
    for site in ("a", "b", "c"):
        for seq in (1, 2, 3, 4, 5, 6):  # a run ahead of the tombstone in every stream
            m.add(c(site, seq))
        m.add(c(site, 9))  # a reading the tombstone below also covers (sent twice)
        m.add(pb.Committed(envelope=pb.Envelope(
            site_id=site, epoch=9, seq=7, gateway_time_ns=7,
            dropped=pb.DropNotice(reason="ttl", last_seq=10, count=4))))
        m.add(c(site, 11))
    out = m.drain()
    assert len(out) == 3 * 8
    assert m.pending() == 0
    assert m.cursors == {("a", 9): 11, ("b", 9): 11, ("c", 9): 11}
    assert m.duplicates == 3

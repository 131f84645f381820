from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest

from bridge._pb import bridge_pb2 as pb
from bridge._pb import bridge_pb2_grpc as pb_grpc
from bridge.consume import (
    Merger,
    committed_intervals,
    load_cursors,
    read_all,
    save_cursors,
    union,
    watermark_and_gaps,
)
from bridge.errors import CursorError
from tests.conftest import Cluster


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


def test_a_whole_read_has_no_deadline_only_a_limit_on_silence_and_streams_as_it_goes(
        cluster: Cluster):
    node = cluster.ingest("aws")
    ca, cert, key = cluster.pki.site("site-a").read()
    with grpc.secure_channel(node.target, grpc.ssl_channel_credentials(ca, key, cert)) as ch:
        stub = pb_grpc.IngestStub(ch)
        for lo in range(1, 30_001, 5000):
            stub.PushBatch(pb.Batch(batch_id=str(lo), envelopes=[
                pb.Envelope(site_id="site-a", epoch=3, seq=s) for s in range(lo, lo + 5000)]),
                timeout=30)
    emitted: list[int] = []
    merger = Merger()

    async def read(idle: float) -> dict[str, str]:
        return await read_all(targets=[node.target], tls=cluster.pki.consumer(),
                              merger=merger, timeout=idle,
                              emit=lambda batch: emitted.append(len(batch)))

    t0 = time.monotonic()
    errors = asyncio.run(read(0.2))  # a limit on silence far below what the read takes
    assert errors == {} and time.monotonic() - t0 > 0.2
    assert sum(emitted) + len(merger.drain()) == 30_000
    assert len(emitted) >= 10, "emitted while reading, not held to the end"
    node.proc.signal(signal.SIGSTOP)  # a node that stops answering is given up, not awaited
    try:
        t0 = time.monotonic()
        errors = asyncio.run(read(1.0))
        assert time.monotonic() - t0 < 10
    finally:
        node.proc.signal(signal.SIGCONT)
    assert errors[node.target].startswith("UNAVAILABLE")

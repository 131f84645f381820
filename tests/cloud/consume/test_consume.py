from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest

from bridge.cloud.consume import (
    Merger,
    committed_intervals,
    load_cursors,
    read_all,
    save_cursors,
    union,
    watermark_and_gaps,
)
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.errors import CursorError
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
        for lo in range(1, 120_001, 5000):  # a read of about 1 s, five times the limit
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
    assert sum(emitted) + len(merger.drain()) == 120_000
    assert len(emitted) >= 10, "emitted while reading, not held to the end"
    node.proc.signal(signal.SIGSTOP)  # a node that stops answering is given up, not awaited
    try:
        t0 = time.monotonic()
        errors = asyncio.run(read(1.0))
        assert time.monotonic() - t0 < 10
    finally:
        node.proc.signal(signal.SIGCONT)
    assert errors[node.target].startswith("UNAVAILABLE")


def _paths(obj: object, prefix: str = "") -> set[str]:
    """Every field path of a JSON line: ``source.topic``, ``values[].unit``, ..."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else k
            out.add(path)
            if k != "labels":  # its keys are the publisher's, not the contract's
                out |= _paths(v, path)
    elif isinstance(obj, list):
        for v in obj:
            out |= _paths(v, f"{prefix}[]")
    return out


def test_every_field_bridge_consume_prints_is_documented_and_every_documented_one_printed(
        cluster: Cluster):
    import re
    import subprocess
    import sys

    import orjson

    node = cluster.ingest("aws")
    ca, cert, key = cluster.pki.site("site-a").read()
    stub = pb_grpc.IngestStub(grpc.secure_channel(
        node.target, grpc.ssl_channel_credentials(ca, key, cert)))
    rich = pb.Envelope(
        site_id="site-a", epoch=2**63 - 1, seq=1, gateway_time_ns=2**62, clock_synced=True,
        source_time_ns=2**62 - 1, source_seq=2**64 - 1, codec="json",
        source=pb.Source(protocol=pb.PROTOCOL_MQTT, broker="mqtt://10.0.0.5:1883",
                         topic="plant/7/bus", name="plant"),
        labels={"asset": "bus-7"},
        values=[pb.Value(signal="v", number=110.5, unit="kV", quality=pb.QUALITY_GOOD,
                         source_time_ns=2**62 - 2, historical=True),
                pb.Value(signal="n", is_null=True)])
    raw = pb.Envelope(site_id="site-a", epoch=2**63 - 1, seq=2, gateway_time_ns=1,
                      codec="raw", raw=b"\x00\xff", source=pb.Source(topic="t"))
    stone = pb.Envelope(site_id="site-a", epoch=2**63 - 1, seq=3, gateway_time_ns=2,
                        dropped=pb.DropNotice(reason="ttl", last_seq=5, count=3))
    ack = stub.PushBatch(pb.Batch(batch_id="doc", envelopes=[rich, raw, stone]), timeout=20)
    assert {r.disposition for r in ack.results} == {pb.DISPOSITION_COMMITTED}
    tls = cluster.pki.consumer()
    res = subprocess.run([sys.executable, "-m", "bridge", "consume", "--from", node.target,
                          "--ca", str(tls.ca), "--cert", str(tls.cert), "--key", str(tls.key)],
                         capture_output=True, text=True, timeout=60, check=True)
    lines = [orjson.loads(x) for x in res.stdout.splitlines()]
    assert [x["seq"] for x in lines] == [1, 2, 3] and lines[0]["source_seq"] == 2**64 - 1
    printed = set().union(*(_paths(x) for x in lines))
    page = (Path(__file__).resolve().parents[3] / "docs" / "consuming.md").read_text()
    section = page.split("## `bridge consume` output", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_.\[\]]+)` \|", section, re.M))
    assert printed - documented == set(), "printed but not documented"
    assert documented - printed == set(), "documented but never printed"


def test_progress_goes_to_a_terminal_on_standard_error_and_nowhere_else(cluster: Cluster):
    import os
    import pty
    import subprocess
    import sys

    node = cluster.ingest("aws")
    ca, cert, key = cluster.pki.site("site-a").read()
    stub = pb_grpc.IngestStub(grpc.secure_channel(
        node.target, grpc.ssl_channel_credentials(ca, key, cert)))
    stub.PushBatch(pb.Batch(batch_id="p", envelopes=[
        pb.Envelope(site_id="site-a", epoch=4, seq=s) for s in range(1, 2501)]), timeout=30)
    tls = cluster.pki.consumer()
    argv = [sys.executable, "-m", "bridge", "consume", "--from", node.target, "--ca",
            str(tls.ca), "--cert", str(tls.cert), "--key", str(tls.key)]
    piped = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    assert piped.stdout.count("\n") == 2500 and piped.stderr == ""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=slave, timeout=60,
                              check=True)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.stdout.count(b"\n") == 2500  # the output itself is unchanged
    assert b"2,500 readings" in seen and b"(aws 2,500)" in seen

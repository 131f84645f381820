"""Hostile payloads end to end: each kind is dead-lettered with its bytes, good ones flow."""

from __future__ import annotations

import base64
import subprocess

import orjson

from bridge.shared._pb import sparkplug_b_pb2 as sp
from devkit.localrun import bridge_argv
from tests.conftest import Cluster, publish_raw, wait_delivered, wait_for


def spb(seq: int | None, **metric: object) -> bytes:
    p = sp.Payload()
    if seq is not None:
        p.seq = seq
    if metric:
        p.metrics.add(**metric)  # type: ignore[arg-type]
    return p.SerializeToString()


def sources(port: int) -> str:
    return (f'[[sources]]\nname = "json"\nurl = "mqtt://127.0.0.1:{port}"\n'
            'topics = ["plant/#"]\nmax_payload_bytes = 1024\n'
            '[[sources.mappings]]\ntopic = "plant/mapped/{signal}"\nvalue = "v"\nseq = "n"\n'
            'timestamp = "t"\n'
            f'[[sources]]\nname = "spb"\nurl = "mqtt://127.0.0.1:{port}"\n'
            'codec = "sparkplug"\ntopics = ["spBv1.0/#"]\n'
            '[sources.sparkplug]\nrebirth = false\n')


def test_every_kind_of_hostile_payload_is_dead_lettered_while_good_traffic_flows(
        cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent(sources=sources(cluster.broker.port))
    birth = sp.Payload(seq=0)
    birth.metrics.add(name="bdSeq", datatype=sp.Int64, long_value=0)
    birth.metrics.add(name="Level", alias=1, datatype=sp.Double, double_value=1.0)
    hostile = {
        "invalid_json": ("plant/p1/flow", b'{"value": 1,'),
        "bad_value": ("plant/p1/flow", b'{"value": {"nested": true}}'),
        "oversize": ("plant/p1/flow", b'{"value": 1, "pad": "' + b"x" * 2000 + b'"}'),
        "invalid_utf8": ("plant/p1/flow", b'{"value": "\xff\xfe"}'),
        "missing_value": ("plant/mapped/flow", b'{"w": 3}'),
        "invalid_protobuf": ("spBv1.0/G/NDATA/N1", spb(1, alias=1, double_value=2.0)[:-3]),
        "data_before_birth": ("spBv1.0/G/DDATA/Ghost/D1", spb(4, alias=1, double_value=1.0)),
        "unknown_alias": ("spBv1.0/G/NDATA/N1", spb(1, alias=99, double_value=2.0)),
        "type_mismatch": ("spBv1.0/G/NDATA/N1", spb(2, alias=1, string_value="high")),
        "bad_topic": ("spBv1.0/G/NDATA", spb(3, alias=1, double_value=2.0)),
    }
    good = [("spBv1.0/G/NBIRTH/N1", birth.SerializeToString())]
    items = list(good)
    for i, bad in enumerate(hostile.values(), 1):
        items.append(bad)
        items.append((f"plant/p1/flow{i}", orjson.dumps({"seq": i, "value": i * 1.5})))
        good.append(items[-1])
    items.append(("plant/mapped/level", b'{"v": 7, "n": 99}'))
    items.append(("spBv1.0/G/NDATA/N1", spb(4, alias=1, double_value=3.5)))
    good += items[-2:]
    publish_raw(cluster.broker.port, items)

    wait_delivered(cluster, agent, len(good))
    stream, _ = cluster.consume()
    assert len(stream) == len(good)
    # Two sources commit independently: compare what arrived, not the interleaving.
    got = sorted(c.envelope.source.topic for c in stream)  # type: ignore[attr-defined]
    assert got == sorted(t for t, _ in good)
    metrics = agent.metrics()
    for reason in hostile:
        assert f'bridge_dead_letters_total{{reason="{reason}"}} 1.0' in metrics, reason
    assert all(s["subscribed"] for s in agent.status()["sources"])

    out = subprocess.run(bridge_argv("dead-letters", "--config", str(agent.config), "--json",
                                     "--limit", "50"),
                         capture_output=True, text=True, check=True, timeout=30)
    letters = [orjson.loads(line) for line in out.stdout.splitlines()]
    by_reason = {d["reason"]: d for d in letters}
    assert set(by_reason) == set(hostile)
    for reason, (topic, payload) in hostile.items():
        assert by_reason[reason]["topic"] == topic
        assert base64.b64decode(by_reason[reason]["payload_b64"]) == payload, reason
    assert all(d["detail"] for d in letters)


def test_a_payload_flood_of_garbage_never_blocks_the_queue(cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent(sources=sources(cluster.broker.port))
    garbage = [(f"spBv1.0/G/NDATA/N{i % 7}", bytes([i % 256]) * (i % 50 + 1))
               for i in range(2000)]
    tail = [(f"plant/p2/v{i}", orjson.dumps({"seq": i, "value": i})) for i in range(1, 51)]
    publish_raw(cluster.broker.port, garbage + tail)
    wait_delivered(cluster, agent, len(tail))
    stream, _ = cluster.consume()
    assert sorted(c.envelope.source_seq for c in stream) == list(range(1, 51))  # type: ignore[attr-defined]
    taken = 'bridge_source_messages_total{source="spb"} 2000.0'
    wait_for(lambda: taken in agent.metrics(), what="all garbage taken")


def _compressed(body: bytes, algorithm: str | None) -> bytes:
    p = sp.Payload(uuid="SPBV1.0_COMPRESSED", body=body)
    if algorithm is not None:
        p.metrics.add(name="algorithm", datatype=sp.String, string_value=algorithm)
    return p.SerializeToString()


def test_values_the_wire_cannot_hold_and_hostile_compression_are_dead_letters_by_name(
        cluster: Cluster):
    """Each of these crashed or silently emptied the agent before: now the agent is the same
    process afterwards, every bad message is a dead letter with its reason, and everything
    published behind it arrives exactly once."""
    import gzip
    import zlib

    cluster.ingest("aws")
    agent = cluster.agent(sources=sources(cluster.broker.port).replace(
        "[sources.sparkplug]\n", "[sources.sparkplug]\nmax_decompressed_bytes = 65536\n"))
    pid = agent.proc.pid
    birth = sp.Payload(seq=0)
    birth.metrics.add(name="bdSeq", datatype=sp.Int64, long_value=0)
    birth.metrics.add(name="Level", alias=1, datatype=sp.Double, double_value=1.0)
    birth.metrics.add(name="Total", alias=2, datatype=sp.UInt64, long_value=1)
    birth.metrics.add(name="When", alias=3, datatype=sp.DateTime, long_value=1)
    inner = spb(5, alias=1, double_value=2.5)
    hostile = {
        "year_9999": ("plant/p1/flow", b'{"value": 1, "ts": "9999-12-31T23:59:59Z"}'),
        "int_beyond_int64": ("plant/p1/flow", b'{"value": 9223372036854775808}'),
        "mapped_ts_beyond": ("plant/mapped/flow", b'{"v": 1, "n": 7, "t": 1e30}'),
        "uint64_beyond_int64": ("spBv1.0/G/NDATA/N1", spb(1, alias=2, long_value=2**64 - 1)),
        "datetime_beyond": ("spBv1.0/G/NDATA/N1", spb(2, alias=3, long_value=2**63)),
        "bomb": ("spBv1.0/G/NDATA/N1", _compressed(zlib.compress(b"\0" * (1 << 22)), None)),
        "unknown_algorithm": ("spBv1.0/G/NDATA/N1", _compressed(b"xx", "BROTLI")),
        "corrupt_gzip": ("spBv1.0/G/NDATA/N1", _compressed(b"\x1f\x8b not gzip", "GZIP")),
        "nested": ("spBv1.0/G/NDATA/N1", _compressed(
            gzip.compress(_compressed(zlib.compress(inner), None)), "GZIP")),
    }
    reasons = {"year_9999": "bad_timestamp", "int_beyond_int64": "bad_value",
               "mapped_ts_beyond": "bad_timestamp", "uint64_beyond_int64": "bad_value",
               "datetime_beyond": "bad_timestamp", "bomb": "decompression_bomb",
               "unknown_algorithm": "unknown_compression", "corrupt_gzip": "bad_compression",
               "nested": "nested_compression"}
    good = [("spBv1.0/G/NBIRTH/N1", birth.SerializeToString())]
    items = list(good)
    for i, bad in enumerate(hostile.values(), 1):
        items.append(bad)
        items.append((f"plant/p1/flow{i}", orjson.dumps({"seq": i, "value": i})))
        good.append(items[-1])
    # A compressed payload done right decodes, and the same bytes twice with the publisher's
    # seq (a QoS 1 retransmission after a broker restart) are stored once.
    good.append(("spBv1.0/G/NDATA/N1", _compressed(zlib.compress(inner), "DEFLATE")))
    retransmitted = ("plant/p1/counter", b'{"seq": 500, "value": 42}')
    good.append(retransmitted)
    items += [*good[-2:], retransmitted]
    publish_raw(cluster.broker.port, items)

    wait_delivered(cluster, agent, len(good))
    stream, _ = cluster.consume()
    assert sorted(c.envelope.source.topic for c in stream) == sorted(t for t, _ in good)  # type: ignore[attr-defined]
    assert agent.proc.alive() and agent.proc.pid == pid, "the same agent process"
    metrics = agent.metrics()
    for reason in set(reasons.values()):
        n = sum(1 for r in reasons.values() if r == reason)
        assert f'bridge_dead_letters_total{{reason="{reason}"}} {n}.0' in metrics, reason
    assert 'bridge_source_retransmissions_skipped_total{source="json"} 1.0' in metrics
    out = subprocess.run(bridge_argv("dead-letters", "--config", str(agent.config), "--json",
                                     "--limit", "50"),
                         capture_output=True, text=True, check=True, timeout=30)
    letters = {(d["topic"], d["reason"]) for d in map(orjson.loads, out.stdout.splitlines())}
    assert letters == {(hostile[k][0], reasons[k]) for k in hostile}
    assert "Traceback" not in agent.proc.log.read_text()


def test_a_burst_of_large_bad_messages_is_bounded_and_never_stops_readings(cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent(sources=sources(cluster.broker.port).replace(
        "max_payload_bytes = 1024", "max_payload_bytes = 65536"),
        spool_extra="max_bytes = 2097152\ndead_letter_payload_bytes = 256\n"
                    "dead_letters_max = 50\n")
    bad = [(f"plant/p3/x{i}", b"{" + b"x" * 60_000) for i in range(300)]  # 18 MB of garbage
    tail = [(f"plant/p3/v{i}", orjson.dumps({"seq": i, "value": i})) for i in range(1, 101)]
    publish_raw(cluster.broker.port, bad + tail)
    wait_delivered(cluster, agent, len(tail))
    metrics = agent.metrics()
    assert 'bridge_dead_letters_total{reason="invalid_json"} 300.0' in metrics
    assert "bridge_spool_dead_letters_evicted_total 250.0" in metrics
    out = subprocess.run(bridge_argv("dead-letters", "--config", str(agent.config), "--json",
                                     "--limit", "1000"),
                         capture_output=True, text=True, check=True, timeout=30)
    letters = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert len(letters) == 50
    assert {d["topic"] for d in letters} == {f"plant/p3/x{i}" for i in range(250, 300)}
    assert all(d["bytes"] == 60_001 and d["truncated"] for d in letters)
    assert all(len(base64.b64decode(d["payload_b64"])) == 256 for d in letters)


def test_a_message_past_max_payload_bytes_is_dead_lettered_not_dropped_by_the_broker(
        cluster: Cluster):
    """The agent asks the broker only for its hard bound (max_packet_bytes, 16 MiB), so a
    message of any size up to it reaches the intake and is dead-lettered with its full size:
    before, the broker discarded everything past max_payload_bytes + 66,566 without a trace
    (MQTT v5 3.1.2.11.4) and the publisher got its PUBACK."""
    cluster.ingest("aws")
    agent = cluster.agent(sources=sources(cluster.broker.port))  # max_payload_bytes = 1024
    huge = ("plant/p4/blob", b'{"value": "' + b"x" * 2_000_000 + b'"}')
    small_oversize = ("plant/p4/mid", b'{"value": "' + b"y" * 5000 + b'"}')
    tail = [(f"plant/p4/v{i}", orjson.dumps({"seq": i, "value": i})) for i in range(1, 11)]
    publish_raw(cluster.broker.port, [huge, small_oversize, *tail])
    wait_delivered(cluster, agent, len(tail))
    metrics = agent.metrics()
    assert 'bridge_dead_letters_total{reason="oversize"} 2.0' in metrics
    assert 'bridge_source_messages_total{source="json"} 12.0' in metrics
    out = subprocess.run(bridge_argv("dead-letters", "--config", str(agent.config), "--json"),
                         capture_output=True, text=True, check=True, timeout=30)
    letters = {d["topic"]: d for d in map(orjson.loads, out.stdout.splitlines())}
    assert letters["plant/p4/blob"]["bytes"] == len(huge[1])  # full size recorded
    assert letters["plant/p4/blob"]["truncated"]  # the prefix kept
    assert base64.b64decode(letters["plant/p4/blob"]["payload_b64"]).startswith(b'{"value": "x')
    assert letters["plant/p4/mid"]["bytes"] == len(small_oversize[1])


def test_past_the_hard_bound_the_broker_drops_the_message_as_documented(cluster: Cluster):
    """What lies beyond max_packet_bytes is the broker's to drop (docs/configuration.md says
    how to make the publisher see it instead): the bound is what the agent sends."""
    cluster.ingest("aws")
    src = sources(cluster.broker.port).replace("max_payload_bytes = 1024\n",
                                               "max_payload_bytes = 1024\n"
                                               "max_packet_bytes = 70000\n", 1)
    agent = cluster.agent(sources=src)
    beyond = ("plant/p5/blob", b'{"value": "' + b"x" * 200_000 + b'"}')
    within = ("plant/p5/mid", b'{"value": "' + b"y" * 5000 + b'"}')
    tail = [(f"plant/p5/v{i}", orjson.dumps({"seq": i, "value": i})) for i in range(1, 11)]
    publish_raw(cluster.broker.port, [beyond, within, *tail])
    wait_delivered(cluster, agent, len(tail))
    metrics = agent.metrics()
    assert 'bridge_dead_letters_total{reason="oversize"} 1.0' in metrics
    assert 'bridge_source_messages_total{source="json"} 11.0' in metrics

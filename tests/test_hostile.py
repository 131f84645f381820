"""Hostile payloads end to end: each kind is dead-lettered with its bytes, good ones flow."""

from __future__ import annotations

import base64
import subprocess

import orjson

from bridge._pb import sparkplug_b_pb2 as sp
from bridge.localrun import bridge_argv
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

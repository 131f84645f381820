"""Sparkplug B end to end: a real mosquitto, the agent as Primary Host, exact accounting."""

from __future__ import annotations

import queue
from collections import Counter
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.edge.codecs.sparkplug import REBIRTH_METRIC
from bridge.shared._pb import sparkplug_b_pb2 as sp
from devkit import simulate
from tests.conftest import Cluster, publish_raw, wait_delivered, wait_for

HOST_ID = "bridge-test"


def sparkplug_source(port: int) -> str:
    return (f'[[sources]]\nname = "plant"\nurl = "mqtt://127.0.0.1:{port}"\n'
            f'codec = "sparkplug"\n[sources.sparkplug]\nhost_id = "{HOST_ID}"\n'
            "rebirth_interval_s = 0.5\n")


class Watcher:
    """An MQTT client that records what arrives on some topics, in order."""

    def __init__(self, port: int, *topics: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect("127.0.0.1", port)
        for t in topics:
            self.client.subscribe(t, qos=1)
        self.client.loop_start()

    def next(self, timeout: float = 20.0) -> tuple[str, bytes, bool]:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"nothing arrived within {timeout} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def state(watcher: Watcher) -> dict[str, Any]:
    topic, payload, _ = watcher.next()
    assert topic == f"spBv1.0/STATE/{HOST_ID}"
    return dict(orjson.loads(payload))


def test_every_sparkplug_metric_value_arrives_exactly_once(cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent(sources=sparkplug_source(cluster.broker.port))
    prog = simulate.run(host="127.0.0.1", port=cluster.broker.port, site="edge-1",
                        count=2000, rate=0, payload="sparkplug", metrics_per_message=20,
                        devices=3, timeout_s=60)
    assert prog.acked == 2000 and prog.readings == sum(prog.values.values())
    wait_delivered(cluster, agent, 2000)
    stream, errors = cluster.consume()
    assert not errors
    seen: Counter[tuple[int, str, str]] = Counter()
    for c in stream:
        env = c.envelope  # type: ignore[attr-defined]
        n = next(v.integer for v in env.values if v.signal == simulate.MESSAGE_METRIC)
        for v in env.values:
            seen[(n, env.labels.get("device", ""), v.signal)] += 1
    per_message = Counter(n for n, _, _ in seen)
    assert dict(per_message) == prog.values  # every value of every message...
    assert max(seen.values()) == 1            # ...once
    assert {c.envelope.labels["message_type"] for c in stream} == {  # type: ignore[attr-defined]
        "NBIRTH", "DBIRTH", "DDATA"}


def test_the_agent_is_primary_host_online_with_a_will_that_marks_it_offline(cluster: Cluster):
    cluster.ingest("aws")
    watcher = Watcher(cluster.broker.port, f"spBv1.0/STATE/{HOST_ID}")
    try:
        agent = cluster.agent(sources=sparkplug_source(cluster.broker.port))
        first = state(watcher)
        assert first["online"] is True
        agent.proc.kill()  # the broker publishes the will
        dead = state(watcher)
        assert dead == {"online": False, "timestamp": first["timestamp"]}
        agent.start()
        again = state(watcher)
        assert again["online"] is True and again["timestamp"] > first["timestamp"]
        agent.proc.stop()  # SIGTERM: a clean stop says offline itself
        assert state(watcher) == {"online": False, "timestamp": again["timestamp"]}
    finally:
        watcher.close()
    late = Watcher(cluster.broker.port, f"spBv1.0/STATE/{HOST_ID}")
    try:
        _, payload, retained = late.next()
        assert retained and orjson.loads(payload)["online"] is False
    finally:
        late.close()


def test_data_from_a_node_that_was_never_born_is_dead_lettered_and_a_rebirth_requested(
        cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent(sources=sparkplug_source(cluster.broker.port))
    watcher = Watcher(cluster.broker.port, "spBv1.0/+/NCMD/#")
    try:
        ddata = sp.Payload(seq=3)
        ddata.metrics.add(alias=4, double_value=1.0)
        publish_raw(cluster.broker.port, [("spBv1.0/G/DDATA/Lost/Dev", ddata.SerializeToString())])
        topic, payload, _ = watcher.next()
        assert topic == "spBv1.0/G/NCMD/Lost"
        cmd = sp.Payload.FromString(payload)
        assert [(m.name, m.boolean_value) for m in cmd.metrics] == [(REBIRTH_METRIC, True)]
    finally:
        watcher.close()
    wait_for(lambda: 'bridge_dead_letters_total{reason="data_before_birth"} 1.0'
             in agent.metrics(), what="the dead letter counted")
    assert ('bridge_sparkplug_events_total{kind="rebirth_requested",source="plant"} 1.0'
            in agent.metrics())


def test_a_node_born_before_the_host_is_asked_to_rebirth_and_accounted_exactly(
        cluster: Cluster):
    # The edge node starts with DATA (it was born before the agent came): the agent cannot
    # type it, dead-letters it, and asks for a rebirth; the node rebirths and all its later
    # values arrive. Every message is either in the stream with all its values or dead-lettered.
    cluster.ingest("aws")
    agent = cluster.agent(sources=sparkplug_source(cluster.broker.port))
    prog = simulate.run(host="127.0.0.1", port=cluster.broker.port, site="edge-2", count=2000,
                        rate=500, payload="sparkplug", devices=1, births=False, timeout_s=60)
    assert prog.rebirths >= 1
    taken = f'bridge_source_messages_total{{source="plant"}} {float(prog.acked)}'
    wait_for(lambda: taken in agent.metrics(), what="every message committed or dead-lettered")
    metrics = agent.metrics()
    dead = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(
        'bridge_dead_letters_total{reason="data_before_birth"}')))
    wait_delivered(cluster, agent, int(prog.acked - dead))
    stream, _ = cluster.consume()
    complete = Counter[int]()
    for c in stream:
        env = c.envelope  # type: ignore[attr-defined]
        n = next(v.integer for v in env.values if v.signal == simulate.MESSAGE_METRIC)
        complete[n] += len(env.values)
    assert all(complete[n] == prog.values[n] for n in complete)
    assert len(complete) + dead == prog.acked
    assert dead > 0 and min(complete) > 1  # the first messages were DATA before birth


def test_births_survive_an_agent_restart(cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent(sources=sparkplug_source(cluster.broker.port))
    nbirth = sp.Payload(seq=0)
    nbirth.metrics.add(name="bdSeq", datatype=sp.Int64, long_value=1)
    nbirth.metrics.add(name="Temp", alias=5, datatype=sp.Float, float_value=20.5)
    publish_raw(cluster.broker.port, [("spBv1.0/G/NBIRTH/N1", nbirth.SerializeToString())])
    wait_delivered(cluster, agent, 1)
    cluster.restart_agent(agent)
    ndata = sp.Payload(seq=1)
    ndata.metrics.add(alias=5, float_value=21.0)
    publish_raw(cluster.broker.port, [("spBv1.0/G/NDATA/N1", ndata.SerializeToString())])
    wait_delivered(cluster, agent, 2)
    stream, _ = cluster.consume()
    assert [(v.signal, v.number) for v in stream[-1].envelope.values] == [  # type: ignore[attr-defined]
        ("Temp", 21.0)]
    assert "bridge_dead_letters_total" not in agent.metrics() or \
        'reason="data_before_birth"' not in agent.metrics()


def test_the_primary_host_reasserts_online_when_it_sees_itself_reported_offline(
        cluster: Cluster):
    cluster.ingest("aws")
    topic = f"spBv1.0/STATE/{HOST_ID}"
    watcher = Watcher(cluster.broker.port, topic)
    try:
        agent = cluster.agent(sources=sparkplug_source(cluster.broker.port))
        first = state(watcher)
        assert first["online"] is True
        # Another client (a stale will, an operator's tool) says this host is offline.
        publish_raw(cluster.broker.port, [(topic, orjson.dumps(
            {"online": False, "timestamp": first["timestamp"]}))])
        assert state(watcher)["online"] is False
        again = state(watcher)
        assert again == {"online": True, "timestamp": first["timestamp"]}
        wait_for(lambda: 'kind="state_reasserted"' in agent.metrics(), what="counted")
    finally:
        watcher.close()

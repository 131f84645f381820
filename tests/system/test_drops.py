"""When a bound forces a drop, consumers see the gap by name; nothing vanishes silently."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import Cluster, Publisher, idle, wait_for


def consume_lines(cluster: Cluster) -> list[dict]:
    consumer = cluster.pki.consumer()
    args = [sys.executable, "-m", "bridge", "consume", "--ca", str(consumer.ca), "--cert",
            str(consumer.cert), "--key", str(consumer.key)]
    for n in cluster.nodes.values():
        args += ["--from", n.target]
    res = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in res.stdout.splitlines()]


def status(cluster: Cluster) -> dict:
    consumer = cluster.pki.consumer()
    args = [sys.executable, "-m", "bridge", "consume", "--status", "--json", "--ca",
            str(consumer.ca), "--cert", str(consumer.cert), "--key", str(consumer.key)]
    for n in cluster.nodes.values():
        args += ["--from", n.target]
    return json.loads(subprocess.run(args, capture_output=True, text=True, timeout=60,
                                     check=True).stdout)


def test_readings_past_their_maximum_age_arrive_as_a_named_gap(cluster: Cluster):
    cluster.ingest("aws")
    # Reconnects are kept quick (backoff_max_s): the new readings must arrive within max_age_s.
    agent = cluster.agent(spool_extra="max_age_s = 4.0\n", uplink_extra="backoff_max_s = 0.5\n")
    cluster.nodes["aws"].proc.kill()
    # More than max_in_flight (4) full batches (500): some readings must stay behind to expire.
    old = Publisher(cluster, count=3000, rate=0).join()
    wait_for(lambda: agent.status()["spool"]["oldest_age_s"] is not None
             and agent.status()["spool"]["dropped"].get("ttl", 0) > 0, timeout=20,
             what="the backlog to expire")
    # Batches already on the wire when the cloud went away are never dropped: they are
    # delivered late. Everything behind them expired.
    in_flight = old - agent.status()["spool"]["dropped"]["ttl"]
    assert 0 <= in_flight <= 4 * 500
    cluster.restart_ingest("aws")
    new = Publisher(cluster, count=100, rate=0).join()
    wait_for(lambda: idle(agent) and len(consume_lines(cluster)) == in_flight + 1 + new,
             timeout=30, interval=0.3, what="tombstone and new readings delivered")
    lines = consume_lines(cluster)
    stone = lines[in_flight]
    assert (stone["seq"], stone["last_seq"], stone["dropped"]) == \
        (in_flight + 1, old, {"reason": "ttl", "count": old - in_flight})
    assert [r["seq"] for r in lines if "dropped" not in r] == \
        list(range(1, in_flight + 1)) + list(range(old + 1, old + new + 1))
    (st,) = status(cluster)["streams"]
    assert st["merged"]["gaps"] == [] and st["merged"]["committed_through"] == old + new
    assert st["merged"]["dropped"] == [{"first_seq": in_flight + 1, "last_seq": old,
                                        "reason": "ttl"}]
    assert f'bridge_spool_dropped_total{{reason="ttl"}} {float(old - in_flight)}' in \
        agent.metrics()


def test_a_spool_full_past_the_backpressure_window_drops_telemetry_and_keeps_alarms(
        cluster: Cluster):
    cluster.ingest("aws")
    # Batches in flight are never dropped. The 4,000 alarms (about 520 kB) and a tombstone
    # per run of dropped telemetry (about 200 kB) already take most of the 1 MiB; with the
    # first batches in flight holding up to 4 x 1,250 readings, no telemetry was left to drop
    # in some runs and alarms had to go. Small batches leave the room the premise needs.
    agent = cluster.agent(spool_extra=(
        "max_bytes = 1048576\nbackpressure_s = 0.5\nreserve_bytes = 0\n"
        '[[spool.priority]]\ntopic = "substation/+/breaker_closed"\nclass = "alarm"\n'),
        uplink_extra="batch_max_readings = 100\n")
    cluster.nodes["aws"].proc.kill()
    published = Publisher(cluster, count=20000, rate=0).join()
    wait_for(lambda: agent.status()["committed_messages"] >= published, timeout=60,
             what="the agent to take every message (by dropping)")
    cluster.restart_ingest("aws")
    wait_for(lambda: idle(agent), timeout=60, what="delivery")
    lines = consume_lines(cluster)
    readings = [r for r in lines if "dropped" not in r]
    stones = [r for r in lines if "dropped" in r]
    dropped = sum(s["dropped"]["count"] for s in stones)
    assert dropped > 0
    assert len(readings) + dropped == published
    wait_for(lambda: agent.status()["spool"]["dropped"].get("spool_full") == dropped,
             what="the agent's drop record to match what consumers saw")
    assert {s["dropped"]["reason"] for s in stones} == {"spool_full"}
    alarms = {r["source_seq"] for r in readings if r["values"][0]["signal"] == "breaker_closed"}
    assert alarms == {n for n in range(1, published + 1) if (n - 1) % 5 == 2}, \
        "alarms are never dropped while telemetry can be"
    (st,) = status(cluster)["streams"]
    assert st["merged"]["gaps"] == [] and st["merged"]["committed_through"] == published

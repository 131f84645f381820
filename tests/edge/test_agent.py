"""The agent with real processes: mosquitto, ingest nodes, the agent; exact accounting."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from devkit import localrun
from tests.conftest import (
    Cluster,
    Publisher,
    idle,
    metric_value,
    publish_raw,
    wait_active,
    wait_delivered,
    wait_for,
)


def test_every_published_reading_arrives_once_in_the_merged_stream(cluster: Cluster):
    cluster.ingest("aws")
    cluster.ingest("azure")
    agent = cluster.agent()
    published = Publisher(cluster, count=3000, rate=0).join()
    wait_delivered(cluster, agent, published)
    committed, lost, dups = cluster.account(published)
    assert (committed, lost, dups) == (published, 0, 0)
    stream, _ = cluster.consume()
    seqs = [c.envelope.seq for c in stream]
    assert seqs == sorted(seqs) == list(range(1, len(seqs) + 1)), "per-site order, dense seqs"
    first = stream[0].envelope
    assert first.source.topic.startswith("substation/site-a/")
    assert first.values[0].signal and first.HasField("source_time_ns")
    assert {c.node for c in stream} == {"aws"}, "the primary takes everything while healthy"


def test_agent_killed_repeatedly_mid_stream_loses_and_doubles_nothing(cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent()
    pub = Publisher(cluster, count=8000, rate=2000)
    for k in (1, 2, 3):
        wait_for(lambda k=k: pub.progress.acked >= k * 2000, what=f"{k * 2000} published")
        agent.proc.kill()
        agent.start()
        agent.wait_subscribed()
    published = pub.join()
    wait_delivered(cluster, agent, published)
    assert cluster.account(published) == (published, 0, 0)


def test_primary_ingest_killed_mid_stream_fails_over_without_loss_or_doubles(cluster: Cluster):
    cluster.ingest("aws")
    cluster.ingest("azure")
    agent = cluster.agent()
    pub = Publisher(cluster, count=6000, rate=2000)
    wait_active(agent, "aws")
    wait_for(lambda: pub.progress.acked >= 2500, what="half published")
    cluster.nodes["aws"].proc.kill()
    published = pub.join()
    wait_for(lambda: idle(agent, published),
             timeout=60, what="the agent to send everything")
    st = agent.status()
    assert st["uplink"]["failovers"] >= 1
    assert [e["name"] for e in st["uplink"]["endpoints"] if e["active"]] == ["azure"]
    assert metric_value(agent.metrics(), 'bridge_uplink_failovers_total{from_endpoint="aws",'
                                         'to_endpoint="azure"}') >= 1
    cluster.restart_ingest("aws")  # its committed readings are only in its own store
    assert cluster.account(published) == (published, 0, 0)
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "bridge", "consume", "--status", "--json",
         "--from", cluster.nodes["aws"].target, "--from", cluster.nodes["azure"].target,
         "--ca", str(cluster.pki.ca), "--cert", str(cluster.pki.consumer().cert),
         "--key", str(cluster.pki.consumer().key)],
        capture_output=True, text=True, check=True, timeout=60).stdout)
    (stream_status,) = status["streams"]
    assert set(stream_status["clouds"]) == {"aws", "azure"}
    assert stream_status["merged"] == {"committed_through": published, "highest_seq": published,
                                       "readings": published, "gaps": [], "dropped": []}
    stream, _ = cluster.consume()
    assert {c.node for c in stream} == {"aws", "azure"}


def test_readings_published_while_the_agent_is_down_arrive_after_it_restarts(
        cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent()
    first = Publisher(cluster, count=500, rate=0).join()
    wait_delivered(cluster, agent, first)
    agent.proc.stop()
    # Published with no agent connected: they wait in the broker's persistent session.
    second = Publisher(cluster, count=1000, rate=0).join()
    agent.start()
    agent.wait_subscribed()
    wait_delivered(cluster, agent, first + second)
    stream, _ = cluster.consume()
    by_seq = sorted(c.envelope.source_seq for c in stream)
    assert len(stream) == first + second
    assert by_seq == sorted(list(range(1, first + 1)) + list(range(1, second + 1)))


def test_malformed_payloads_are_dead_lettered_while_good_ones_flow(cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent(topics=("plant/#",))
    bad = [("plant/x/flow", b"{not json"), ("plant/x/flow", b"\xff\xfe\x00"),
           ("plant/x/flow", b'{"value": null}'), ("plant/x/flow", b'{"value": 1, "ts": "no"}'),
           ("plant/x/flow", b"[1, 2]")]
    good = [("plant/x/flow", b'{"value": %d, "seq": %d}' % (i, i)) for i in range(1, 51)]
    items = [m for pair in zip(good, bad * 10, strict=False) for m in pair] + good[len(bad) * 10:]
    publish_raw(cluster.broker.port, items)
    wait_delivered(cluster, agent, len(good))
    stream, _ = cluster.consume()
    assert sorted(c.envelope.source_seq for c in stream) == list(range(1, 51))
    metrics = agent.metrics()
    for reason in ("invalid_json", "invalid_utf8", "bad_value", "bad_timestamp", "bad_shape"):
        assert f'bridge_dead_letters_total{{reason="{reason}"}}' in metrics, reason
    agent.proc.stop()
    db = sqlite3.connect(cluster.workdir / "spool-site-a.db")
    rows = db.execute("SELECT topic, payload, reason FROM dead_letters").fetchall()
    assert len(rows) == len(bad) * 10
    assert ("plant/x/flow", b"{not json", "invalid_json") in rows


def test_sigterm_stops_the_agent_cleanly_within_ten_seconds(cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent()
    pub = Publisher(cluster, count=3000, rate=3000)
    wait_for(lambda: pub.progress.acked >= 1000, what="publishing under way")
    took = agent.proc.stop(timeout=15)
    assert took < 10.0
    assert agent.proc.popen is not None and agent.proc.popen.returncode == 0
    assert '"event": "agent.stopped"' in agent.proc.log.read_text().replace('":"', '": "')
    published = pub.join()
    agent.start()
    agent.wait_subscribed()
    wait_delivered(cluster, agent, published)
    wait_for(lambda: cluster.account(published)[0] == published, what="all readings")
    assert cluster.account(published) == (published, 0, 0)


def test_all_endpoints_down_keeps_readings_in_the_spool_until_one_returns(cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent()
    cluster.nodes["aws"].proc.kill()
    published = Publisher(cluster, count=1000, rate=0).join()
    wait_for(lambda: agent.status()["spool"]["readings"] == published,
             what="readings held in the spool")
    assert agent.status()["uplink"]["endpoints"][0]["state"] == "unhealthy"
    t0 = time.monotonic()
    cluster.restart_ingest("aws")
    wait_delivered(cluster, agent, published)
    assert time.monotonic() - t0 < 30
    assert cluster.account(published) == (published, 0, 0)


def test_consume_prints_each_reading_once_as_json_and_resumes_from_its_cursor(
        cluster: Cluster, tmp_path):
    cluster.ingest("aws")
    cluster.ingest("azure")
    agent = cluster.agent()
    first = Publisher(cluster, count=400, rate=0).join()
    wait_delivered(cluster, agent, first)
    consumer = cluster.pki.consumer()
    cfg = tmp_path / "consumer.toml"
    cfg.write_text(f'from = ["{cluster.nodes["aws"].target}", "{cluster.nodes["azure"].target}"]\n'
                   f'cursor = "{tmp_path / "cursor.json"}"\n'
                   f'[tls]\nca = "{consumer.ca}"\ncert = "{consumer.cert}"\n'
                   f'key = "{consumer.key}"\n')

    def consume() -> list[dict]:
        res = subprocess.run([sys.executable, "-m", "bridge", "consume", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60, check=True)
        return [json.loads(line) for line in res.stdout.splitlines()]

    lines = consume()
    assert [r["seq"] for r in lines] == list(range(1, first + 1))
    assert lines[0]["site_id"] == "site-a" and lines[0]["values"][0]["signal"]
    assert consume() == [], "the cursor remembers what was emitted"
    second = Publisher(cluster, count=100, rate=0).join()
    wait_delivered(cluster, agent, first + second)
    assert [r["seq"] for r in consume()] == list(range(first + 1, first + second + 1))


def test_bridge_status_shows_a_running_agents_spool_sources_and_endpoints(cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent()
    wait_delivered(cluster, agent, Publisher(cluster, count=10, rate=0).join())
    res = subprocess.run([sys.executable, "-m", "bridge", "status", "--config",
                          str(agent.config)], capture_output=True, text=True, timeout=30,
                         check=True)
    assert "site site-a" in res.stdout and "subscribed" in res.stdout
    assert "*aws" in res.stdout and "healthy" in res.stdout
    agent.proc.stop()
    res = subprocess.run([sys.executable, "-m", "bridge", "status", "--config",
                          str(agent.config)], capture_output=True, text=True, timeout=30,
                         check=False)
    assert res.returncode == 2 and "no agent answering" in res.stderr


def test_a_corrupted_spool_is_salvaged_and_the_agent_keeps_running(cluster: Cluster):
    cluster.ingest("aws")
    agent = cluster.agent()
    cluster.nodes["aws"].proc.kill()
    first = Publisher(cluster, count=3000, rate=0).join()
    wait_for(lambda: agent.status()["spool"]["readings"] == first, what="backlog spooled")
    agent.proc.stop()
    spool = cluster.workdir / "spool-site-a.db"
    size = spool.stat().st_size
    with spool.open("r+b") as f:  # garbage over a run of pages in the middle of the backlog
        f.seek(size // 2 // 4096 * 4096)
        f.write(bytes(range(256)) * 16 * 6)
    agent.start()
    agent.wait_subscribed()
    cluster.restart_ingest("aws")
    second = Publisher(cluster, count=200, rate=0).join()
    wait_for(lambda: idle(agent, taken=second) and agent.status()["spool"]["quarantined"] != [],
             timeout=60, what="salvage and delivery")
    (q,) = agent.status()["spool"]["quarantined"]
    assert 0 < q["salvaged"] < first and Path(q["moved_to"]).exists()
    assert agent.proc.alive()
    assert f"bridge_spool_salvaged_readings {float(q['salvaged'])}" in agent.metrics()
    stream, _ = cluster.consume()
    by_epoch = Counter(c.envelope.epoch for c in stream)
    assert sorted(by_epoch.values()) == sorted([q["salvaged"], second]), \
        "salvaged readings keep their old epoch; new ones start a new epoch"
    assert len({(c.envelope.epoch, c.envelope.seq) for c in stream}) == len(stream)


def test_consume_follow_streams_new_readings_as_they_commit_and_saves_its_cursor(
        cluster: Cluster, tmp_path):
    cluster.ingest("aws")
    agent = cluster.agent()
    consumer = cluster.pki.consumer()
    cursor = tmp_path / "cursor.json"
    out = (tmp_path / "follow.jsonl").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "consume", "--follow", "--from",
         cluster.nodes["aws"].target, "--ca", str(consumer.ca), "--cert", str(consumer.cert),
         "--key", str(consumer.key), "--cursor", str(cursor)], stdout=out,
        stderr=subprocess.DEVNULL)
    try:
        published = Publisher(cluster, count=300, rate=0).join()
        wait_delivered(cluster, agent, published)

        def lines() -> list[dict]:
            text = (tmp_path / "follow.jsonl").read_text()
            return [json.loads(x) for x in text.splitlines() if x.strip()]

        wait_for(lambda: len(lines()) == published, what="the followed stream to catch up")
        assert [r["seq"] for r in lines()] == list(range(1, published + 1))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        out.close()
    saved = json.loads(cursor.read_text())
    assert saved["streams"][0]["after_seq"] == published


LOADED = """
import sys
from bridge.edge.agent import Agent
from bridge.shared.config import load_agent
from pathlib import Path
agent = Agent(config=load_agent(Path(sys.argv[1])))
print(" ".join(m for m in ("bridge.edge.codecs.sparkplug",
                          "bridge.shared._pb.sparkplug_b_pb2", "aiormq")
               if m in sys.modules))
agent.spool.spool.close()
"""


@pytest.mark.parametrize("codec", ["json", "sparkplug"])
def test_an_agent_loads_a_decoder_only_when_its_configuration_uses_it(tmp_path: Path,
                                                                        codec: str) -> None:
    """The Sparkplug schema and decoder (1.8 MB of RSS) and the AMQP client are imported
    only by an agent whose sources need them."""
    pki = localrun.Pki(tmp_path / "pki", ["site-a"])
    node = localrun.ingest(tmp_path, pki, "aws")  # its address only: never started
    cfg = localrun.agent(tmp_path, pki, "site-a", mqtt_port=1883, endpoints=[node], sources=(
        f'[[sources]]\nname = "plant"\nurl = "mqtt://127.0.0.1:1883"\ncodec = "{codec}"\n'
        + ('topics = ["#"]\n' if codec == "json" else ""))).config
    out = subprocess.run([sys.executable, "-c", LOADED, str(cfg)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "aiormq" not in loaded
    if codec == "json":
        assert loaded == set()
    else:
        assert {"bridge.edge.codecs.sparkplug", "bridge.shared._pb.sparkplug_b_pb2"} <= loaded

"""Multi-cloud failover with real processes: every published reading accounted for exactly."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import grpc
import orjson

from bridge.shared import pki
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.config import TlsConfig
from devkit import localrun
from tests.conftest import (
    Cluster,
    Publisher,
    active,
    idle,
    metric_value,
    wait_active,
    wait_for,
)


def wait_sent(agent: localrun.AgentProc, taken: int, timeout: float = 90) -> None:
    wait_for(lambda: idle(agent, taken), timeout=timeout, interval=0.1, what="agent spool to empty")


def events(agent: localrun.AgentProc, name: str) -> list[dict]:
    out = []
    for line in agent.proc.log.read_text().splitlines():
        if line.startswith("{"):
            doc = orjson.loads(line)
            if doc.get("event") == name:
                out.append(doc)
    return out


def failovers(agent: localrun.AgentProc) -> int:
    return int(agent.status()["uplink"]["failovers"])


def test_a_hung_primary_sigstop_fails_over_quickly_without_loss_or_doubles(cluster: Cluster):
    cluster.ingest("aws")
    cluster.ingest("azure")
    agent = cluster.agent(uplink_extra="deadline_s = 30.0\n")
    pub = Publisher(cluster, count=4000, rate=1000)
    wait_active(agent, "aws")
    wait_for(lambda: pub.progress.acked >= 1500, what="publishing under way")
    cluster.nodes["aws"].proc.signal(signal.SIGSTOP)
    t_stop = time.monotonic()
    wait_for(lambda: failovers(agent) >= 1, timeout=10, what="failover off the hung primary")
    detected_s = time.monotonic() - t_stop
    published = pub.join()
    wait_sent(agent, published)
    assert detected_s < 10, "found by the health probe, not by the 30 s call deadline"
    unhealthy = [e for e in events(agent, "uplink.endpoint_state")
                 if e["endpoint"] == "aws" and e["new"] == "unhealthy"]
    assert unhealthy and unhealthy[0]["flag"] == "UT"
    cluster.nodes["aws"].proc.signal(signal.SIGCONT)
    assert cluster.account(published) == (published, 0, 0)


def test_a_flapping_primary_does_not_pull_traffic_back_and_forth(cluster: Cluster):
    cluster.ingest("aws")
    cluster.ingest("azure")
    agent = cluster.agent()
    pub = Publisher(cluster, count=9000, rate=300)  # ~30 s of publishing
    wait_active(agent, "aws")
    aws = cluster.nodes["aws"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # killed and restarted every 2 s for 30 s
        aws.proc.kill()
        aws.start()
        t = time.monotonic() + 2
        while time.monotonic() < t and pub.thread.is_alive():
            time.sleep(0.05)
    published = pub.join()
    wait_sent(agent, published)
    assert failovers(agent) == 1, ("one failover; the flapping primary never became stable",
                                   events(agent, "uplink.failover"),
                                   events(agent, "uplink.breaker"))
    assert active(agent) == ["azure"]
    localrun.wait_healthy(aws.target, cluster.pki.consumer())
    assert cluster.account(published) == (published, 0, 0)


def test_all_endpoints_down_for_a_minute_then_back_delivers_everything(cluster: Cluster):
    cluster.ingest("aws")
    cluster.ingest("azure")
    agent = cluster.agent()
    for n in cluster.nodes.values():
        n.proc.kill()
    t_down = time.monotonic()
    published = Publisher(cluster, count=3000, rate=100).join()  # ~30 s while down
    wait_for(lambda: agent.status()["spool"]["readings"] == published, what="all spooled")
    assert events(agent, "uplink.no_healthy_upstream")[0]["flag"] == "UH"
    wait_for(lambda: time.monotonic() - t_down >= 60, timeout=70, interval=0.5,
             what="a minute of outage")
    for name in ("aws", "azure"):
        cluster.restart_ingest(name)
    wait_sent(agent, published)
    assert cluster.account(published) == (published, 0, 0)
    assert events(agent, "uplink.upstream_restored")


def test_the_secondary_dying_during_a_failover_moves_on_to_the_third(cluster: Cluster):
    for name in ("aws", "azure", "gcp"):
        cluster.ingest(name)
    agent = cluster.agent()
    pub = Publisher(cluster, count=6000, rate=2000)
    wait_active(agent, "aws")
    wait_for(lambda: pub.progress.acked >= 2000, what="publishing under way")
    cluster.nodes["aws"].proc.kill()
    wait_for(lambda: failovers(agent) >= 1, timeout=10, what="failover to azure")
    cluster.nodes["azure"].proc.kill()
    published = pub.join()
    wait_sent(agent, published)
    assert failovers(agent) >= 2
    assert active(agent) == ["gcp"]
    cluster.restart_ingest("aws")
    cluster.restart_ingest("azure")
    assert cluster.account(published) == (published, 0, 0)


def test_traffic_fails_back_to_the_primary_after_it_has_been_stable(cluster: Cluster):
    cluster.ingest("aws")
    cluster.ingest("azure")
    agent = cluster.agent(uplink_extra="failback_after_s = 2.0\n")
    first = Publisher(cluster, count=1000, rate=0).join()
    wait_sent(agent, first)
    cluster.nodes["aws"].proc.kill()
    wait_for(lambda: agent.status()["uplink"]["endpoints"][0]["state"] == "unhealthy",
             what="primary seen down")
    second = Publisher(cluster, count=1000, rate=0).join()
    wait_sent(agent, first + second)
    cluster.restart_ingest("aws")
    # The switch happens on the next batch, so publish while waiting for it.
    third = Publisher(cluster, count=1000, rate=100).join()
    wait_sent(agent, first + second + third)
    assert active(agent) == ["aws"]
    fourth = Publisher(cluster, count=500, rate=0).join()
    wait_sent(agent, first + second + third + fourth)
    stream, errors = cluster.consume()
    assert not errors
    assert len(stream) == first + second + third + fourth
    last_nodes = {c.node for c in stream[-500:]}
    assert last_nodes == {"aws"}, "after the stable period the primary takes traffic again"
    assert events(agent, "uplink.active")[-1]["reason"].startswith("fail-back")


def test_endpoints_with_a_wrong_name_or_another_cas_certificate_are_never_trusted(
        cluster: Cluster, tmp_path):
    other = tmp_path / "other-pki"
    other.mkdir()
    for f in ("ca.pem", "ca.key"):
        (other / f).write_bytes((cluster.pki.dir / f).read_bytes())
    pki.issue_server(other, other, name="wrong", dns=["other.example"], ips=[])
    rogue = tmp_path / "rogue-ca"
    pki.create_ca(rogue)
    pki.issue_server(rogue, rogue, name="ingest", dns=["localhost"], ips=["127.0.0.1"])
    cluster.ingest("wrongname", wait=False, tls=TlsConfig(
        ca=cluster.pki.ca, cert=other / "server-wrong.pem", key=other / "server-wrong.key"))
    cluster.ingest("rogue", wait=False, tls=TlsConfig(
        ca=cluster.pki.ca, cert=rogue / "server-ingest.pem", key=rogue / "server-ingest.key"))
    cluster.ingest("azure")
    agent = cluster.agent(nodes=["wrongname", "rogue", "azure"])
    published = Publisher(cluster, count=500, rate=0).join()
    wait_sent(agent, published)
    for name in ("wrongname", "rogue"):
        bad = [e for e in events(agent, "uplink.endpoint_state") if e["endpoint"] == name]
        assert bad and bad[0]["new"] == "unhealthy" and bad[0]["flag"] == "UF", name
        assert "UNAVAILABLE" in bad[0]["reason"]
        assert cluster.nodes[name].proc.alive()
    impostors = {n: cluster.nodes.pop(n) for n in ("wrongname", "rogue")}
    try:  # the consumer cannot verify them either
        stream, _ = cluster.consume()
        assert {c.node for c in stream} == {"azure"}
        assert cluster.account(published) == (published, 0, 0)
    finally:
        cluster.nodes.update(impostors)


def test_a_rate_limited_ingest_slows_the_agent_without_tripping_anything(cluster: Cluster):
    metrics_port = localrun.free_port()
    cluster.ingest("aws", extra="[rate_limit]\nreadings_per_s = 1000\nburst = 500\n"
                   f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    cluster.ingest("azure")
    agent = cluster.agent()
    published = Publisher(cluster, count=3000, rate=0).join()
    wait_sent(agent, published)
    metrics = agent.metrics()
    assert metric_value(metrics, 'bridge_uplink_throttled_total{endpoint="aws"}') > 0
    assert failovers(agent) == 0
    assert agent.status()["uplink"]["endpoints"][0]["breaker"] == "closed"
    stream, _ = cluster.consume()
    assert {c.node for c in stream} == {"aws"}
    assert cluster.account(published) == (published, 0, 0)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        ingest_metrics = resp.read().decode()
    assert metric_value(ingest_metrics, 'bridge_ingest_throttled_total{site="site-a"}') > 0
    committed = [line for line in ingest_metrics.splitlines()
                 if line.startswith('bridge_ingest_readings_committed_total{site="site-a"}')]
    assert committed and float(committed[0].split()[-1]) == published


class Hog:
    """Another site keeping an ingest full: 3 threads pushing 10,000-reading batches back to
    back (each waits out node_busy refusals as an agent would)."""

    def __init__(self, cluster: Cluster, node: str, site: str = "site-b") -> None:
        ca, cert, key = cluster.pki.site(site).read()
        self.channel = grpc.secure_channel(cluster.nodes[node].target,
                                           grpc.ssl_channel_credentials(ca, key, cert))
        self.push = self.channel.unary_unary("/bridge.v1.Ingest/PushBatch",
                                             request_serializer=pb.Batch.SerializeToString,
                                             response_deserializer=pb.Ack.FromString)
        self.site, self.stop, self.acked = site, threading.Event(), 0
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                        for k in range(3)]

    def _run(self, lane: int) -> None:
        seq = lane * 10**9
        while not self.stop.is_set():
            batch = pb.Batch(batch_id=f"hog-{seq}", envelopes=[
                pb.Envelope(site_id=self.site, epoch=1, seq=seq + k + 1) for k in range(10_000)])
            try:
                self.push(batch, timeout=30)
            except grpc.RpcError as exc:
                hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms")  # type: ignore[attr-defined]
                self.stop.wait(int(hint) / 1000 if hint else 0.05)
                continue
            self.acked += 1
            seq += 10_000

    def __enter__(self) -> Hog:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.channel.close()


def test_a_busy_ingest_paces_the_agent_which_waits_its_turn_without_failing_over(
        cluster: Cluster):
    # Admission control sized small (1 ms target, at most 1,000 readings at once) while
    # another site keeps 10,000-reading calls coming: the agent meets node_busy.
    metrics_port = localrun.free_port()
    cluster.ingest("aws", extra="[limits]\nadmit_target_ms = 1\nmax_in_flight_readings = 1000\n"
                   f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    cluster.ingest("azure")
    with Hog(cluster, "aws") as hog:
        wait_for(lambda: hog.acked >= 2, timeout=60)
        agent = cluster.agent(uplink_extra="batch_max_readings = 250\n")
        published = Publisher(cluster, count=20_000, rate=0).join()
        wait_sent(agent, published)
    metrics = agent.metrics()
    assert metric_value(metrics, 'bridge_uplink_throttled_total{endpoint="aws"}') > 0
    assert metric_value(metrics, 'bridge_uplink_throttle_wait_seconds_total{endpoint="aws"}') > 0
    assert failovers(agent) == 0
    assert metric_value(metrics, 'bridge_uplink_stalls_total{endpoint="aws"}') == 0
    assert metric_value(metrics, 'bridge_uplink_breaker_trips_total{endpoint="aws"}') == 0
    assert not [e for e in events(agent, "uplink.endpoint_state") if e["endpoint"] == "aws"
                and e["new"] != "healthy"]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        ingest_metrics = resp.read().decode()
    assert metric_value(ingest_metrics,
                        'bridge_ingest_refused_batches_total{reason="node_busy"}') > 0
    stream, _ = cluster.consume()
    assert {c.node for c in stream if c.envelope.site_id == "site-a"} == {"aws"}
    assert cluster.account(published) == (published, 0, 0)


def test_an_ingest_that_takes_smaller_batches_gets_them_split_without_loss_or_failover(
        cluster: Cluster):
    cluster.ingest("aws", extra="[limits]\nmax_batch_envelopes = 20\n")
    cluster.ingest("azure")
    agent = cluster.agent(uplink_extra="batch_max_readings = 200\n")
    published = Publisher(cluster, count=1000, rate=0).join()
    wait_sent(agent, published)
    split = events(agent, "uplink.batch_split")
    assert split and split[0]["max_batch_envelopes"] == 20 and split[0]["endpoint"] == "aws"
    assert failovers(agent) == 0
    stream, _ = cluster.consume()
    assert {c.node for c in stream} == {"aws"}
    assert cluster.account(published) == (published, 0, 0)
    refused = [e for e in events(agent, "uplink.batch") if e.get("status") != "OK"]
    # Only the batches built before the first refusal (one per slot, max_in_flight = 4) are
    # refused; after it the agent builds none larger than the ingest takes.
    assert 1 <= len(refused) <= 4, refused


def test_a_store_that_stalls_behind_a_healthy_front_is_left_within_two_deadlines(
        cluster: Cluster):
    """Gray failure: aws answers health checks but its store's write lock is held by another
    process, so every push stalls. The agent must leave it, 0 lost and 0 doubled."""
    import sqlite3

    deadline = 1.0
    cluster.ingest("aws")
    cluster.ingest("azure")
    agent = cluster.agent(uplink_extra=f"deadline_s = {deadline}\n")
    pub = Publisher(cluster, count=3000, rate=500)
    wait_active(agent, "aws")
    wait_for(lambda: pub.progress.acked >= 800, what="publishing under way")
    lock = sqlite3.connect(cluster.workdir / "store-aws.db", isolation_level=None, timeout=10)
    lock.execute("BEGIN IMMEDIATE")  # aws's writer now waits; its health stays SERVING
    stalled_ns = time.time_ns()
    try:
        wait_for(lambda: (agent.status()["uplink"]["failover_first_ack_ns"] or 0) > stalled_ns,
                 timeout=15, interval=0.02, what="first ack elsewhere after the stall")
        took = (agent.status()["uplink"]["failover_first_ack_ns"] - stalled_ns) / 1e9
        published = pub.join()
        wait_sent(agent, published)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert took < 2 * deadline, f"failover took {took:.3f} s"
    assert active(agent) == ["azure"]
    assert cluster.account(published) == (published, 0, 0)
    assert metric_value(agent.metrics(), 'bridge_uplink_stalls_total{endpoint="aws"}') > 0
    stalls = events(agent, "uplink.stall")
    assert stalls and stalls[0]["flag"] == "UT"
    assert any(e["flag"] == "UT" for e in events(agent, "uplink.batch"))

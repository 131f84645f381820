"""The JetStream store with real processes: three nats-server nodes (R3, fsync always),
stateless ingest replicas, the real agent. The stream itself is read back with plain nats-py,
so "stored once" is checked in the log a cloud team reads, not only in our merge."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import nats
import orjson
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from bridge.cloud.store.jetstream import JetStreamStore
from bridge.cloud.store.records import Incoming
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.config import JetStreamSettings
from devkit import localrun
from devkit.jscluster import JetStreamCluster
from tests.conftest import Cluster, LoopTurns, Publisher, idle, wait_active, wait_for


@pytest.fixture
def js(tmp_path: Path) -> Iterator[JetStreamCluster]:
    c = JetStreamCluster(tmp_path / "js").start()
    yield c
    c.stop()


def stored(servers: list[str], subject: str = "bridge.r.>") -> list[tuple[str, int, int]]:
    """(site, epoch, seq) of every message in the stream, read with a plain NATS client and
    nothing of ours but the protobuf schema (docs/consuming.md)."""

    async def read() -> list[tuple[str, int, int]]:
        nc = await nats.connect(servers=servers)
        try:
            jsc = nc.jetstream()
            for _ in range(30):  # a restarted node may still be electing a stream leader
                try:
                    info = await jsc.stream_info("BRIDGE")
                    break
                except nats.errors.TimeoutError:
                    continue
            else:
                pytest.fail("the stream did not answer for 150 s")
            total = info.state.messages
            out: list[tuple[str, int, int]] = []
            if total == 0:
                return out
            for _ in range(30):
                try:
                    sub = await jsc.subscribe(subject, ordered_consumer=True, config=ConsumerConfig(
                        deliver_policy=DeliverPolicy.ALL))
                    break
                except nats.errors.TimeoutError:
                    continue
            else:
                pytest.fail("no consumer could be created for 150 s")
            while len(out) < total:
                msg = await sub.next_msg(timeout=10)
                env = pb.Envelope.FromString(msg.data)
                h = msg.headers or {}
                assert (h["Bridge-Site"], int(h["Bridge-Epoch"], 16), int(h["Bridge-Seq"])) == \
                    (env.site_id, env.epoch, env.seq)
                out.append((env.site_id, env.epoch, env.seq))
            await sub.unsubscribe()
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


def replicas(cluster: Cluster, js: JetStreamCluster, n: int, *, extra: str = ""
             ) -> list[localrun.IngestProc]:
    """``n`` ingest replicas of the cloud ``aws``, all in front of the one stream."""
    out = []
    for i in range(n):
        name = f"aws-{i + 1}"
        proc = localrun.ingest(cluster.workdir, cluster.pki, "aws", jetstream=js.servers,
                               name=name, extra=extra).start()
        cluster.nodes[name] = proc
        localrun.wait_healthy(proc.target, cluster.pki.consumer())
        out.append(proc)
    return out


def exactly_once(js: JetStreamCluster, published: int) -> None:
    seqs = Counter(s for _, _, s in stored(js.servers))
    assert sorted(seqs) == list(range(1, published + 1))
    assert max(seqs.values()) == 1, "a seq stored twice in the stream"


def test_a_replica_started_before_its_cluster_has_formed_waits_for_it(
        cluster: Cluster, tmp_path: Path):
    forming = JetStreamCluster(tmp_path / "forming")
    try:
        forming.nodes[0].start(forming.exe)  # one node of three: no meta leader yet
        forming.nodes[0].wait_listening()
        proc = localrun.ingest(cluster.workdir, cluster.pki, "aws",
                               jetstream=[forming.nodes[0].url]).start()
        wait_for(lambda: "jetstream.waiting" in proc.proc.log.read_text(errors="replace"),
                 timeout=30, what="the replica saying it waits for the cluster")
        assert proc.proc.alive()
        for n in forming.nodes[1:]:
            n.start(forming.exe)
        cluster.nodes["aws"] = proc
        localrun.wait_healthy(proc.target, cluster.pki.consumer(), timeout=60)
        ca, cert, key = cluster.pki.site("site-a").read()
        stub = pb_grpc.IngestStub(grpc.secure_channel(
            proc.target, grpc.ssl_channel_credentials(ca, key, cert)))
        ack = stub.PushBatch(pb.Batch(batch_id="b", envelopes=[
            pb.Envelope(site_id="site-a", epoch=1, seq=1)]), timeout=10)
        assert ack.results[0].disposition == pb.DISPOSITION_COMMITTED
    finally:
        forming.stop()


async def test_a_replica_starts_only_once_the_stream_answers_on_its_subjects(
        js: JetStreamCluster, caplog: pytest.LogCaptureFixture) -> None:
    """A stream made on another server is known to ours a moment later; until then a publish
    meets no responders. Here the stream does not cover the replica's subjects at first (as
    if its interest were still on its way): the replica waits, saying so, and starts, its
    first commit stored, once it does. The probe itself stores nothing."""
    nc = await nats.connect(servers=js.servers)
    try:
        jsc = nc.jetstream()
        await jsc.add_stream(name="BRIDGE", subjects=["elsewhere.>"], num_replicas=3,
                             allow_atomic=True)
        writer = JetStreamStore(settings=JetStreamSettings(servers=(js.servers[2],)))
        starting = asyncio.create_task(writer.start())
        async with asyncio.timeout(30):
            while "jetstream.waiting" not in caplog.text:
                await asyncio.wait({starting}, timeout=0.05)
        assert not starting.done()
        info = await jsc.stream_info("BRIDGE")
        info.config.subjects = ["bridge.r.>"]
        await jsc.update_stream(info.config)
        async with asyncio.timeout(30):
            await starting
        try:
            got = await writer.commit([Incoming("site-a", 1, 1, pb.Envelope(
                site_id="site-a", epoch=1, seq=1).SerializeToString())])
            assert got == ["committed"]
        finally:
            await writer.close()
        assert (await jsc.stream_info("BRIDGE")).state.messages == 1
    finally:
        await nc.close()


def test_replicas_share_one_stream_and_a_replica_killed_mid_load_doubles_nothing(
        cluster: Cluster, js: JetStreamCluster):
    first, _second = replicas(cluster, js, 2)
    agent = cluster.agent(nodes=["aws-1", "aws-2"], names=["aws-1", "aws-2"],
                          uplink_extra="deadline_s = 3.0\n")
    pub = Publisher(cluster, count=6000, rate=1500)
    wait_active(agent, "aws-1")
    wait_for(lambda: pub.progress.acked >= 2000, what="publishing under way")
    first.proc.kill()  # kill -9 mid-batch: the agent resends to the other replica
    published = pub.join()
    wait_for(lambda: idle(agent, published), timeout=90, interval=0.1, what="all delivered")
    exactly_once(js, published)
    cluster.nodes.pop("aws-1")  # dead: the merged read goes through the surviving replica
    assert cluster.account(published) == (published, 0, 0)


def test_two_replicas_handed_the_same_batch_at_the_same_moment_store_it_once(
        cluster: Cluster, js: JetStreamCluster):
    reps = replicas(cluster, js, 2)
    ca, cert, key = cluster.pki.site("site-a").read()
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    stubs = [pb_grpc.IngestStub(grpc.secure_channel(r.target, creds)) for r in reps]
    acks: list[pb.Ack] = []
    for round_ in range(5):
        batch = pb.Batch(batch_id=f"b{round_}", envelopes=[
            pb.Envelope(site_id="site-a", epoch=5, seq=s)
            for s in range(round_ * 1500 + 1, round_ * 1500 + 1501)])  # two atomic chunks
        start = threading.Barrier(2)

        def push(stub: pb_grpc.IngestStub, b: pb.Batch = batch,
                 barrier: threading.Barrier = start) -> None:
            barrier.wait()
            acks.append(stub.PushBatch(b, timeout=20))

        threads = [threading.Thread(target=push, args=(s,)) for s in stubs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(acks) == 10
    for ack in acks:
        assert all(r.disposition in (pb.DISPOSITION_COMMITTED, pb.DISPOSITION_DUPLICATE)
                   for r in ack.results)
    committed = sum(r.disposition == pb.DISPOSITION_COMMITTED for a in acks for r in a.results)
    assert committed == 7500, "each reading committed by exactly one replica"
    exactly_once(js, 7500)


@pytest.mark.parametrize("victim", ["leader", "follower"])
def test_a_jetstream_node_killed_under_load_loses_and_doubles_nothing(
        cluster: Cluster, js: JetStreamCluster, victim: str):
    replicas(cluster, js, 1)
    agent = cluster.agent(nodes=["aws-1"], uplink_extra="deadline_s = 3.0\n")
    pub = Publisher(cluster, count=5000, rate=1500)
    wait_for(lambda: pub.progress.acked >= 1500, what="publishing under way")
    leader = js.stream_leader("BRIDGE")
    names = [n.name for n in js.nodes]
    index = names.index(leader) if victim == "leader" else \
        next(i for i, n in enumerate(names) if n != leader)
    js.kill(index)
    wait_for(lambda: pub.progress.acked >= 3500, what="publishing on")
    js.restart(index)
    published = pub.join()
    wait_for(lambda: idle(agent, published), timeout=90, interval=0.1, what="all delivered")
    exactly_once(js, published)


def test_losing_quorum_stops_acks_the_agent_holds_the_readings_and_all_arrive_after(
        cluster: Cluster, js: JetStreamCluster):
    replicas(cluster, js, 1)
    agent = cluster.agent(nodes=["aws-1"], uplink_extra="deadline_s = 2.0\n")
    pub = Publisher(cluster, count=3000, rate=1000)
    wait_for(lambda: pub.progress.acked >= 1000, what="publishing under way")
    js.kill(1)
    js.kill(2)  # one node of three: no quorum, no acks
    wait_for(lambda: any(f'code="{c}"' in agent.metrics()
                         for c in ("UNAVAILABLE", "DEADLINE_EXCEEDED")),
             timeout=30, what="the replica refusing to ack without quorum")
    published = pub.join()
    held = agent.status()["spool"]["readings"]
    assert held > 0, "the agent keeps what JetStream could not acknowledge"
    js.restart(1)
    js.restart(2)
    wait_for(lambda: idle(agent, published), timeout=120, interval=0.2,
             what="everything delivered once quorum returned")
    exactly_once(js, published)


def test_a_whole_cluster_restart_keeps_every_acknowledged_reading(
        cluster: Cluster, js: JetStreamCluster):
    replicas(cluster, js, 1)
    agent = cluster.agent(nodes=["aws-1"])
    pub = Publisher(cluster, count=2000, rate=0)
    published = pub.join()
    wait_for(lambda: idle(agent, published), timeout=60, interval=0.1, what="all delivered")
    for i in range(3):
        js.kill(i)
    for i in range(3):
        js.restart(i)
    js.wait_leader()
    exactly_once(js, published)


def test_a_cloud_team_reads_the_stream_with_a_plain_nats_client_as_documented(
        cluster: Cluster, js: JetStreamCluster, tmp_path: Path):
    import subprocess
    import sys

    import orjson

    replicas(cluster, js, 1)
    agent = cluster.agent(nodes=["aws-1"])
    pub = Publisher(cluster, count=300, rate=0)
    published = pub.join()
    wait_for(lambda: idle(agent, published), timeout=60, interval=0.1, what="all delivered")
    # docs/consuming.md, literally: generate the module from the published schema, then run
    # the example reader with nothing of the bridge's code on its path.
    root = Path(__file__).resolve().parents[3]
    gen = tmp_path / "gen"
    gen.mkdir()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc",
                    f"-I{root / 'protos/bridge/v1'}", f"--python_out={gen}",
                    str(root / "protos/bridge/v1/bridge.proto")], check=True, timeout=60)
    res = subprocess.run([sys.executable, str(root / "examples/read_jetstream.py"),
                          *js.servers, "--subject", "bridge.r.site-a.>"],
                         capture_output=True, text=True, timeout=60, cwd=gen,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(gen)}, check=False)
    assert res.returncode == 0, res.stderr
    lines = [orjson.loads(x) for x in res.stdout.splitlines()]
    assert sorted(x["seq"] for x in lines) == list(range(1, published + 1))
    assert all(x["site"] == "site-a" and x["values"] for x in lines)
    assert [x["stream_seq"] for x in lines] == sorted(x["stream_seq"] for x in lines)


def test_bridge_consume_merges_a_jetstream_cloud_read_directly_with_a_sqlite_cloud(
        cluster: Cluster, js: JetStreamCluster):
    from bridge.cloud import consume

    replicas(cluster, js, 1)
    cluster.ingest("azure")  # the other cloud keeps its SQLite store
    agent = cluster.agent(nodes=["aws-1", "azure"], names=["aws-1", "azure"],
                          uplink_extra="deadline_s = 3.0\n")
    pub = Publisher(cluster, count=4000, rate=1500)
    wait_active(agent, "aws-1")
    wait_for(lambda: pub.progress.acked >= 1500, what="publishing under way")
    cluster.nodes["aws-1"].proc.kill()  # the rest goes to azure
    published = pub.join()
    wait_for(lambda: idle(agent, published), timeout=90, interval=0.1, what="all delivered")
    merger = consume.Merger()
    errors = asyncio.run(consume.read_all(
        targets=[",".join(js.servers), cluster.nodes["azure"].target],
        tls=cluster.pki.consumer(), merger=merger))
    assert not errors
    stream = merger.drain()
    seen = Counter(c.envelope.source_seq for c in stream)
    assert sorted(seen) == list(range(1, published + 1)) and max(seen.values()) == 1
    nodes = Counter(c.node for c in stream)
    assert nodes["jetstream:BRIDGE"] > 0 and nodes["azure"] > 0


async def test_a_subscribe_cursor_seeks_into_a_subject_instead_of_reading_it_all(
        js: JetStreamCluster):
    from bridge.cloud.store.jetstream import JetStreamStore
    from bridge.cloud.store.records import Incoming
    from bridge.cloud.store.subjects import MARK_EVERY
    from bridge.shared.config import JetStreamSettings

    def batch(seqs: range) -> list[Incoming]:
        return [Incoming("site-a", 9, s, pb.Envelope(site_id="site-a", epoch=9,
                                                     seq=s).SerializeToString())
                for s in seqs]

    writer = JetStreamStore(settings=JetStreamSettings(servers=tuple(js.servers)))
    await writer.start()
    # A live lane ahead of a draining backlog (4001..5000, then 1..4000), then in order.
    for lo in (4001, 1, 1001, 2001, 3001, 5001, 6001, 7001):
        assert set(await writer.commit(batch(range(lo, lo + 1000)))) == {"committed"}
    await writer.close()
    reader = JetStreamStore(settings=JetStreamSettings(servers=tuple(js.servers)))
    await reader.start()  # a replica that never served this subject: marks from the checkpoint
    try:
        got = [pb.Envelope.FromString(b).seq async for b, _ in
               reader.read(follow=False, cursors={("site-a", 9): 7990})]
        assert {s for s in got if s > 7990} == set(range(7991, 8001))
        assert len(got) <= MARK_EVERY + 10, "read from the seek mark, not from the start"
        everything = [b async for b, _ in reader.read(follow=False)]
        assert len(everything) == 8000
    finally:
        await reader.close()


async def test_a_large_append_gives_the_event_loop_turns_while_it_publishes(
        js: JetStreamCluster) -> None:
    """nats-py's publish never yields: a replica's other calls and its health checks would
    wait for a whole 1,000-message chunk."""
    from bridge.cloud.store.jetstream import ATOMIC_MAX, YIELD_EVERY

    store = JetStreamStore(settings=JetStreamSettings(servers=tuple(js.servers)))
    await store.start()
    nc = store._client()
    publish, seen = nc.publish, []
    try:
        async with LoopTurns() as turns:

            async def counted(*args: object, **kwargs: object) -> None:  # nats-py's publish
                seen.append(turns.count)
                await publish(*args, **kwargs)  # type: ignore[arg-type]

            nc.publish = counted  # type: ignore[method-assign]
            got = await store.commit([Incoming("site-a", 1, s, pb.Envelope(
                site_id="site-a", epoch=1, seq=s).SerializeToString()) for s in range(1, 1001)])
        assert set(got) == {"committed"}
        assert len(seen) >= ATOMIC_MAX - 1  # the last message of a chunk is its request
        assert YIELD_EVERY <= 200
        assert len(set(seen)) >= (ATOMIC_MAX - 1) // 200, \
            "other tasks ran at least every 200 of the chunk's publishes"
    finally:
        await store.close()


def test_the_store_and_bridge_consume_reach_a_cluster_that_requires_a_client_certificate(
        cluster: Cluster, tmp_path: Path):
    pki = cluster.pki
    server = pki.server()  # the CA's certificate for 127.0.0.1 serves NATS too
    tls_js = JetStreamCluster(tmp_path / "js-tls", tls=(pki.ca, server.cert, server.key))
    tls_js.start()
    try:
        client = pki.consumer()
        servers = [u.replace("nats://", "tls://") for u in tls_js.servers]
        extra = (f'tls_ca = "{pki.ca}"\ntls_cert = "{client.cert}"\n'
                 f'tls_key = "{client.key}"\n')
        proc = localrun.ingest(cluster.workdir, pki, "aws", jetstream=servers, name="aws-tls",
                               store_extra=extra).start()
        cluster.nodes["aws-tls"] = proc
        localrun.wait_healthy(proc.target, pki.consumer())
        ca, cert, key = pki.site("site-a").read()
        stub = pb_grpc.IngestStub(grpc.secure_channel(
            proc.target, grpc.ssl_channel_credentials(ca, key, cert)))
        ack = stub.PushBatch(pb.Batch(batch_id="t", envelopes=[
            pb.Envelope(site_id="site-a", epoch=3, seq=s) for s in (1, 2, 3)]), timeout=20)
        assert [r.disposition for r in ack.results] == [pb.DISPOSITION_COMMITTED] * 3
        # bridge consume reads it straight from the stream with its config's [jetstream].
        cfg = _consumer_toml(tmp_path / "consumer.toml", servers, extra)
        res = subprocess.run(localrun.bridge_argv("consume", "--config", str(cfg)),
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        assert [orjson.loads(x)["seq"] for x in res.stdout.splitlines()] == [1, 2, 3]
        # Without a client certificate the cluster refuses the connection: the replica
        # cannot start and says why in one line; the consumer warns and exits 1.
        bad = localrun.ingest(cluster.workdir, pki, "aws", jetstream=servers, name="aws-nocert",
                              store_extra=f'tls_ca = "{pki.ca}"\n').start()
        assert bad.proc.wait(30) == 2
        assert "ingest cannot start: cannot connect to JetStream" in bad.proc.tail()
        bare = _consumer_toml(tmp_path / "bare.toml", servers, f'tls_ca = "{pki.ca}"\n')
        res = subprocess.run(localrun.bridge_argv("consume", "--config", str(bare)),
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 1 and "its readings are not in this output" in res.stderr
    finally:
        tls_js.stop()


def test_a_replica_cut_off_from_its_cluster_says_not_serving_until_it_is_back(
        cluster: Cluster, js: JetStreamCluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    probe_port, http_port = localrun.free_port(), localrun.free_port()
    (rep,) = replicas(cluster, js, 1, extra=f'[health]\nlisten = "127.0.0.1:{probe_port}"\n'
                      f'[metrics]\nlisten = "127.0.0.1:{http_port}"\n')

    def http(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    ca, cert, key = cluster.pki.consumer().read()
    health = health_pb2_grpc.HealthStub(grpc.secure_channel(
        rep.target, grpc.ssl_channel_credentials(ca, key, cert)))
    # The kubelet's view: plaintext, no certificate, on the health port only.
    probe = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{probe_port}"))

    def status(stub: health_pb2_grpc.HealthStub = health, service: str = "bridge.v1.Ingest"
               ) -> int:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status

    assert status() == health_pb2.HealthCheckResponse.SERVING
    assert status(probe) == health_pb2.HealthCheckResponse.SERVING
    for i in range(3):
        js.kill(i)
    wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30,
             what="NOT_SERVING once the cluster is gone (agents move on at their next probe)")
    # Readiness (the service) follows the store; liveness (the server) does not: restarting
    # the pod would not bring NATS back.
    assert status(probe) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status(probe, "") == health_pb2.HealthCheckResponse.SERVING
    # The HTTP probes say the same: not ready (with the reason), still live.
    assert http("/readyz") == (503, b"the store's connection is lost\n")
    assert http("/healthz") == (200, b"ok\n")
    for i in range(3):
        js.restart(i)
    wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, timeout=60,
             what="SERVING again once reconnected")
    assert http("/readyz") == (200, b"ready\n")


def test_a_foreign_message_on_a_subject_is_skipped_not_a_wedge(cluster: Cluster,
                                                                js: JetStreamCluster):
    async def intrude() -> None:
        nc = await nats.connect(servers=js.servers)
        jsc = nc.jetstream()
        await jsc.add_stream(name="BRIDGE", subjects=["bridge.r.>"], num_replicas=3)
        await jsc.publish(f"bridge.r.site-a.{7:016x}", b"not an envelope, no headers")
        await nc.close()

    asyncio.run(intrude())
    (rep,) = replicas(cluster, js, 1)
    ca, cert, key = cluster.pki.site("site-a").read()
    stub = pb_grpc.IngestStub(grpc.secure_channel(rep.target,
                                                  grpc.ssl_channel_credentials(ca, key, cert)))
    ack = stub.PushBatch(pb.Batch(batch_id="x", envelopes=[
        pb.Envelope(site_id="site-a", epoch=7, seq=s) for s in (1, 2)]), timeout=20)
    assert [r.disposition for r in ack.results] == [pb.DISPOSITION_COMMITTED] * 2
    from bridge.cloud import consume

    merger = consume.Merger()
    assert not asyncio.run(consume.read_all(targets=[rep.target], tls=cluster.pki.consumer(),
                                            merger=merger))
    assert [c.envelope.seq for c in merger.drain()] == [1, 2]
    assert '"jetstream.foreign_message"' in rep.proc.log.read_text()


def _consumer_toml(path: Path, servers: list[str], jetstream: str) -> Path:
    path.write_text(f'from = ["{",".join(servers)}"]\n[jetstream]\n{jetstream}')
    return path


def test_bridge_consume_reads_the_stream_its_config_names_without_a_consumer_certificate(
        cluster: Cluster, js: JetStreamCluster, tmp_path: Path):
    replicas(cluster, js, 1, extra="")  # the default stream must not be the one read
    proc = localrun.ingest(cluster.workdir, cluster.pki, "gcp", jetstream=js.servers,
                           name="gcp-1", store_extra='stream = "PLANT"\n'
                           'subject_prefix = "plant.r"\n').start()
    cluster.nodes["gcp-1"] = proc
    localrun.wait_healthy(proc.target, cluster.pki.consumer())
    agent = cluster.agent(nodes=["gcp-1"], names=["gcp"])
    published = Publisher(cluster, count=300, rate=0).join()
    wait_for(lambda: idle(agent, published), timeout=60, what="all delivered")
    cfg = _consumer_toml(tmp_path / "consumer.toml", js.servers,
                         'stream = "PLANT"\nsubject_prefix = "plant.r"\n')
    res = subprocess.run(localrun.bridge_argv("consume", "--config", str(cfg)),
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == published
    # The same command line without the config: the default stream (BRIDGE) holds nothing
    # of this cloud, and no consumer certificate is asked for.
    res = subprocess.run(localrun.bridge_argv("consume", "--from", ",".join(js.servers)),
                         capture_output=True, text=True, timeout=60, check=False)
    assert "consumer certificate" not in res.stderr
    assert res.stdout == ""


def test_a_cluster_whose_port_was_taken_starts_on_fresh_ports_and_leaks_no_process(
        tmp_path: Path) -> None:
    import socket
    c = JetStreamCluster(tmp_path / "js")
    taken = c.nodes[1].http_port
    with socket.socket() as squatter:  # another process takes a port between pick and bind
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            c.start()
            first = c.nodes[1]
            assert first.http_port != taken
            assert first.proc is not None and first.proc.alive()
            assert "address already in use" in first.log.read_text()
        finally:
            c.stop()
    assert all(n.proc is None or not n.proc.alive() for n in c.nodes)


def test_a_cluster_that_cannot_start_stops_every_node_it_started(tmp_path: Path) -> None:
    import socket
    c = JetStreamCluster(tmp_path / "js")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", c.nodes[0].http_port))
        squatter.listen()
        with pytest.raises(RuntimeError, match="exited at start-up"):
            c.start(attempts=1)
    assert all(n.proc is not None and not n.proc.alive() for n in c.nodes)

"""The ingest node with real mTLS: who may push, who may read, and what is stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bridge.cloud.ingest.server import IngestNode
from bridge.shared import pki
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.config import TlsConfig, load_ingest
from bridge.shared.errors import ConfigError
from devkit import localrun


@pytest.fixture
async def node(tmp_path: Path, pkis: localrun.Pki) -> AsyncIterator[IngestNode]:
    n = IngestNode(node="aws", listen="127.0.0.1:0", tls=pkis.server(),
                   store_path=tmp_path / "store.db")
    await n.start()
    yield n
    await n.stop(grace=0.1)


def stub(node: IngestNode, tls: TlsConfig) -> tuple[grpc.aio.Channel, pb_grpc.IngestStub]:
    ca, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    ch = grpc.aio.secure_channel(f"127.0.0.1:{node.port}", creds)
    return ch, pb_grpc.IngestStub(ch)


def batch(site: str, seqs: list[int], epoch: int = 42) -> pb.Batch:
    return pb.Batch(batch_id="b1", envelopes=[pb.Envelope(site_id=site, epoch=epoch, seq=s)
                                              for s in seqs])


async def test_a_site_pushes_its_own_readings_and_duplicates_are_acknowledged_as_such(
        node: IngestNode, pkis: localrun.Pki):
    ch, s = stub(node, pkis.site("site-a"))
    async with ch:
        ack = await s.PushBatch(batch("site-a", [1, 2, 3]), timeout=5)
        assert [r.disposition for r in ack.results] == [pb.DISPOSITION_COMMITTED] * 3
        ack = await s.PushBatch(batch("site-a", [3, 4]), timeout=5)
        assert [r.disposition for r in ack.results] == [pb.DISPOSITION_DUPLICATE,
                                                        pb.DISPOSITION_COMMITTED]
        assert [(w.site_id, w.committed_through) for w in ack.watermarks] == [("site-a", 4)]
        ack = await s.PushBatch(batch("site-a", [0]), timeout=5)
        assert ack.results[0].disposition == pb.DISPOSITION_REJECTED


async def test_a_site_pushing_another_sites_readings_is_denied_and_nothing_is_stored(
        node: IngestNode, pkis: localrun.Pki):
    ch, s = stub(node, pkis.site("site-a"))
    async with ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.PushBatch(pb.Batch(batch_id="x", envelopes=[
                pb.Envelope(site_id="site-a", epoch=1, seq=1),
                pb.Envelope(site_id="site-b", epoch=1, seq=1)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "site-b" in (info.value.details() or "")
    assert node.backend.ledger.streams == {}
    assert node.metrics.denied.labels("site_mismatch")._value.get() == 1


async def test_a_consumer_certificate_may_read_but_not_push(node: IngestNode,
                                                            pkis: localrun.Pki):
    ch, s = stub(node, pkis.consumer())
    async with ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.PushBatch(batch("consumer", [1]), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = await s.Status(pb.StatusRequest(), timeout=5)
        assert reply.node == "aws"


async def test_a_site_certificate_may_not_read_the_stream(node: IngestNode, pkis: localrun.Pki):
    ch, s = stub(node, pkis.site("site-a"))
    async with ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in s.Subscribe(pb.SubscribeRequest(), timeout=5):
                pass
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_clients_without_a_certificate_or_from_another_ca_cannot_connect(
        node: IngestNode, pkis: localrun.Pki, tmp_path: Path):
    ca, _, _ = pkis.server().read()
    no_cert = grpc.aio.secure_channel(f"127.0.0.1:{node.port}",
                                      grpc.ssl_channel_credentials(root_certificates=ca))
    rogue = tmp_path / "rogue"
    pki.create_ca(rogue)
    pki.issue_site(rogue, rogue, site_id="site-a")
    rogue_tls = TlsConfig(ca=pkis.ca, cert=rogue / "site-site-a.pem", key=rogue / "site-site-a.key")
    r_ca, r_cert, r_key = rogue_tls.read()
    foreign = grpc.aio.secure_channel(f"127.0.0.1:{node.port}", grpc.ssl_channel_credentials(
        root_certificates=r_ca, private_key=r_key, certificate_chain=r_cert))
    for ch in (no_cert, foreign):
        async with ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.IngestStub(ch).PushBatch(batch("site-a", [1]), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert node.backend.ledger.streams == {}


async def test_subscribe_resumes_from_per_site_cursors_and_follows_new_commits(
        node: IngestNode, pkis: localrun.Pki):
    site_ch, site = stub(node, pkis.site("site-a"))
    cons_ch, cons = stub(node, pkis.consumer())
    async with site_ch, cons_ch:
        await site.PushBatch(batch("site-a", [1, 2, 3]), timeout=5)
        req = pb.SubscribeRequest(follow=True, cursors=[pb.Cursor(site_id="site-a", epoch=42,
                                                                  after_seq=1)])
        call = cons.Subscribe(req, timeout=10)
        got = [(await call.read()).envelope.seq for _ in range(2)]
        assert got == [2, 3]
        await site.PushBatch(batch("site-a", [4]), timeout=5)
        nxt = await asyncio.wait_for(call.read(), 5)
        assert nxt.envelope.seq == 4 and nxt.node == "aws"
        call.cancel()


def test_the_plaintext_health_port_answers_health_checks_and_nothing_else(
        tmp_path: Path, pkis: localrun.Pki) -> None:
    probe_port = localrun.free_port()
    node = localrun.ingest(tmp_path, pkis, "aws",
                           extra=f'[health]\nlisten = "127.0.0.1:{probe_port}"\n').start()
    try:
        localrun.wait_healthy(node.target, pkis.consumer())
        with grpc.insecure_channel(f"127.0.0.1:{probe_port}") as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="bridge.v1.Ingest"), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.IngestStub(ch).PushBatch(pb.Batch(batch_id="x"), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        node.proc.stop()


def test_the_health_port_may_not_be_the_grpc_port(tmp_path: Path) -> None:
    cfg = tmp_path / "ingest.toml"
    cfg.write_text('node = "aws"\nlisten = "0.0.0.0:6443"\n[store]\npath = "s.db"\n'
                   '[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n'
                   '[health]\nlisten = "0.0.0.0:6443"\n')
    cfg.chmod(0o600)
    with pytest.raises(ConfigError, match=r"health\.listen: must not share the port"):
        load_ingest(cfg)


async def test_every_call_is_counted_by_method_and_code_and_per_site_progress_is_exported(
        node: IngestNode, pkis: localrun.Pki):
    from prometheus_client import generate_latest

    ch, s = stub(node, pkis.site("site-a"))
    async with ch:
        await s.PushBatch(batch("site-a", [1, 2, 3]), timeout=5)
        await s.PushBatch(batch("site-a", [4]), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await s.Status(pb.StatusRequest(), timeout=5)  # a site may not read
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    text = generate_latest(node.metrics.registry).decode()
    assert 'bridge_ingest_requests_total{code="OK",method="PushBatch"} 2.0' in text
    assert 'bridge_ingest_requests_total{code="PERMISSION_DENIED",method="Status"} 1.0' in text
    assert 'bridge_ingest_requests_in_flight{method="PushBatch"} 0.0' in text
    assert 'bridge_ingest_site_committed_through{site="site-a"} 4.0' in text
    assert 'bridge_ingest_site_epochs{site="site-a"} 1.0' in text
    assert "bridge_ingest_site_last_commit_timestamp_seconds{site=\"site-a\"}" in text
    assert "Check" not in text  # health checks are not requests
    assert 'bridge_cert_expiry_seconds{cert="server",subject=' in text
    assert "_created" not in text
    assert "process_cpu_seconds_total" in text

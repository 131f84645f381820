"""The NATS cluster as shipped (deploy/kubernetes/base/nats), run here as three real
nats-server processes: clients and routes need TLS and a certificate of the cluster's CA,
the ingest user can run the real JetStream store, the reader user can only read."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import re
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.cloud.store.jetstream import JetStreamStore
from bridge.cloud.store.records import Incoming
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.config import JetStreamSettings
from bridge.shared.telemetry import IngestMetrics
from devkit.jscluster import nats_server
from devkit.localrun import Proc, bridge_argv, free_port, wait_port
from tests.conftest import wait_for
from tests.deploy import kustomize

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def _write(out: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
           ) -> None:
    (out / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (out / f"{stem}.key").chmod(0o600)


def make_pki(out: Path) -> None:
    """The cluster's CA; a server certificate (server and client usage, as routes need);
    the users' client certificates, and a stranger's of the same CA."""
    out.mkdir(parents=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(out, "ca", ca, ca_key)

    def leaf(stem: str, cn: str, usages: list[x509.ObjectIdentifier], server: bool = False
             ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if server else [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "bridge-nats"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        b = (x509.CertificateBuilder().subject_name(x509.Name(name)).issuer_name(ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=2))
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        _write(out, stem, b.sign(ca_key, hashes.SHA256()), key)

    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    leaf("server", "nats", both, server=True)
    for user in ("nats-ingest", "nats-reader", "nats-stranger"):
        leaf(user, user, [ExtendedKeyUsageOID.CLIENT_AUTH])


def shipped_conf() -> str:
    """nats.conf exactly as the aws overlay renders it."""
    (cm,) = [o for o in kustomize.render(K8S / "overlays" / "aws")
             if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "nats"]
    return str(cm["data"]["nats.conf"])


@dataclass
class Server:
    name: str
    port: int
    route: int
    http: int
    proc: Proc | None = None


@dataclass
class ShippedCluster:
    pki: Path
    servers: list[Server]

    @property
    def urls(self) -> list[str]:
        return [f"tls://localhost:{s.port}" for s in self.servers]

    def settings(self, user: str, **kw: object) -> JetStreamSettings:
        return JetStreamSettings(servers=tuple(self.urls), tls_ca=str(self.pki / "ca.crt"),
                                 tls_cert=str(self.pki / f"{user}.crt"),
                                 tls_key=str(self.pki / f"{user}.key"), **kw)  # type: ignore[arg-type]

    def varz(self, i: int = 0) -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.servers[i].http}/varz",
                                    timeout=2) as resp:
            doc: dict[str, object] = json.loads(resp.read())
        return doc


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedCluster]:
    work = tmp_path_factory.mktemp("nats-shipped")
    make_pki(work / "pki")
    exe, conf = nats_server(), shipped_conf()
    servers = [Server(name=f"nats-{i}", port=free_port(), route=free_port(), http=free_port())
               for i in range(3)]
    for s in servers:
        text = conf.replace("/etc/nats-tls/tls.crt", str(work / "pki" / "server.crt")) \
            .replace("/etc/nats-tls/tls.key", str(work / "pki" / "server.key")) \
            .replace("/etc/nats-tls/ca.crt", str(work / "pki" / "ca.crt")) \
            .replace("/data", str(work / s.name)).replace("/var/run/nats", str(work / s.name)) \
            .replace("port: 4222", f"port: {s.port}").replace("http_port: 8222",
                                                            f"http_port: {s.http}") \
            .replace("port: 6222", f"port: {s.route}")
        for i, peer in enumerate(servers):  # the route names resolve to this machine
            text = text.replace(f"nats://nats-{i}.nats.bridge.svc:6222",
                                f"nats://localhost:{peer.route}")
        assert "/etc/" not in text and ".svc" not in text, text
        path = work / f"{s.name}.conf"
        path.write_text(text)
        (work / s.name).mkdir()
        s.proc = Proc(name=s.name, argv=[exe, "-c", str(path)], log=work / f"{s.name}.log")
    for s in servers:  # POD_NAME names each server, as the StatefulSet's env does
        assert s.proc is not None
        s.proc.log.parent.mkdir(parents=True, exist_ok=True)
        with s.proc.log.open("ab") as out:
            s.proc.popen = subprocess.Popen(s.proc.argv, stdout=out, stderr=subprocess.STDOUT,
                                            env={"POD_NAME": s.name, "PATH": "/usr/bin"})
    cluster = ShippedCluster(pki=work / "pki", servers=servers)
    try:
        for s in servers:
            wait_port(s.port)
        wait_for(lambda: all(_routes(s) == {x.name for x in servers} - {s.name}
                             for s in servers), timeout=30,
                 what="the three servers routed to each other over TLS")
        wait_for(lambda: len(_meta_leaders(servers)) == 1, timeout=60,
                 what="one JetStream meta leader agreed by all three")
        yield cluster
    finally:
        for s in servers:
            if s.proc is not None:
                s.proc.stop()


def _routes(s: Server) -> set[str]:
    """The servers ``s`` has routes to (route pooling opens several to each)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.http}/routez", timeout=2) as resp:
            return {r["remote_name"] for r in json.loads(resp.read()).get("routes") or []}
    except OSError:
        return set()


def _meta_leaders(servers: list[Server]) -> set[str | None]:
    leaders: set[str | None] = set()
    for s in servers:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.http}/jsz", timeout=2) as resp:
                meta = json.loads(resp.read()).get("meta_cluster") or {}
        except OSError:
            return {None, ""}
        leaders.add(meta.get("leader"))
    return leaders if None not in leaders else {None, ""}


async def _connect(cluster: ShippedCluster, user: str | None, *, tls: bool = True) -> object:
    kw: dict[str, object] = {}
    if tls:
        ctx = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
        if user is not None:
            ctx.load_cert_chain(cluster.pki / f"{user}.crt", cluster.pki / f"{user}.key")
        kw["tls"] = ctx
    urls = cluster.urls if tls else [u.replace("tls://", "nats://") for u in cluster.urls]
    return await nats.connect(servers=urls, allow_reconnect=False, connect_timeout=3,
                              max_reconnect_attempts=0, **kw)


@pytest.mark.parametrize("who", ["plain", "no certificate", "nats-stranger"])
def test_a_client_without_a_known_certificate_is_refused(shipped: ShippedCluster, who: str):
    async def attempt() -> None:
        nc = await _connect(shipped, "nats-stranger" if who == "nats-stranger" else None,
                            tls=who != "plain")
        await nc.close()  # type: ignore[attr-defined]

    with pytest.raises(Exception) as err:  # TLS, handshake or authorization: each its own
        asyncio.run(attempt())
    assert not isinstance(err.value, AssertionError)


def test_routes_and_clients_require_tls_with_verified_certificates(shipped: ShippedCluster):
    varz = shipped.varz()
    assert varz["tls_required"] is True and varz["tls_verify"] is True
    cluster = varz["cluster"]
    assert isinstance(cluster, dict)
    assert cluster["tls_required"] is True and cluster["tls_verify"] is True


def test_the_ingest_user_runs_the_store_and_the_reader_only_reads(shipped: ShippedCluster,
                                                                 tmp_path: Path):
    metrics = IngestMetrics()

    async def write() -> list[str]:
        store = JetStreamStore(settings=shipped.settings("nats-ingest"), metrics=metrics)
        await store.start()
        try:
            # The bucket opens (a first try that times out on a loaded machine is retried).
            async with asyncio.timeout(60):
                await store.keeper.ready.wait()
            return await store.commit([Incoming("site-a", 5, s, pb.Envelope(
                site_id="site-a", epoch=5, seq=s).SerializeToString()) for s in range(1, 21)])
        finally:
            await store.close()

    assert set(asyncio.run(write())) == {"committed"}
    # The ingest user may use the checkpoint bucket too (it opened above, and is written).
    written = {s.labels["outcome"]: s.value for m in metrics.checkpoints.collect()
               for s in m.samples if s.name.endswith("_total")}
    assert written.get("written") == 1, written
    # A cloud team's reader, with bridge consume and the documented [jetstream] table.
    cfg = tmp_path / "consumer.toml"
    cfg.write_text(f'from = ["{",".join(shipped.urls)}"]\n[jetstream]\n'
                   f'tls_ca = "{shipped.pki / "ca.crt"}"\n'
                   f'tls_cert = "{shipped.pki / "nats-reader.crt"}"\n'
                   f'tls_key = "{shipped.pki / "nats-reader.key"}"\n')
    res = subprocess.run(bridge_argv("consume", "--config", str(cfg)), capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert [json.loads(x)["seq"] for x in res.stdout.splitlines()] == list(range(1, 21))
    # --status straight from the stream with the reader's account: from the checkpoint the
    # replica wrote, with nothing created or written.
    res = subprocess.run(bridge_argv("consume", "--config", str(cfg), "--status", "--json"),
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    (stream,) = doc["streams"]
    assert stream["merged"]["committed_through"] == 20 and stream["merged"]["gaps"] == []
    assert "checkpoints_disabled" not in res.stderr

    async def write_as_reader() -> list[str]:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        ctx = ssl.create_default_context(cafile=str(shipped.pki / "ca.crt"))
        ctx.load_cert_chain(shipped.pki / "nats-reader.crt", shipped.pki / "nats-reader.key")
        nc = await nats.connect(servers=shipped.urls, tls=ctx, error_cb=on_error)
        js = nc.jetstream()
        for attempt in (js.publish("bridge.r.site-a.0000000000000005", b"x", timeout=2),
                        js.delete_stream("BRIDGE"),  # nor forge a replica's checkpoint:
                        js.publish("$KV.BRIDGE_LEDGER.site-a.0000000000000005", b"x",
                                   timeout=2)):
            with pytest.raises(nats.errors.Error):
                await attempt
        await nc.close()
        return errors

    errors = asyncio.run(write_as_reader())
    assert any(re.search(r"permissions violation for publish to \"bridge\.r\.", e)
               for e in errors), errors
    assert any("$js.api.stream.delete.bridge" in e.lower() for e in errors), errors
    assert any("$kv.bridge_ledger." in e.lower() for e in errors), errors

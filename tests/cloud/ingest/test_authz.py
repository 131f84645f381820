"""The ingest's trust boundary against a real process: identities that are no site id, revoked
consumers on open streams, expired certificates on open channels, unknown fields, huge ids."""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import warnings
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from bridge.cloud.store.subjects import subject_token
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.config import SITE_ID_RE, TlsConfig
from devkit import localrun
from tests.conftest import metric_value, wait_for


def forge(pkis: localrun.Pki, out: Path, cn: str, *, role: str = "bridge-site",
          seconds: float = 86400.0) -> TlsConfig:
    """A certificate our CA signs for any CN (no SAN), as a careless or hostile issuer might."""
    ca_key = serialization.load_pem_private_key((pkis.dir / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate(pkis.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    with warnings.catch_warnings():  # a CN past 64 characters is the point here
        warnings.simplefilter("ignore", UserWarning)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)])
    cert = (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(seconds=seconds))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    stem = f"forged-{abs(hash(cn))}"
    (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp = out / f"{stem}.key"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    kp.chmod(0o600)
    return TlsConfig(ca=pkis.ca, cert=out / f"{stem}.pem", key=kp)


def stub(target: str, tls: TlsConfig) -> pb_grpc.IngestStub:
    ca, cert, key = tls.read()
    return pb_grpc.IngestStub(grpc.secure_channel(
        target, grpc.ssl_channel_credentials(ca, key, cert)))


def reading(site: str, seq: int, epoch: int = 7) -> pb.Envelope:
    return pb.Envelope(site_id=site, epoch=epoch, seq=seq,
                       values=[pb.Value(signal="v", number=1.0)])


def metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


@pytest.fixture
def node(tmp_path: Path, pkis: localrun.Pki):
    port = localrun.free_port()
    deny = tmp_path / "revoked.txt"
    deny.write_text("")
    n = localrun.ingest(tmp_path, pkis, "aws", extra=f'[revocation]\ndeny_list = "{deny}"\n'
                        f'[metrics]\nlisten = "127.0.0.1:{port}"\n').start()
    localrun.wait_healthy(n.target, pkis.consumer())
    n.metrics_port = port  # type: ignore[attr-defined]
    n.deny = deny  # type: ignore[attr-defined]
    yield n
    n.proc.stop()


BAD_IDS = ["site/a", "..", "sïte-a", "s" * 121, "site.*", "site_a", "Site-A", "-site"]


def test_a_certificate_that_names_no_valid_site_is_refused_and_stores_nothing(
        node: localrun.IngestProc, pkis: localrun.Pki, tmp_path: Path):
    for cn in BAD_IDS:
        client = stub(node.target, forge(pkis, tmp_path / "forged", cn))
        with pytest.raises(grpc.RpcError) as err:
            client.PushBatch(pb.Batch(batch_id="b", envelopes=[reading(cn, 1)]), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, cn
        assert "not a valid site id" in (err.value.details() or ""), cn
    text = metrics(node.metrics_port)  # type: ignore[attr-defined]
    assert metric_value(text, 'bridge_ingest_denied_total{reason="invalid_identity"}') == \
        len(BAD_IDS)
    assert "site_a" not in text and "sïte" not in text  # never a metric label
    status = stub(node.target, pkis.consumer()).Status(pb.StatusRequest(), timeout=10)
    assert list(status.streams) == []


def test_a_consumer_name_that_is_no_valid_id_cannot_read(
        node: localrun.IngestProc, pkis: localrun.Pki, tmp_path: Path):
    client = stub(node.target, forge(pkis, tmp_path / "forged", "team/a",
                                     role="bridge-consumer"))
    with pytest.raises(grpc.RpcError) as err:
        client.Status(pb.StatusRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not a valid consumer name" in (err.value.details() or "")


def test_the_site_to_subject_mapping_cannot_collide():
    assert subject_token("site.a") == "site_a"
    with pytest.raises(ValueError, match="not a site id"):
        subject_token("site_a")  # would have shared site.a's subject and ledger


@given(st.from_regex(SITE_ID_RE, fullmatch=True).filter(lambda s: len(s) <= 64),
       st.from_regex(SITE_ID_RE, fullmatch=True).filter(lambda s: len(s) <= 64))
def test_two_valid_site_ids_never_share_a_subject(a: str, b: str):
    if a != b:
        assert subject_token(a) != subject_token(b)
    assert subject_token(a).replace("_", ".") == a


def test_a_revoked_consumers_open_stream_ends_with_permission_denied(
        node: localrun.IngestProc, pkis: localrun.Pki):
    site = stub(node.target, pkis.site("site-a"))
    site.PushBatch(pb.Batch(batch_id="b1", envelopes=[reading("site-a", 1)]), timeout=10)
    stream = stub(node.target, pkis.consumer()).Subscribe(pb.SubscribeRequest(follow=True),
                                                         timeout=120)
    seen: list[int] = []
    ended: list[grpc.RpcError] = []

    def read() -> None:
        try:
            for c in stream:
                seen.append(c.envelope.seq)
        except grpc.RpcError as exc:
            ended.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_for(lambda: seen == [1], what="the first reading on the open stream")
    subprocess.run(localrun.bridge_argv("pki", "revoke", "--deny-list",
                                        str(node.deny),  # type: ignore[attr-defined]
                                        str(pkis.consumer().cert)),
                   check=True, capture_output=True, timeout=30)
    wait_for(lambda: bool(ended), timeout=10, what="the revoked stream to end")
    assert ended[0].code() == grpc.StatusCode.PERMISSION_DENIED
    assert "is revoked (stream ended)" in (ended[0].details() or "")
    # Pushed after the stream ended: never seen by the revoked consumer.
    site.PushBatch(pb.Batch(batch_id="b2", envelopes=[reading("site-a", 2)]), timeout=10)
    reader.join(10)
    assert seen == [1]


def test_an_expired_site_certificate_cannot_push_on_its_open_channel(
        node: localrun.IngestProc, pkis: localrun.Pki, tmp_path: Path):
    client = stub(node.target, forge(pkis, tmp_path / "short", "site-a", seconds=3))
    ack = client.PushBatch(pb.Batch(batch_id="b", envelopes=[reading("site-a", 1)]),
                           timeout=10)
    assert ack.results[0].disposition == pb.DISPOSITION_COMMITTED
    refused: list[grpc.RpcError] = []
    seq = [1]

    def push_refused() -> bool:
        seq[0] += 1
        try:
            client.PushBatch(pb.Batch(batch_id="b", envelopes=[reading("site-a", seq[0])]),
                             timeout=10)
        except grpc.RpcError as exc:
            refused.append(exc)
            return True
        return False

    # The channel stays open (keepalive): only a per-call check can see the expiry.
    wait_for(push_refused, timeout=20, interval=0.5, what="the expired certificate refused")
    assert refused[0].code() == grpc.StatusCode.PERMISSION_DENIED
    assert "has expired" in (refused[0].details() or "")


def test_unknown_fields_are_not_stored_and_a_huge_batch_id_is_refused(
        node: localrun.IngestProc, pkis: localrun.Pki):
    site = stub(node.target, pkis.site("site-a"))
    clean = reading("site-a", 1)
    # Field 1007, varint 1: a field this version does not know.
    tagged = pb.Envelope.FromString(clean.SerializeToString() + b"\xf8\x3e\x01")
    assert tagged.SerializeToString() != clean.SerializeToString()
    site.PushBatch(pb.Batch(batch_id="b", envelopes=[tagged]), timeout=10)
    got = list(stub(node.target, pkis.consumer()).Subscribe(pb.SubscribeRequest(),
                                                            timeout=10))
    assert [c.envelope.SerializeToString() for c in got] == [clean.SerializeToString()]
    with pytest.raises(grpc.RpcError) as err:
        site.PushBatch(pb.Batch(batch_id="x" * (1 << 20), envelopes=[reading("site-a", 2)]),
                       timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 128" in (err.value.details() or "")
    log = node.proc.log.read_text()
    assert "x" * 200 not in log  # never a 1 MiB log line

"""bridge.shared.certinfo reads the subject CN and notAfter that cryptography reads, without it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.shared import certinfo
from devkit import localrun


def _cert(cn: str, not_after: dt.datetime) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
            .not_valid_after(not_after).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_the_project_certificates_read_as_cryptography_reads_them(pkis: localrun.Pki) -> None:
    files = [pkis.ca, pkis.site("site-a").cert, pkis.server().cert, pkis.consumer().cert]
    for path in files:
        pem = Path(path).read_bytes()
        want = [(c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
                 c.not_valid_after_utc.timestamp())
                for c in x509.load_pem_x509_certificates(pem)]
        assert certinfo.read_pem(pem) == want, path


def test_the_serial_reads_as_cryptography_reads_it(pkis: localrun.Pki) -> None:
    for path in [pkis.ca, pkis.site("site-a").cert, pkis.server().cert]:
        pem = Path(path).read_bytes()
        assert certinfo.serial_pem(pem) == x509.load_pem_x509_certificate(pem).serial_number
    with pytest.raises(ValueError, match="no PEM certificate"):
        certinfo.serial_pem(b"not a certificate")


@pytest.mark.parametrize("when", [dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
                                  dt.datetime(2050, 1, 1, tzinfo=dt.UTC),  # GeneralizedTime
                                  dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)])
def test_both_time_encodings_and_the_extremes(when: dt.datetime) -> None:
    assert certinfo.read_pem(_cert("x", when)) == [("x", when.timestamp())]


def test_a_ca_file_with_several_certificates_yields_each() -> None:
    a = _cert("a", dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    b = _cert("b", dt.datetime(2031, 1, 1, tzinfo=dt.UTC))
    assert [cn for cn, _ in certinfo.read_pem(a + b)] == ["a", "b"]


@pytest.mark.parametrize("pem", [b"", b"not a cert",
                                 b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
                                 b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----"])
def test_anything_else_is_a_value_error(pem: bytes) -> None:
    with pytest.raises(ValueError):
        certinfo.read_pem(pem)


def test_truncated_certificates_are_value_errors_not_crashes() -> None:
    import base64
    import re

    pem = _cert("x", dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    der = base64.b64decode(b"".join(re.findall(rb"^[A-Za-z0-9+/=]+$", pem, re.M)))
    for n in range(0, len(der), 7):
        with pytest.raises(ValueError):
            certinfo.read(der[:n])


def test_an_unreadable_certificate_is_a_metric_and_one_warning_not_one_per_scrape(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from prometheus_client import CollectorRegistry, generate_latest

    from bridge.shared.telemetry import CertExpiry

    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    reg = CollectorRegistry()
    reg.register(CertExpiry(files={"client": bad}))
    log = logging.getLogger("bridge")
    propagate, log.propagate = log.propagate, True
    try:
        with caplog.at_level(logging.WARNING, logger="bridge"):
            for _ in range(3):
                text = generate_latest(reg).decode()
    finally:
        log.propagate = propagate
    assert 'bridge_cert_unreadable{cert="client"} 1.0' in text
    assert "bridge_cert_expiry_seconds{" not in text
    assert [r.getMessage() for r in caplog.records].count("telemetry.cert_unreadable") == 1

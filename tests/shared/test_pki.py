from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from bridge.shared import pki

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_ca_and_site_certificates_carry_the_site_identity_in_cn_and_san(tmp_path: Path):
    pki.create_ca(tmp_path)
    issued = pki.issue_site(tmp_path, tmp_path, site_id="substation-7")
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["substation-7"]
    ident = pki.identity_from_pem(issued.cert_path.read_bytes())
    assert (ident.name, ident.role) == ("substation-7", pki.ROLE_SITE)
    assert ident.serial == cert.serial_number
    assert ident.fingerprint == cert.fingerprint(hashes.SHA256()).hex()


def test_keys_are_written_readable_by_the_owner_only(tmp_path: Path):
    ca = pki.create_ca(tmp_path)
    site = pki.issue_site(tmp_path, tmp_path, site_id="s1")
    for key in (ca.key_path, site.key_path):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_existing_files_are_not_overwritten_without_force(tmp_path: Path):
    pki.create_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.create_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    pki.create_ca(tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before


def test_server_certificates_carry_dns_and_ip_names(tmp_path: Path):
    pki.create_ca(tmp_path)
    issued = pki.issue_server(tmp_path, tmp_path, name="ingest", dns=["ingest.example"],
                              ips=["10.0.0.5"])
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ingest.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


@pytest.mark.parametrize("bad", ["Site_A", "-x", "a b", "", "x" * 64])
def test_site_ids_that_cannot_be_dns_names_are_refused(tmp_path: Path, bad: str):
    pki.create_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="DNS-style"):
        pki.issue_site(tmp_path, tmp_path, site_id=bad)


def test_issuing_without_a_ca_says_how_to_create_one(tmp_path: Path):
    with pytest.raises(pki.PkiError, match="bridge pki ca"):
        pki.issue_site(tmp_path, tmp_path, site_id="s1")


def test_revoke_appends_serial_and_fingerprint_that_the_deny_list_reads(tmp_path: Path):
    from bridge.cloud.ingest.denylist import parse

    pki.create_ca(tmp_path)
    site = pki.issue_site(tmp_path, tmp_path, site_id="s1")
    deny = tmp_path / "deny" / "revoked.txt"
    pki.revoke(deny, [site.cert_path], serials=[])
    pki.revoke(deny, [], serials=["0xAB:CD"])
    ident = pki.identity_from_pem(site.cert_path.read_bytes())
    entries = parse(deny.read_text(), source=str(deny))
    assert entries.serials == {ident.serial, 0xABCD}
    assert entries.fingerprints == {ident.fingerprint}
    assert "CN=s1" in deny.read_text()


def test_revoke_refuses_what_is_not_a_certificate_or_a_serial(tmp_path: Path):
    deny = tmp_path / "revoked.txt"
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(pki.PkiError, match=r"junk\.pem: not a readable PEM certificate"):
        pki.revoke(deny, [tmp_path / "junk.pem"], serials=[])
    with pytest.raises(pki.PkiError, match=r"--serial 'xyz': not a hex serial number"):
        pki.revoke(deny, [], serials=["xyz"])
    assert not deny.exists()


def test_a_site_renews_through_a_csr_and_its_key_never_leaves_the_gateway(tmp_path: Path):
    ca, gateway, out = tmp_path / "ca", tmp_path / "gateway", tmp_path / "signed"
    pki.create_ca(ca)
    csr, key = pki.site_csr(gateway, site_id="substation-7")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    issued = pki.sign_site(ca, csr, out, site_id="substation-7")
    assert issued.key_path is None and sorted(p.name for p in out.iterdir()) == [
        "site-substation-7.pem"]
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert cert.public_key().public_bytes(*_SPKI) == private.public_key().public_bytes(*_SPKI)
    ident = pki.identity_from_pem(issued.cert_path.read_bytes())
    assert (ident.name, ident.role) == ("substation-7", pki.ROLE_SITE)
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca_cert)


def test_signing_refuses_another_site_a_forged_request_and_a_bad_name(tmp_path: Path):
    ca, gateway = tmp_path / "ca", tmp_path / "gateway"
    pki.create_ca(ca)
    csr, _ = pki.site_csr(gateway, site_id="substation-7")
    with pytest.raises(pki.PkiError, match="is for 'substation-7', not site 'substation-8'"):
        pki.sign_site(ca, csr, tmp_path, site_id="substation-8")
    # A request whose bytes were altered after signing does not verify.
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1())
    good = x509.load_pem_x509_csr(csr.read_bytes())
    forged = (x509.CertificateSigningRequestBuilder().subject_name(good.subject)
              .sign(other, hashes.SHA256()))
    der = bytearray(forged.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0xFF  # the signature's last byte
    bad = tmp_path / "forged.csr"
    bad.write_bytes(x509.load_der_x509_csr(bytes(der)).public_bytes(
        serialization.Encoding.PEM))
    with pytest.raises(pki.PkiError, match="signature does not verify"):
        pki.sign_site(ca, bad, tmp_path)
    with pytest.raises(pki.PkiError, match="must be a DNS-style name"):
        pki.site_csr(gateway, site_id="Bad Site")
    (tmp_path / "junk.csr").write_text("junk")
    with pytest.raises(pki.PkiError, match="not a readable PEM certificate request"):
        pki.sign_site(ca, tmp_path / "junk.csr", tmp_path)


def test_the_cli_renews_a_site_through_csr_and_sign(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]):
    from bridge import cli

    ca, gateway = tmp_path / "ca", tmp_path / "gateway"
    pki.create_ca(ca)
    with pytest.raises(SystemExit) as done:
        cli.main(["pki", "csr", "--site", "s1", "--out", str(gateway)])
    assert done.value.code == 0
    assert "stays on this gateway" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["pki", "sign", "--dir", str(ca), "--csr", str(gateway / "site-s1.csr"),
                  "--site", "s1", "--out", str(gateway)])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"certificate {gateway / 'site-s1.pem'}" in out and "key " not in out
    with pytest.raises(SystemExit) as done:
        cli.main(["pki", "sign", "--dir", str(ca), "--csr", str(gateway / "site-s1.csr"),
                  "--out", str(gateway)])
    assert done.value.code == 2
    assert "refusing to overwrite" in capsys.readouterr().err

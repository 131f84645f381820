from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from bridge import pki


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
    from bridge.ingest.denylist import parse

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

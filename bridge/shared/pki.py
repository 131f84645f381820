"""Certificates for the bridge: one CA, ingest server certificates, site and consumer certificates.

Identity rules (what the ingest checks, see ``bridge.cloud.ingest.server``):

* a **site** certificate has CN = site id, a DNS SAN = site id and OU = ``bridge-site``; it may
  push readings only for that site id;
* a **consumer** certificate has CN = consumer name and OU = ``bridge-consumer``; it may read
  (``Subscribe``, ``Status``) but never push;
* a **server** certificate carries the DNS and IP SANs the agents dial, with serverAuth EKU.

Keys are EC P-256, written with mode 0600; nothing is overwritten unless ``force`` is set.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.shared.certinfo import ROLE_CONSUMER, ROLE_SERVER, ROLE_SITE
from bridge.shared.config import SITE_ID_MAX, site_id_problem
from bridge.shared.errors import PkiError


@dataclass(frozen=True, kw_only=True)
class Issued:
    """What was written, for the CLI to print."""

    cert_path: Path
    key_path: Path | None  # None when signed from a CSR (the key stayed where it was made)
    subject: str
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_free(paths: list[Path], *, force: bool) -> None:
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise PkiError(f"refusing to overwrite {', '.join(existing)} (use --force)")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {ca_dir} ({exc.filename} missing): run 'bridge pki ca'") from exc
    except ValueError as exc:
        raise PkiError(f"cannot read the CA in {ca_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: expected an EC private key")
    return cert, key


def _cn(name: str, what: str) -> str:
    """``name`` if it fits a certificate's common name (1 to 64 characters, RFC 5280)."""
    if not 0 < len(name) <= SITE_ID_MAX:
        raise PkiError(f"{what} {name[:20]!r}{'...' if len(name) > 20 else ''} is "
                       f"{len(name)} characters; a certificate's common name holds 1 to "
                       f"{SITE_ID_MAX}")
    return name


def create_ca(ca_dir: Path, *, name: str = "bridge CA", days: int = 3650,
              force: bool = False) -> Issued:
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    _check_free([cert_path, key_path], force=force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _cn(name, "--name"))])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return Issued(cert_path=cert_path, key_path=key_path, subject=subject.rfc4514_string(),
                  not_after=cert.not_valid_after_utc)


def _issue(ca_dir: Path, out_dir: Path, *, stem: str, common_name: str, role: str,
           sans: list[x509.GeneralName], eku: x509.ObjectIdentifier, days: int,
           force: bool, public_key: ec.EllipticCurvePublicKey | None = None) -> Issued:
    """A certificate for a new key (written next to it), or for ``public_key`` (from a CSR:
    the private key stays where it was made)."""
    ca_cert, ca_key = _load_ca(ca_dir)
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    _check_free([cert_path] if public_key is not None else [cert_path, key_path], force=force)
    key = ec.generate_private_key(ec.SECP256R1()) if public_key is None else None
    pub = key.public_key() if key is not None else public_key
    assert pub is not None
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, _cn(common_name, "the name")),
    ])
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    if key is not None:
        _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return Issued(cert_path=cert_path, key_path=key_path if key is not None else None,
                  subject=subject.rfc4514_string(), not_after=cert.not_valid_after_utc)


def issue_server(ca_dir: Path, out_dir: Path, *, name: str, dns: list[str], ips: list[str],
                 days: int = 825, force: bool = False) -> Issued:
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise PkiError(f"--ip {ip!r} is not an IP address") from exc
    if not sans:
        raise PkiError("a server certificate needs at least one --dns or --ip name")
    return _issue(ca_dir, out_dir, stem=f"server-{name}", common_name=name, role=ROLE_SERVER,
                  sans=sans, eku=ExtendedKeyUsageOID.SERVER_AUTH, days=days, force=force)


def issue_site(ca_dir: Path, out_dir: Path, *, site_id: str, days: int = 825,
               force: bool = False) -> Issued:
    return _issue(ca_dir, out_dir, stem=f"site-{_site_id(site_id)}", common_name=site_id,
                  role=ROLE_SITE, sans=[x509.DNSName(site_id)],
                  eku=ExtendedKeyUsageOID.CLIENT_AUTH, days=days, force=force)


def _site_id(site_id: str) -> str:
    if (problem := site_id_problem(site_id)) is not None:
        raise PkiError(f"site id {problem}")
    return site_id


def site_csr(out_dir: Path, *, site_id: str, force: bool = False) -> tuple[Path, Path]:
    """On the gateway: a new key (mode 0600, never leaves it) and a CSR for ``site_id``, for
    ``sign_site`` on the CA host. Returns (csr path, key path)."""
    _site_id(site_id)
    csr_path, key_path = out_dir / f"site-{site_id}.csr", out_dir / f"site-{site_id}.key"
    _check_free([csr_path, key_path], force=force)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([
               x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ROLE_SITE),
               x509.NameAttribute(NameOID.COMMON_NAME, site_id)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(site_id)]), critical=False)
           .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return csr_path, key_path


def sign_site(ca_dir: Path, csr_path: Path, out_dir: Path, *, site_id: str | None = None,
              days: int = 825, force: bool = False) -> Issued:
    """On the CA host: a site certificate for the key in a CSR. Only the CSR's public key and
    common name are taken (the CA sets role, names and usage); ``site_id``, when given, must
    be that common name, so a renewal cannot change a site's identity by accident."""
    try:
        csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{csr_path}: not a readable PEM certificate request ({exc})") from exc
    if not csr.is_signature_valid:
        raise PkiError(f"{csr_path}: the request's signature does not verify")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    if site_id is not None and cn != site_id:
        raise PkiError(f"{csr_path}: the request is for {cn!r}, not site {site_id!r}")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise PkiError(f"{csr_path}: expected an EC key (bridge pki csr makes P-256)")
    return _issue(ca_dir, out_dir, stem=f"site-{_site_id(cn)}", common_name=cn, role=ROLE_SITE,
                  sans=[x509.DNSName(cn)], eku=ExtendedKeyUsageOID.CLIENT_AUTH, days=days,
                  force=force, public_key=pub)


def issue_consumer(ca_dir: Path, out_dir: Path, *, name: str, days: int = 825,
                   force: bool = False) -> Issued:
    if (problem := site_id_problem(name)) is not None:
        raise PkiError(f"consumer name {problem}")
    return _issue(ca_dir, out_dir, stem=f"consumer-{name}", common_name=name,
                  role=ROLE_CONSUMER, sans=[x509.DNSName(name)],
                  eku=ExtendedKeyUsageOID.CLIENT_AUTH, days=days, force=force)


@dataclass(frozen=True, kw_only=True)
class PeerIdentity:
    """Who is on the other end of an mTLS connection, as the ingest sees it."""

    name: str
    role: str
    serial: int = 0
    fingerprint: str = ""  # SHA-256 of the DER, lower-case hex (what a deny-list names)
    not_after: float = math.inf  # Unix time; a channel may outlive it (checked per call)


def identity_from_pem(pem: bytes) -> PeerIdentity:
    """Derive the identity from a verified peer certificate: CN and DNS SAN must agree."""
    cert = x509.load_pem_x509_certificate(pem)
    serial, fingerprint = cert.serial_number, cert.fingerprint(hashes.SHA256()).hex()
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cn = str(cns[0].value) if cns else ""
    role = str(ous[0].value) if ous else ""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    not_after = cert.not_valid_after_utc.timestamp()
    return PeerIdentity(name="" if dns and cn not in dns else cn, role=role, serial=serial,
                        fingerprint=fingerprint, not_after=not_after)


def revoke(deny_list: Path, certs: list[Path], *, serials: list[str]) -> list[str]:
    """Append each certificate's serial and fingerprint (and each bare serial) to the deny-list
    the ingest reloads (``bridge.cloud.ingest.denylist``); returns the lines written."""
    lines: list[str] = []
    now = f"{_now():%Y-%m-%d %H:%M:%S} UTC"
    for path in certs:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise PkiError(f"{path}: not a readable PEM certificate ({exc})") from exc
        lines += [f"# {cert.subject.rfc4514_string()} ({path.name}), revoked {now}",
                  f"serial:{cert.serial_number:x}",
                  f"sha256:{cert.fingerprint(hashes.SHA256()).hex()}"]
    for serial in serials:
        value = serial.lower().removeprefix("0x").replace(":", "")
        try:
            int(value, 16)
        except ValueError:
            raise PkiError(f"--serial {serial!r}: not a hex serial number") from None
        lines += [f"# serial given by hand, revoked {now}", f"serial:{value}"]
    deny_list.parent.mkdir(parents=True, exist_ok=True)
    with deny_list.open("a", encoding="utf-8") as out:
        out.write("".join(line + "\n" for line in lines))
        out.flush()
        os.fsync(out.fileno())
    return lines

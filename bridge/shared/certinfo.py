"""A certificate's subject CN, notAfter and serial, read straight from its DER (expiry, reload).

Why not ``cryptography``: importing its x509 module costs the long-running agent about 8 MB of
resident memory (measured: VmRSS before and after the import, next to paho and grpc), a sixth
of its whole footprint, to read two fields. X.509's layout up to the subject is fixed
(RFC 5280 4.1): Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, subject, ... } }.
Anything that does not parse is ``ValueError``; the collector reports such a file unreadable.
tests/shared/test_certinfo.py checks the figures against cryptography's on real certificates.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import re
import ssl
from pathlib import Path

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)
_CN = bytes([0x06, 0x03, 0x55, 0x04, 0x03])  # OID 2.5.4.3, commonName
_OU = bytes([0x06, 0x03, 0x55, 0x04, 0x0B])  # OID 2.5.4.11, organizationalUnitName
# The role a certificate is issued for, in its subject's OU (``bridge pki`` sets it; the
# ingest authorises by it).
ROLE_SITE = "bridge-site"
ROLE_CONSUMER = "bridge-consumer"
ROLE_SERVER = "bridge-server"
_INTEGER, _SEQUENCE, _SET, _UTC, _GENERALIZED = 0x02, 0x30, 0x31, 0x17, 0x18


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the element at ``at``."""
    if at + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        n = length & 0x7F
        if not 0 < n <= 4 or at + n > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[at:at + n], "big")
        at += n
    if at + length > len(der):
        raise ValueError("DER element past the end")
    return tag, at, at + length


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, vs, ve = _tlv(der, start)
        out.append((tag, vs, ve))
        start = ve
    return out


def _time(tag: int, text: bytes) -> float:
    s = text.decode("ascii")
    if tag == _UTC:  # YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280 4.1.2.5.1)
        year = int(s[:2])
        s = f"{19 if year >= 50 else 20}{s}"
    elif tag != _GENERALIZED:
        raise ValueError("validity is not a time")
    when = dt.datetime.strptime(s, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
    return when.timestamp()


def _attribute(der: bytes, start: int, end: int, oid: bytes = _CN) -> str:
    for tag, vs, ve in _children(der, start, end):  # RDNs: SET of SEQUENCE {oid, value}
        if tag != _SET:
            continue
        for _, avs, _end in _children(der, vs, ve):
            if der[avs:avs + len(oid)] == oid:
                _, v0, v1 = _tlv(der, avs + len(oid))
                return der[v0:v1].decode("utf-8", "replace")
    return ""


def _tbs_fields(der: bytes) -> list[tuple[int, int, int]]:
    """The tbsCertificate's fields from serialNumber on (the version dropped)."""
    tag, vs, _ = _tlv(der, 0)
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    tag, tbs0, tbs1 = _tlv(der, vs)
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    fields = _children(der, tbs0, tbs1)
    if fields and fields[0][0] == 0xA0:  # explicit version
        fields = fields[1:]
    return fields


def role_pem(pem: bytes) -> str:
    """The subject OU (the role) of the first certificate in a PEM file; "" if it has none."""
    der = _first_der(pem)
    fields = _tbs_fields(der)
    if len(fields) < 5:
        raise ValueError("certificate too short")
    return _attribute(der, fields[4][1], fields[4][2], _OU)


def _first_der(pem: bytes) -> bytes:
    blocks = _PEM.findall(pem)
    if not blocks:
        raise ValueError("no PEM certificate")
    return base64.b64decode(b"".join(blocks[0].split()), validate=True)


def read(der: bytes) -> tuple[str, float]:
    """(subject CN, notAfter as Unix time) of one DER certificate."""
    fields = _tbs_fields(der)
    if len(fields) < 5:
        raise ValueError("certificate too short")
    validity, subject = fields[3], fields[4]
    times = _children(der, validity[1], validity[2])
    if validity[0] != _SEQUENCE or len(times) != 2:
        raise ValueError("bad validity")
    tag, t0, t1 = times[1]
    return _attribute(der, subject[1], subject[2]), _time(tag, der[t0:t1])


def serial(der: bytes) -> int:
    """The serialNumber of one DER certificate (the first field after the version)."""
    fields = _tbs_fields(der)
    if not fields or fields[0][0] != _INTEGER:
        raise ValueError("no serial number")
    return int.from_bytes(der[fields[0][1]:fields[0][2]], "big", signed=True)


def serial_pem(pem: bytes) -> int:
    """The serialNumber of the first certificate in a PEM file."""
    return serial(_first_der(pem))


def read_pem(pem: bytes) -> list[tuple[str, float]]:
    """Every certificate in a PEM file (a CA file may hold several); ValueError if none."""
    blocks = _PEM.findall(pem)
    if not blocks:
        raise ValueError("no PEM certificate")
    return [read(base64.b64decode(b"".join(block.split()), validate=True)) for block in blocks]


def chain_problem(ca: bytes, cert: Path, key: Path) -> str | None:
    """Why a TLS server trusting ``ca`` would refuse ``cert`` as a client certificate, or None.

    OpenSSL itself decides (chain to the CA, notBefore/notAfter, client usage): a handshake
    between two in-memory TLS objects, ours presenting ``cert``/``key`` and the other side
    requiring a client certificate issued by ``ca``. Nothing touches the network.
    """
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)  # any certificate will do for the server's own side
    server.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.load_cert_chain(cert, key)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    ours = client.wrap_bio(c_in, c_out, server_side=False)
    theirs = server.wrap_bio(s_in, s_out, server_side=True)
    ours_done = theirs_done = False
    for _ in range(8):  # a TLS 1.3 handshake takes three flights
        if not ours_done:
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
                ours.do_handshake()  # SSLError here is the other side's alert: see below
                ours_done = True
        s_in.write(c_out.read())
        if not theirs_done:
            try:
                theirs.do_handshake()
                theirs_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                return str(exc.verify_message)
            except ssl.SSLError as exc:
                return str(exc)
        c_in.write(s_out.read())
        if ours_done and theirs_done:
            return None
    return "the TLS handshake did not complete"
